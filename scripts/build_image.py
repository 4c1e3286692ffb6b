"""`make image COND=x`: stage the build context of image controlnet-<x>, then `cog build` it.

Cog builds from the folder holding cog.yaml, so each image gets a staged folder (build/<x>/) with
the shared code, this condition's predictor and detector only, the pinned requirements (less the
cog line: cog.yaml's sdk_version installs the SDK) and only this condition's weights, hard-linked
when possible. Standard library only: no virtualenv is needed to build an image.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from scripts.cog_config import ROOT, cog_yaml, field, pinned_sdk

SHARED = [
    "cog_base",
    "models/__init__.py",
    "models/image.py",
    "models/pipeline.py",
    "models/midas.py",  # the depth estimator behind both depth and normal
    "models/detectors/__init__.py",
    "weights/__init__.py",
    "weights/manifest.json",
    "weights/download.py",
    "predictors/__init__.py",
]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _put(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    if src.is_dir():
        shutil.copytree(src, dst, ignore=ignore, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(src), str(dst))


def stage(condition: str, context: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    import weights

    sdk = field(condition, "sdk_version")
    if sdk != pinned_sdk():
        raise SystemExit(f"{cog_yaml(condition)} has sdk_version {sdk} but requirements.txt pins cog=={pinned_sdk()}")
    try:
        found = weights.locate(condition, prefer="real")  # an image never ships tiny weights
    except weights.MissingWeightsError as exc:
        raise SystemExit(f"make image: {exc}") from None

    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    for rel in [*SHARED, f"predictors/{condition}", f"models/detectors/{condition}.py"]:
        if (ROOT / rel).exists():
            _put(ROOT / rel, context / rel)
    (context / f"predictors/{condition}/cog.yaml").unlink()
    _put(cog_yaml(condition), context / "cog.yaml")
    requirements = [
        line for line in (ROOT / "requirements.txt").read_text().splitlines() if not line.startswith("cog==")
    ]
    (context / "requirements.txt").write_text("\n".join(requirements) + "\n")
    for folder in found.folders.values():
        _put(folder, context / "weights" / folder.name)
    return context


def missing_tools() -> list[str]:
    missing = []
    if not shutil.which("cog"):
        missing.append("the cog CLI (https://github.com/replicate/cog#install)")
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "info"], capture_output=True).returncode != 0:
        missing.append("a running Docker engine (with buildx and the NVIDIA container toolkit for GPU runs)")
    return missing


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("condition")
    parser.add_argument("--context", type=Path, default=None, help="staging folder (default build/<condition>)")
    args = parser.parse_args(argv)
    context = stage(args.condition, args.context or ROOT / "build" / args.condition)
    size = sum(p.stat().st_size for p in context.rglob("*") if p.is_file())
    tag = f"controlnet-{args.condition}"
    print(f"Build context for {tag}: {context} ({size / 1e9:.2f} GB)")
    missing = missing_tools()
    if missing:
        raise SystemExit(
            f"make image: cannot build {tag} here: missing " + " and ".join(missing) + ".\n"
            f"The staged context is complete; on a machine with both run: cd {context} && cog build -t {tag}"
        )
    subprocess.run(["cog", "build", "-t", tag], cwd=context, check=True)
    print(f"Built {tag}. Run it: docker run --gpus all -p 5000:5000 {tag}")


if __name__ == "__main__":
    main()
