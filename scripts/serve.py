"""`make serve COND=x PORT=n`: Cog's own HTTP server for one condition, as its image runs it.

Same entry point as the image (`python -m cog.server.http`), same SDK version (cog.yaml's
`build.sdk_version`, also pinned in requirements.txt) and the same working folder layout: Cog reads
cog.yaml from its working directory (/src in the image), so the server runs in build/serve-<x>/,
which holds the condition's cog.yaml and links to the shared code and the weights.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import time
import urllib.request
from pathlib import Path

from scripts.cog_config import ROOT, cog_yaml, field, has_field, loader_env, pinned_sdk

LINKED = ("cog_base", "models", "predictors", "weights")


def run_dir(condition: str) -> Path:
    folder = ROOT / "build" / f"serve-{condition}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = folder / name
        if not link.is_symlink():
            try:
                link.symlink_to(ROOT / name, target_is_directory=True)
            except FileExistsError:  # another server of this condition, starting at the same moment
                pass
    # One staging file per process: two servers of one condition start together in the tests (the
    # second's replace found the first's file gone).
    staged = folder / f"cog.yaml.{os.getpid()}.tmp"
    staged.write_text(cog_yaml(condition).read_text())
    staged.replace(folder / "cog.yaml")
    return folder


def port_number(text: str) -> int:
    """argparse type for every --port: PORT=99999 is one line saying what a port is, not a traceback."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 1 to 65535")
    return port


def port_problem(port: int, host: str = "127.0.0.1", variable: str = "PORT") -> str | None:
    """Why a server cannot listen on host:port, found before starting one (its own error is a JSON log
    line among many), or None. Binds the way uvicorn and http.server do (SO_REUSEADDR)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use (another server? `make serve` there?): choose another, e.g. {variable}={port % 65535 + 1}"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def require_port(port: int, host: str = "127.0.0.1", who: str = "make serve", variable: str = "PORT") -> None:
    problem = port_problem(port, host, variable)
    if problem:
        raise SystemExit(f"{who}: {problem}")


def announce_ready(url: str, server_pid: int, every_s: float = 0.5) -> None:
    """Print one `READY on URL` line once Cog's health check says READY (as the quickstart does).

    Cog replaces this process (exec), so the watcher is a grandchild: nothing for Cog to reap, in the
    server's process group (a signal to the group ends it too), and gone once it printed or the server
    exited."""
    if os.fork():
        os.wait()
        return
    if os.fork():
        os._exit(0)
    try:
        while True:
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                break
            try:
                with urllib.request.urlopen(f"{url}/health-check", timeout=2) as answer:
                    status = json.loads(answer.read()).get("status")
            except (OSError, ValueError):
                status = None
            if status in ("READY", "SETUP_FAILED"):
                if status == "READY":
                    print(f"READY on {url}", flush=True)
                break
            time.sleep(every_s)
    finally:
        os._exit(0)


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
        **loader_env(condition),
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
    parser.add_argument("--port", type=port_number, default=5000)
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 keeps every route, /shutdown included, on this machine")
    parser.add_argument("--upload-url", default=None, help="Cog's --upload-url: async outputs are PUT to URL/<name>")
    parser.add_argument("--mode", choices=("predict", "train"), default="predict",
                        help="train: serve POST /trainings (the image's cog.yaml must have train:)")
    parser.add_argument("--weights", default="", help="COG_WEIGHTS for the server: a URL or path of trained weights")
    args = parser.parse_args()
    require_port(args.port, args.host)

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
    announce_ready(f"http://{args.host}:{args.port}", os.getpid())
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
