"""`make predict COND=x IMAGE=path PROMPT="..."`: one prediction against a running Cog server.

The image goes as a data: URI (Cog's API takes URLs or data: URIs, not uploads); the server's log
lines (the seed, `step k/N`, timings) are printed while it runs; the returned files are written to
outputs/, control map first.
"""

from __future__ import annotations

import argparse
import base64
import http.server
import json
import mimetypes
import sys
import threading
import time
import uuid
from pathlib import Path

import requests

from scripts.serve import port_number


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


def output_extension(item: str) -> str:
    """png, webp or jpg (output_format), from a data: URI's type or an uploaded file's URL."""
    if item.startswith("data:"):
        mime = item[5:].split(",", 1)[0].split(";", 1)[0]
        return {"image/jpeg": "jpg"}.get(mime, mime.rsplit("/", 1)[-1] or "png")
    suffix = item.split("?", 1)[0].rsplit("/", 1)[-1].rpartition(".")[2]
    return suffix or "png"


def save_outputs(outputs: list[str], out_dir: Path, stem: str, with_map: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = (["control"] if with_map else []) + [f"sample-{i}" for i in range(1, len(outputs) + 1)]
    paths = []
    for name, item in zip(names, outputs):
        path = out_dir / f"{stem}-{name}.{output_extension(item)}"
        path.write_bytes(decode_output(item))
        paths.append(path)
    return paths


class LogPrinter:
    """Prints a prediction's logs as Cog's `logs` webhooks bring them (the seed, step k/N, timings).

    The prediction itself stays a synchronous POST, whose answer carries the outputs: Cog sends the
    webhooks of a synchronous request too, and where they cannot arrive (a server in a container does
    not reach this machine's loopback) nothing is lost but the live lines; the rest is printed from
    the answer. The receiver is the standard library's, on 127.0.0.1, for as long as one prediction."""

    def __init__(self):
        self.printed = 0
        self.lock = threading.Lock()
        printer = self

        class Hook(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                try:
                    printer.show(json.loads(body).get("logs") or "")
                except ValueError:
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/logs"

    def show(self, logs: str) -> None:
        """Print what is new in the logs so far (each event carries all of them)."""
        with self.lock:
            if len(logs) > self.printed:
                print(logs[self.printed:], end="", flush=True)
                self.printed = len(logs)

    def __enter__(self) -> "LogPrinter":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def predict(url: str, inputs: dict, out_dir: Path, stem: str, timeout: float = 900) -> list[Path]:
    prediction_id = uuid.uuid4().hex
    with LogPrinter() as printer:
        request = {"id": prediction_id, "input": inputs, "webhook": printer.url, "webhook_events_filter": ["logs"]}
        try:
            response = requests.post(f"{url}/predictions", json=request, timeout=timeout)
        except requests.ConnectionError:
            where = "went away during the prediction" if printer.printed else "is not there"
            raise SystemExit(f"the Cog server at {url} {where}: start one with `make serve COND=...`") from None
        except KeyboardInterrupt:  # Ctrl-C: the server should not go on with what nobody waits for
            try:
                requests.post(f"{url}/predictions/{prediction_id}/cancel", timeout=10)
            except requests.RequestException:
                pass
            raise SystemExit("\ncanceled (Ctrl-C)") from None
        if response.status_code == 409:
            raise SystemExit(f"the server at {url} is busy with another prediction (HTTP 409: it runs one at a time); "
                             "try again when it is done")
        if response.status_code == 422:
            details = response.json().get("detail", [])
            lines = [f"  {'.'.join(str(p) for p in d.get('loc', [])[2:])}: {d.get('msg')}" for d in details]
            raise SystemExit("the server rejected the input (422):\n" + "\n".join(lines))
        if not response.ok:  # e.g. the server stopped mid-prediction (500): what it said, not a traceback
            raise SystemExit(f"the server at {url} answered HTTP {response.status_code}: {response.text.strip()[:300]}")
        body = response.json()
        printer.show(body.get("logs") or "")
        if not (body.get("logs") or "\n").endswith("\n"):
            print()
    if body.get("status") != "succeeded":
        raise SystemExit(f"prediction {body.get('status')}: {body.get('error')}")
    return save_outputs(body["output"], out_dir, stem, with_map=inputs.get("return_control_map", True))


def input_schema(url: str, name: str = "Input") -> dict:
    """The served Input (or TrainingInput) properties, with enum references resolved (Cog puts choices in
    components)."""
    try:
        schema = requests.get(f"{url}/openapi.json", timeout=30).json()
    except requests.ConnectionError:
        raise SystemExit(f"no Cog server at {url}: start one with `make serve COND=...`") from None
    components = schema["components"]["schemas"]
    props = {}
    if name not in components:
        raise SystemExit(f"the server at {url} has no {name} schema (a training needs `make serve COND=custom MODE=train`)")
    for key, prop in components[name]["properties"].items():
        for ref in prop.get("allOf", []):
            prop = {**components[ref["$ref"].rsplit("/", 1)[-1]], **prop}
        props[key] = prop
    return props


TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def typed(key: str, value: str, prop: dict):
    """A -i value as the schema types it, as `cog predict -i` does (so num_samples=4 sends "4")."""
    kind = prop.get("type")
    try:
        if prop.get("format") == "uri":
            return encode_image(value[1:] if value.startswith("@") else value)
        if kind == "integer":
            return int(value)
        if kind == "number":
            return float(value)
        if kind == "boolean":
            if value.lower() not in TRUE + FALSE:
                raise ValueError
            return value.lower() in TRUE
    except ValueError:
        raise SystemExit(f"-i {key}={value}: expected {kind} for {key}") from None
    return value


def parse_inputs(pairs: list[str], props: dict) -> dict:
    inputs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"-i {pair!r}: expected KEY=VALUE")
        if key not in props:
            raise SystemExit(f"-i {key}: this server has no input {key!r}; it takes: {', '.join(props)}")
        inputs[key] = typed(key, value, props[key])
    return inputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=None, help="server URL (default http://127.0.0.1:PORT)")
    parser.add_argument("--port", type=port_number, default=5000)
    parser.add_argument("--image", default="", help="path, URL or data: URI (or -i image=@path)")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--name", default="prediction", help="file name prefix, e.g. the condition")
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    parser.add_argument("-i", dest="inputs", action="append", default=[],
                        help="an input, KEY=VALUE, typed by the served schema; files as KEY=@path")
    args = parser.parse_args(argv)
    url = args.url or f"http://127.0.0.1:{args.port}"
    props = input_schema(url)
    inputs = parse_inputs(args.inputs, props)
    # The image inputs, in schema order: `image` (hed also `input_image`), or multi's controlnet_<n>_image.
    images = [name for name, prop in props.items() if prop.get("format") == "uri"]
    if args.image and images:
        inputs.setdefault(images[0], encode_image(args.image))
    if args.prompt:
        inputs.setdefault("prompt", args.prompt)
    if not any(name in inputs for name in images):
        raise SystemExit('an image is required: make predict COND=canny IMAGE=photo.png PROMPT="..." (or -i image=@photo.png; '
                         'multi: ARGS="-i controlnet_1=canny")')
    stem = f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = predict(url, inputs, args.out, stem)
    print("\n".join(f"wrote {p}" for p in paths))


if __name__ == "__main__":
    sys.exit(main())
