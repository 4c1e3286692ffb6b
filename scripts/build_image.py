"""`make image COND=x`: stage the build context of image controlnet-<x>, then build it.

Cog builds from the folder holding cog.yaml, so each image gets a staged folder (build/<x>/) with
copies of the shared code (cog_base/, models/ less the other conditions' detectors, the weights
package), this condition's predictor, the pinned requirements (less the cog line: cog.yaml's
sdk_version installs the SDK), a `.dockerignore`, a Dockerfile generated from the Cog config, and
only this condition's weights. Weights are hard-linked (they are big and never edited); code is
copied, so editing the staged folder never edits the repo. Hub bookkeeping (`.cache/`) and
unfinished downloads (`*.incomplete`) stay out.

Build path: with the cog CLI (>= MIN_COG_CLI) `cog build`; with Docker alone, `docker build` from
the generated Dockerfile, which follows the order and lines `cog build` generates (the image
serves the same HTTP API; only `cog push` adds what Replicate needs). Every missing prerequisite is
reported in one message before anything is staged.

`CONTROLNET_WEIGHTS=tiny` (or `--weights tiny`) stages a smoke variant with the tiny random weights,
tagged `controlnet-<x>-smoke` so it never replaces a real image. `--stage-only` stops after staging.
Standard library only: no virtualenv is needed to build an image.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from scripts.cog_config import MIN_COG_CLI, ROOT, cog_yaml, field, loader_env, pinned_sdk, version_tuple

# Never in an image: caches and bookkeeping of the hub client and of Python, half-written files.
EXCLUDED = (".cache", "*.incomplete", "__pycache__", "*.pyc", ".DS_Store")
DOCKERIGNORE = (
    "# Written by scripts/build_image.py: what the image never carries.\n"
    "Dockerfile\n.dockerignore\n**/.cache\n**/*.incomplete\n**/__pycache__\n**/*.pyc\n**/.DS_Store\n"
)
DEPS_END = "# -- end of the dependency layers (identical for every condition, so built once) --"
DEFAULT_BASE = "python:{python}-slim-bookworm"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _put(src: Path, dst: Path, link: bool = False, skip: tuple[str, ...] = ()) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    copy = _link_or_copy if link else shutil.copy2
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*EXCLUDED, *skip), copy_function=copy)
    else:
        copy(str(src), str(dst))


# What `cog build` labels an image with (replicate/cog pkg/image/build.go, read at v0.22.0 / main of
# 2026-08): run.cog.version, run.cog.config (the Cog config as JSON, the Go struct's field order),
# run.cog.openapi_schema, run.cog.pip_freeze, run.cog.has_init, and org.opencontainers.image.revision /
# .version from git. `cog predict IMAGE` and Replicate's tooling read run.cog.config (an image
# without it "does not appear to be a Cog model") and run.cog.openapi_schema.
GO_BUILD_KEYS = ("gpu", "python_version", "python_requirements", "python_packages", "run", "system_packages",
                 "pre_install", "cuda", "cudnn", "sdk_version")
GO_TOP_KEYS = ("build", "image", "model", "predict", "train", "concurrency", "environment", "weights")
SCALAR_KEYS = {"gpu", "python_version", "python_requirements", "cuda", "cudnn", "sdk_version", "image", "model",
               "predict", "train"}
# SPDX identifiers of what an image carries: the code, and each weights component (docs/licences.md).
CODE_LICENCE = "Apache-2.0"
WEIGHT_LICENCES = {
    "stable-diffusion-v1-5": "CreativeML-OpenRAIL-M", "controlnet-untrained": "CreativeML-OpenRAIL-M",
    "annotators-hed": "Apache-2.0", "annotators-mlsd": "Apache-2.0", "annotators-midas": "MIT",
    "upernet-convnext-small": "MIT", "annotators-openpose": "LicenseRef-CMU-OpenPose-NonCommercial",
    # lllyasviel/Annotators states no licence for these networks (docs/licences.md): said so, not guessed.
    "annotators-lineart": "LicenseRef-Annotators-Unstated",
    "annotators-softedge": "Apache-2.0 AND LicenseRef-Annotators-Unstated",
}


def cog_config_json(condition: str) -> str:
    """The condition's cog.yaml as `cog build` writes it into run.cog.config (Go's json.Marshal of its
    Config: declared field order, empty fields left out, compact). Standard library only, so it reads
    the scalar fields these configs use and refuses anything else rather than leave it out."""
    config: dict = {}
    section = None
    for line in cog_yaml(condition).read_text().splitlines():
        match = re.match(r"^(\s*)([a-z_]+):\s*(.*?)\s*$", line.split(" #")[0])
        if not match or line.lstrip().startswith("#"):
            continue
        indent, key, value = match.groups()
        if not indent and not value:
            section = config.setdefault(key, {})
            continue
        if key not in SCALAR_KEYS or (indent and section is None):
            raise SystemExit(f"{cog_yaml(condition)}: {key}: not a field scripts/build_image.py can label yet")
        value = value.strip('"')
        (section if indent else config)[key] = value == "true" if key == "gpu" else value
    build = {k: config["build"][k] for k in GO_BUILD_KEYS if config.get("build", {}).get(k) not in (None, "", False)}
    ordered = {"build": build, **{k: config[k] for k in GO_TOP_KEYS[1:] if config.get(k)}}
    return json.dumps(ordered, separators=(",", ":"))


def _git(*args: str) -> str:
    """git's answer, or "" where there is no git or no repository (a copied context)."""
    if not shutil.which("git"):
        return ""
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def source_url() -> str:
    """origin as an https URL (org.opencontainers.image.source), or "" without a remote."""
    url = _git("remote", "get-url", "origin")
    match = re.match(r"^git@([^:]+):(.+?)(\.git)?$", url)
    return f"https://{match.group(1)}/{match.group(2)}" if match else url.removesuffix(".git")


def image_labels(condition: str, schema: str, tiny: bool, pip_freeze: str = "") -> dict[str, str]:
    """cog build's labels (run.cog.*) and the standard OCI ones, for the plain-Docker build.

    run.cog.version is the Cog the image runs, the pinned SDK: there is no CLI in this path (up to
    0.16 the CLI and the SDK had the same version numbers)."""
    import weights

    components = weights.components(condition).values()
    licences = [CODE_LICENCE] + ([] if tiny else [WEIGHT_LICENCES.get(c, "CreativeML-OpenRAIL-M") for c in components])
    labels = {
        "run.cog.version": field(condition, "sdk_version"),
        "run.cog.config": cog_config_json(condition),
        "run.cog.openapi_schema": schema,
        "run.cog.has_init": "true",  # tini is the entrypoint
        "org.opencontainers.image.title": f"controlnet-{condition}",
        "org.opencontainers.image.description": f"Stable Diffusion 1.5 + ControlNet {condition}, served by Cog"
        + (" (tiny random weights: a smoke-test image)" if tiny else ""),
        "org.opencontainers.image.licenses": " AND ".join(dict.fromkeys(
            part for licence in licences for part in licence.split(" AND "))),
    }
    if pip_freeze:
        labels["run.cog.pip_freeze"] = pip_freeze
    for key, value in (("source", source_url()), ("revision", _git("rev-parse", "HEAD")),
                       ("version", _git("describe", "--tags", "--exact-match"))):
        if value:
            labels[f"org.opencontainers.image.{key}"] = value
    return labels


def in_image(tag: str, *command: str) -> str:
    done = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", command[0], tag, *command[1:]],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"make image: `{' '.join(command)}` failed in {tag}:\n{done.stderr[-2000:]}")
    return done.stdout


def label_image(tag: str, condition: str, tiny: bool, env: dict | None = None) -> dict[str, str]:
    """Add cog build's labels to a built image, as cog does: the schema and the pip freeze come from
    the image itself (Cog's own generator, run where the predictor runs), then a build FROM it adds
    them (labels as arguments: no quoting of JSON inside a Dockerfile)."""
    schema = json.loads(in_image(tag, "python", "-m", "cog.command.openapi_schema"))
    freeze = in_image(tag, "python", "-m", "pip", "freeze", "--disable-pip-version-check").strip()
    labels = image_labels(condition, json.dumps(schema, separators=(",", ":")), tiny, freeze)
    args = [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]
    subprocess.run(["docker", "build", "-q", *args, "-t", tag, "-"], input=f"FROM {tag}\n", text=True, check=True,
                   env=env, stdout=subprocess.DEVNULL)
    return labels


def dockerfile(condition: str) -> str:
    """The Dockerfile `cog build` would generate for this Cog config (CLI >= 0.17, legacy SDK), in its
    order: base, env, tini, requirements, the SDK, then workdir/schema/cmd and the code last. No
    BuildKit-only syntax, so the legacy builder and any engine can build it."""
    python = field(condition, "python_version")
    predict = field(condition, "predict")
    gpu = field(condition, "gpu") == "true"
    base = DEFAULT_BASE.format(python=python)
    lines = [
        "# Generated by scripts/build_image.py from cog.yaml; `make image` uses it when the cog CLI is absent.",
        f"# The pip wheels of torch carry CUDA {field(condition, 'cuda')} (host driver >= 580); a slim",
        "# Python base is enough. BASE_IMAGE: any Debian-like image with this Python and pip.",
        f"ARG BASE_IMAGE={base}",
        "FROM ${BASE_IMAGE}",
        "ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1"
        + (" NVIDIA_DRIVER_CAPABILITIES=compute,utility" if gpu else ""),
        "RUN command -v tini >/dev/null || (apt-get update -qq && apt-get install -qqy --no-install-recommends tini"
        " && rm -rf /var/lib/apt/lists/*)",
        'ENTRYPOINT ["tini", "--"]',
        "COPY requirements.txt /tmp/requirements.txt",
        "# PIP_OPTIONS: e.g. --no-index --find-links URL to install from a local wheelhouse.",
        "ARG PIP_OPTIONS=",
        "RUN python -m pip install --no-cache-dir --break-system-packages $PIP_OPTIONS -r /tmp/requirements.txt",
        f"RUN python -m pip install --no-cache-dir --break-system-packages $PIP_OPTIONS cog=={field(condition, 'sdk_version')}",
        DEPS_END,
        "WORKDIR /src",
        "EXPOSE 5000",
        f"ENV COG_PREDICT_TYPE_STUB={predict}",
        *(f'ENV {name}="{code}"' for name, code in loader_env(condition).items()),
        'CMD ["python", "-m", "cog.server.http"]',
        "COPY . /src",
    ]
    return "\n".join(lines) + "\n"


def problems(condition: str, tiny: bool, build: bool) -> tuple[list[str], object, str | None]:
    """Everything that stops this build, found before anything is staged: (problems, weights, tool)."""
    sys.path.insert(0, str(ROOT))
    import weights

    found, issues, tool = None, [], None
    sdk = field(condition, "sdk_version")
    if sdk != pinned_sdk():
        issues.append(f"{cog_yaml(condition)} has sdk_version {sdk} but requirements.txt pins cog=={pinned_sdk()}")
    if field(condition, "gpu") == "true" and not _has_field(condition, "cuda"):
        issues.append(f"{cog_yaml(condition)} has gpu: true but no build.cuda (the cog CLI cannot derive it from torch)")
    try:
        found = weights.locate(condition, prefer="tiny" if tiny else "real")  # real images never ship tiny weights
    except weights.MissingWeightsError as exc:
        issues.append(str(exc))
    if build:
        tool, tool_issue = build_tool()
        if tool_issue:
            issues.append(tool_issue)
    return issues, found, tool


def _has_field(condition: str, name: str) -> bool:
    try:
        field(condition, name)
    except SystemExit:
        return False
    return True


def _docker_running() -> bool:
    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "info"], capture_output=True).returncode == 0


def build_tool() -> tuple[str | None, str | None]:
    """("cog" | "docker", None), or (None, what is missing)."""
    cog = shutil.which("cog")
    docker = _docker_running()
    if cog:
        out = subprocess.run([cog, "--version"], capture_output=True, text=True).stdout
        if version_tuple(out) < version_tuple(MIN_COG_CLI):
            return None, (
                f"the cog CLI at {cog} is {out.strip() or 'of unknown version'}; these Cog configs need cog >= "
                f"{MIN_COG_CLI} (build.sdk_version). Upgrade it (https://github.com/replicate/cog#install)"
                + (", or take it off PATH to build with plain Docker" if docker else "")
            )
        if not docker:
            return None, "a running Docker engine (cog build needs one; with the NVIDIA container toolkit for GPU runs)"
        return "cog", None
    if docker:
        return "docker", None
    return None, (
        "a running Docker engine (https://docs.docker.com/engine/install/; the cog CLI "
        f">= {MIN_COG_CLI} is optional: https://github.com/replicate/cog#install)"
    )


def stage(condition: str, context: Path, found) -> Path:
    import weights

    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    served = weights.conditions_of(condition)  # a combined image (multi) serves several, each its own predictor
    others = [f"{c}.py" for c in weights.CONDITIONS if c not in served]
    _put(ROOT / "cog_base", context / "cog_base")
    _put(ROOT / "models", context / "models", skip=tuple(others))
    for rel in ["weights/__init__.py", "weights/manifest.json", "weights/download.py", "predictors/__init__.py"]:
        _put(ROOT / rel, context / rel)
    for name in dict.fromkeys((condition, *served)):
        _put(ROOT / "predictors" / name, context / "predictors" / name, skip=("cog.yaml",))
    _put(cog_yaml(condition), context / "cog.yaml")
    requirements = [
        line for line in (ROOT / "requirements.txt").read_text().splitlines() if not line.startswith("cog==")
    ]
    (context / "requirements.txt").write_text("\n".join(requirements) + "\n")
    (context / ".dockerignore").write_text(DOCKERIGNORE)
    (context / "Dockerfile").write_text(dockerfile(condition))
    for folder in dict.fromkeys(found.folders.values()):
        _put(folder, context / "weights" / folder.relative_to(weights.root()), link=True)
    return context


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("condition")
    parser.add_argument("--context", type=Path, default=None, help="staging folder (default build/<condition>)")
    parser.add_argument("--weights", choices=["real", "tiny"], default=None,
                        help="real (default) or tiny for a smoke image (default from CONTROLNET_WEIGHTS=tiny)")
    parser.add_argument("--tag", default=None, help="image tag (default controlnet-<x>, controlnet-<x>-smoke for tiny)")
    parser.add_argument("--stage-only", action="store_true", help="stage the context and stop: never builds or tags")
    parser.add_argument("--docker-arg", action="append", default=[], help="extra `docker build` argument (plain-Docker path)")
    args = parser.parse_args(argv)
    cog_yaml(args.condition)  # an unknown condition says so first
    tiny = (args.weights or ("tiny" if os.environ.get("CONTROLNET_WEIGHTS") == "tiny" else "real")) == "tiny"
    tag = args.tag or f"controlnet-{args.condition}" + ("-smoke" if tiny else "")
    issues, found, tool = problems(args.condition, tiny, build=not args.stage_only)
    if issues:
        raise SystemExit(f"make image: cannot build {tag}:\n" + "\n".join(f"- {issue}" for issue in issues))
    context = stage(args.condition, args.context or ROOT / "build" / args.condition, found)
    size = sum(p.stat().st_size for p in context.rglob("*") if p.is_file())
    print(f"Build context for {tag}: {context} ({size / 1e9:.2f} GB, {'tiny' if tiny else 'real'} weights)", flush=True)
    if args.stage_only:
        print(json.dumps({"context": str(context), "tag": tag}))
        return
    if tool == "cog":
        print(f"make image: building with `cog build` ({shutil.which('cog')})", flush=True)
        subprocess.run(["cog", "build", "-t", tag], cwd=context, check=True)
    else:
        print("make image: no cog CLI, building with plain `docker build` from the generated "
              f"{context / 'Dockerfile'} (same HTTP API; `cog push` to Replicate needs the cog CLI)", flush=True)
        subprocess.run(["docker", "build", *args.docker_arg, "-t", tag, str(context)], check=True)
        label_image(tag, args.condition, tiny)
        print(f"make image: labelled {tag} as `cog build` does (run.cog.config, run.cog.openapi_schema, ...)", flush=True)
    print(f"Built {tag}. Run it: docker run --gpus all -p 127.0.0.1:5000:5000 {tag}   (CPU: leave out --gpus all)")


if __name__ == "__main__":
    main()
