"""`make serve COND=x PORT=n`: Cog's own HTTP server for one condition, as its image runs it.

Same entry point as the image (`python -m cog.server.http`), same SDK version (cog.yaml's
`build.sdk_version`, also pinned in requirements.txt) and the same working folder layout: Cog reads
cog.yaml from its working directory (/src in the image), so the server runs in build/serve-<x>/,
which holds the condition's cog.yaml and links to the shared code and the weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from scripts.cog_config import ROOT, cog_yaml, field, has_field, pinned_sdk

LINKED = ("cog_base", "models", "predictors", "weights")


def run_dir(condition: str) -> Path:
    folder = ROOT / "build" / f"serve-{condition}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name, target_is_directory=True)
    staged = folder / "cog.yaml.tmp"
    staged.write_text(cog_yaml(condition).read_text())
    staged.replace(folder / "cog.yaml")
    return folder


def server_command(
    condition: str, port: int, host: str = "127.0.0.1", mode: str = "predict"
) -> tuple[list[str], dict[str, str]]:
    import cog

    sdk = field(condition, "sdk_version")
    if sdk != pinned_sdk() or cog.__version__ != sdk:
        raise SystemExit(
            f"Cog SDK mismatch: cog.yaml wants {sdk}, requirements.txt pins {pinned_sdk()}, "
            f"installed is {cog.__version__}. Run `make install`."
        )
    env = {
        **os.environ,
        "PORT": str(port),
        "PYTHONUNBUFFERED": "1",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    }
    # Cog routes POST /trainings to train() only in train mode (predict mode sends it to predict()),
    # which is how the cog CLI's `cog train` and Replicate run trainings: one server per mode.
    mode_args = ["--x-mode", "train"] if mode == "train" else []
    return [sys.executable, "-m", "cog.server.http", "--host", host, *mode_args], env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("condition")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 keeps every route, /shutdown included, on this machine")
    parser.add_argument("--upload-url", default=None, help="Cog's --upload-url: async outputs are PUT to URL/<name>")
    parser.add_argument("--mode", choices=("predict", "train"), default="predict",
                        help="train: serve POST /trainings (the image's cog.yaml must have train:)")
    parser.add_argument("--weights", default="", help="COG_WEIGHTS for the server: a URL or path of trained weights")
    args = parser.parse_args()

    import weights

    try:  # fail here, with the fix, rather than as SETUP_FAILED
        found = weights.locate(args.condition)
    except (ValueError, weights.MissingWeightsError) as exc:
        raise SystemExit(f"make serve: {exc}") from None
    if found.tiny:
        print(
            "\n" + "!" * 78 + f"\n  No real weights for {args.condition}: serving TINY RANDOM-WEIGHT models (noise).\n"
            f"  Real ones: make weights COND={args.condition}\n" + "!" * 78 + "\n",
            flush=True,
        )
    if args.mode == "train" and not has_field(args.condition, "train"):
        raise SystemExit(f"make serve: {args.condition} is not trainable (its cog.yaml has no train:); try COND=custom")
    command, env = server_command(args.condition, args.port, args.host, args.mode)
    if args.upload_url:
        command += ["--upload-url", args.upload_url]
    if args.weights:
        # Relative paths are the user's, but the server runs in build/serve-<cond>/.
        local = Path(args.weights).expanduser()
        env["COG_WEIGHTS"] = str(local.resolve()) if local.exists() else args.weights
    print(f"Cog server for {args.condition} on http://{args.host}:{args.port} ({' '.join(command[1:])})"
          + (f", COG_WEIGHTS={env['COG_WEIGHTS']}" if env.get("COG_WEIGHTS") else ""), flush=True)
    os.chdir(run_dir(args.condition))
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
