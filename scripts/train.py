"""`make train PAIRS=pairs.zip ARGS='-i max_train_steps=500'`: train the custom ControlNet, as `cog train` does.

Starts the custom image's Cog server in train mode (`--x-mode train`, what `cog train` runs in the
image), POSTs /trainings with the archive, prints the training's logs as they come, and writes the
weights tar and the validation images into outputs/. With --url it uses a server that is already
running (`make serve COND=custom MODE=train`) instead.
"""

from __future__ import annotations

import argparse
import mimetypes
import base64
import sys
import threading
import time
from pathlib import Path

import requests

from scripts.cog_config import ROOT
from scripts.predict import decode_output, input_schema, parse_inputs
from scripts.serve import port_number, require_port

CONDITION = "custom"


def encode_archive(pairs: str) -> str:
    if pairs.startswith(("http://", "https://", "data:")):
        return pairs
    path = Path(pairs).expanduser()
    if not path.is_file():
        raise SystemExit(f"PAIRS={pairs!r}: no such file (a .zip or .tar of images/, conditioning_images/, prompts.jsonl)")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def save(output: dict, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{stem}.tar"]
    written[0].write_bytes(decode_output(output["weights"]))
    for i, item in enumerate(output.get("validation_images") or []):
        written.append(out_dir / f"{stem}-validation-{i}.png")
        written[-1].write_bytes(decode_output(item))
    return written


def run_training(url: str, inputs: dict, out_dir: Path, stem: str) -> list[Path]:
    try:
        response = requests.post(f"{url}/trainings", json={"input": inputs}, timeout=7 * 24 * 3600)
    except requests.ConnectionError:
        raise SystemExit(f"no Cog server at {url}: start one with `make serve COND=custom MODE=train`") from None
    if response.status_code == 422:
        details = response.json().get("detail", [])
        lines = [f"  {'.'.join(str(p) for p in d.get('loc', [])[2:])}: {d.get('msg')}" for d in details]
        raise SystemExit("the server rejected the input (422):\n" + "\n".join(lines))
    response.raise_for_status()
    body = response.json()
    if body.get("status") != "succeeded":
        raise SystemExit(f"training {body.get('status')}: {body.get('error')}")
    return save(body["output"], out_dir, stem)


def follow(log_path: Path, stop: threading.Event) -> None:
    """Print the server's log as it grows, less Cog's own JSON lines: the training's progress, live."""
    position = 0
    while not stop.is_set() or position < log_path.stat().st_size:
        with open(log_path, errors="replace") as log:
            log.seek(position)
            chunk = log.read()
            position = log.tell()
        for line in chunk.splitlines():
            if not line.startswith('{"'):
                print(line, flush=True)
        stop.wait(0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", default="", help="the training archive: a path, an http(s) URL or a data: URI")
    parser.add_argument("--url", default=None, help="a running train-mode server (default: start one)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs")
    parser.add_argument("--port", type=port_number, default=None, help="the train-mode server's port (default: a free one)")
    parser.add_argument("-i", dest="inputs", action="append", default=[],
                        help="a training input, KEY=VALUE, typed by the served schema (files as KEY=@path)")
    args = parser.parse_args(argv)
    if not args.pairs and not any(i.startswith("pairs=") for i in args.inputs):
        raise SystemExit("make train PAIRS=pairs.zip [ARGS='-i max_train_steps=500 -i validation_prompt=...']")
    stem = f"controlnet-{CONDITION}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.url:
        return report(train_with(args.url, args, stem))

    from scripts.cog_server import CogServer

    if args.port:
        require_port(args.port, who="make train")
    log_path = args.out / f"{stem}-server.log"
    server = CogServer(CONDITION, port=args.port, log_path=log_path, mode="train")
    print(f"Starting the {CONDITION} image's Cog server in train mode on {server.url} (log: {log_path})", flush=True)
    stop = threading.Event()
    try:
        server.launch()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.touch()
        tail = threading.Thread(target=follow, args=(log_path, stop), daemon=True)
        tail.start()
        server.wait_ready()
        written = train_with(server.url, args, stem)
    finally:
        stop.set()
        server.stop()
    report(written)


def train_with(url: str, args, stem: str) -> list[Path]:
    inputs = parse_inputs(args.inputs, input_schema(url, "TrainingInput"))
    if args.pairs:
        inputs.setdefault("pairs", encode_archive(args.pairs))
    return run_training(url, inputs, args.out, stem)


def report(written: list[Path]) -> None:
    print(f"wrote {written[0]} (the trained ControlNet; serve it: make serve COND={CONDITION} WEIGHTS={written[0]})")
    print("\n".join(f"wrote {p}" for p in written[1:]))


if __name__ == "__main__":
    sys.exit(main())
