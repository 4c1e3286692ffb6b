"""`make predict COND=x IMAGE=path PROMPT="..."`: one prediction against a running Cog server.

The image goes as a data: URI (Cog's API takes URLs or data: URIs, not uploads); the returned files
are written to outputs/, control map first.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import sys
import time
from pathlib import Path

import requests


def encode_image(image: str) -> str:
    if image.startswith(("http://", "https://", "data:")):
        return image
    path = Path(image)
    if not path.is_file():
        raise SystemExit(f"IMAGE={image!r}: no such file (give a path, an http(s) URL or a data: URI)")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def decode_output(item: str) -> bytes:
    if item.startswith("data:"):
        return base64.b64decode(item.split(",", 1)[1])
    response = requests.get(item, timeout=60)
    response.raise_for_status()
    return response.content


def save_outputs(outputs: list[str], out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["control"] + [f"sample-{i}" for i in range(1, len(outputs))]
    paths = []
    for name, item in zip(names, outputs):
        path = out_dir / f"{stem}-{name}.png"
        path.write_bytes(decode_output(item))
        paths.append(path)
    return paths


def predict(url: str, inputs: dict, out_dir: Path, stem: str, timeout: float = 900) -> list[Path]:
    try:
        response = requests.post(f"{url}/predictions", json={"input": inputs}, timeout=timeout)
    except requests.ConnectionError:
        raise SystemExit(f"no Cog server at {url}: start one with `make serve COND=...`") from None
    if response.status_code == 422:
        details = response.json().get("detail", [])
        lines = [f"  {'.'.join(str(p) for p in d.get('loc', [])[2:])}: {d.get('msg')}" for d in details]
        raise SystemExit("the server rejected the input (422):\n" + "\n".join(lines))
    response.raise_for_status()
    body = response.json()
    print((body.get("logs") or "").rstrip())
    if body.get("status") != "succeeded":
        raise SystemExit(f"prediction {body.get('status')}: {body.get('error')}")
    return save_outputs(body["output"], out_dir, stem)


def parse_extra(pairs: list[str]) -> dict:
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"-i {pair!r}: expected KEY=VALUE")
        try:
            extra[key] = json.loads(value)
        except ValueError:
            extra[key] = value
    return extra


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=None, help="server URL (default http://127.0.0.1:PORT)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--name", default="prediction", help="file name prefix, e.g. the condition")
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    parser.add_argument("-i", dest="extra", action="append", default=[], help="another input, KEY=VALUE")
    args = parser.parse_args(argv)
    if not args.image:
        raise SystemExit('IMAGE is required: make predict COND=canny IMAGE=photo.png PROMPT="..."')
    inputs = {"image": encode_image(args.image), "prompt": args.prompt, **parse_extra(args.extra)}
    stem = f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = predict(args.url or f"http://127.0.0.1:{args.port}", inputs, args.out, stem)
    print("\n".join(f"wrote {p}" for p in paths))


if __name__ == "__main__":
    sys.exit(main())
