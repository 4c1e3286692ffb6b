"""Tests run offline on tiny random-weight models in the production folder layout."""

import os

# Before diffusers/transformers are imported anywhere: never touch the network, and never pick up
# real weights a developer may have downloaded (tests must stay fast and deterministic).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["CONTROLNET_WEIGHTS"] = "tiny"

import base64
import http.server
import importlib
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

import weights
import weights.tiny
from scripts.cog_server import CogServer


@pytest.fixture(autouse=True)
def _registry_choices_kept():
    """A test that builds a Cog schema in this process takes the registry's "enum"s with it (Cog pops
    them): put them back, so no later test depends on which ran first."""
    yield
    from cog_base.cog016.choices import restore_choices

    restore_choices()


@pytest.fixture(scope="session", autouse=True)
def tiny_weights():
    """`make test` writes them first; this keeps a bare `pytest` run working too."""
    weights.tiny.main([])
    return weights.root() / weights.TINY


@pytest.fixture(scope="session")
def parity_reference():
    """The parity hashes this machine must reproduce, and where they come from (scripts/parity_hashes.py:
    the fixture's, or its commit run on this CPU, built once and cached)."""
    from scripts import parity_hashes

    return parity_hashes.expected()


def predictor_class(condition):
    return importlib.import_module(f"predictors.{condition}.predict").Predictor


def data_uri(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def set_up(condition: str):
    """A predictor of `condition` set up in this process. A module shares one per condition with
    `predictor = functools.cache(set_up)` (a failed setup is not cached)."""
    p = predictor_class(condition)()
    p.setup()
    return p


def random_lora(module, prefix: str, layers, generator) -> dict:
    """A rank-4 PEFT LoRA of random values over each layer of `module` whose name ends with one of
    `layers`, its keys under `prefix` ("unet", "text_encoder"), drawn in module order from `generator`."""
    import torch

    state = {}
    for name, layer in module.named_modules():
        if name.endswith(tuple(layers)):
            state[f"{prefix}.{name}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=generator)
            state[f"{prefix}.{name}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=generator)
    return state


def setup_with(monkeypatch, tmp_path, cog_weights, condition="canny"):
    """A predictor set up in this process with COG_WEIGHTS set to `cog_weights` (None: unset)."""
    monkeypatch.setenv("CONTROLNET_ASSET_CACHE", str(tmp_path / "cache"))
    if cog_weights is None:
        monkeypatch.delenv("COG_WEIGHTS", raising=False)
    else:
        monkeypatch.setenv("COG_WEIGHTS", str(cog_weights))
    p = predictor_class(condition)()
    p.setup()
    return p


def drawing(width=400, height=300, mode="RGB") -> Image.Image:
    """A photo-like test image with strong edges: a rectangle, a circle and a diagonal line."""
    rng = np.random.default_rng(0)
    noise = rng.integers(90, 110, size=(height, width, 3), dtype=np.uint8)
    img = Image.fromarray(noise)
    draw = ImageDraw.Draw(img)
    draw.rectangle([width // 8, height // 6, width // 2, height // 2], fill=(230, 40, 40))
    draw.ellipse([width // 2, height // 2, width - 20, height - 10], fill=(20, 20, 200))
    draw.line([0, height - 1, width - 1, 0], fill=(250, 250, 250), width=5)
    return img.convert(mode)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_file(tmp_path):
    def make(mode="RGB", width=400, height=300, name="input.png"):
        path = tmp_path / name
        drawing(width, height, mode).save(path)
        return path

    return make


# The conditions the `servers` fixture starts, together, for the whole session: FUZZ_CONDITIONS (`make fuzz
# COND=x` runs only test_fuzz.py, on those), else all but the ControlNet 1.1 images. Those are served one at
# a time (test_server.py::test_each_controlnet_11_image_serves_through_its_own_server): fifteen servers at
# once would not fit a busy 2-core CI box.
ONE_AT_A_TIME = ("inpaint", "ip2p", "lineart", "shuffle", "softedge", "tile")
SERVED = [c for c in os.environ.get("FUZZ_CONDITIONS", "").split(",") if c] or [
    c for c in weights.CONDITIONS if c not in ONE_AT_A_TIME
]


def fuzz_port(condition: str) -> int | None:
    """`make fuzz COND=x PORT=n` (FUZZ_PORT): x's server listens on n; every other server on a free port."""
    port = os.environ.get("FUZZ_PORT")
    return int(port) if port and os.environ.get("FUZZ_CONDITIONS") == condition else None


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """Each server is started once for the whole suite, all at the same time (setup is mostly imports)."""
    logs = tmp_path_factory.mktemp("cog")
    # /shutdown refused: the fuzzing in the suite calls every route, that one included.
    running = {
        c: CogServer(c, port=fuzz_port(c), log_path=logs / f"{c}.log", env={"CONTROLNET_SHUTDOWN_FROM": "none"})
        for c in SERVED
    }
    try:
        for server in running.values():
            server.launch()
        for server in running.values():
            server.wait_ready()
        yield running
    finally:
        for server in running.values():
            server.stop()


@pytest.fixture(params=SERVED)
def server(request, servers):
    return servers[request.param]


def trickle(handler, headers_too=False, seconds=60, interval=0.2):
    """Answer a GET one byte at a time (the body, or the headers too), as a host that holds a download open."""
    try:
        if headers_too:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * int(seconds / interval):
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                time.sleep(interval)
            return
        handler.send_response(200)
        handler.send_header("Content-Length", str(int(seconds / interval)))
        handler.end_headers()
        handler.wfile.flush()
        for _ in range(int(seconds / interval)):
            handler.wfile.write(b"\0")
            handler.wfile.flush()
            time.sleep(interval)
    except OSError:  # the client hung up, as it should
        pass


class Receiver:
    """A client's HTTP endpoint on loopback: records webhooks (POST) and uploads (PUT); serves `files` (path ->
    bytes) to GET; /hang never answers; /trickle and /trickle-headers send a byte every 0.2 s for a minute."""

    def __init__(self):
        self.events, self.uploads, self.files = [], {}, {}
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _body(self):
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self):
                if self.path.startswith("/hang"):
                    time.sleep(60)
                    return
                receiver.events.append((self.path, json.loads(self._body()), time.monotonic()))
                self.send_response(200)
                self.end_headers()

            def do_PUT(self):
                receiver.uploads[self.path] = self._body()
                self.send_response(201)
                self.send_header("Location", f"http://127.0.0.1:{receiver.port}{self.path}")
                self.end_headers()

            def do_GET(self):  # image URLs
                if self.path.startswith("/hang"):
                    time.sleep(60)
                    return
                if self.path.startswith("/trickle"):  # a byte every 0.2 s, for a minute: under every read timeout
                    trickle(self, headers_too="headers" in self.path)
                    return
                if self.path in receiver.files:
                    body = receiver.files[self.path]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path.startswith("/big"):
                    self.send_response(200)
                    self.send_header("Content-Length", str(5 * 2**20))
                    self.end_headers()
                    self.wfile.write(b"\0" * (5 * 2**20))
                    return
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def for_prediction(self, path):
        return [body for p, body, _ in self.events if p == path]

    def wait_final(self, path, timeout=900):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            bodies = self.for_prediction(path)
            if bodies and bodies[-1]["status"] in ("succeeded", "failed", "canceled"):
                return bodies
            time.sleep(0.1)
        raise TimeoutError(f"no final webhook at {path}: {self.for_prediction(path)}")

    def wait_logs(self, path, text, timeout=600):
        """Until a webhook at `path` carries `text` in its logs (progress before acting on a run)."""
        deadline = time.monotonic() + timeout
        while not any(text in (body.get("logs") or "") for body in self.for_prediction(path)):
            assert time.monotonic() < deadline, f"no {text!r} in the webhooks at {path}"
            time.sleep(0.1)


def wait_idle(server, timeout=300):
    deadline = time.monotonic() + timeout
    while server.health() != "READY" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.health() == "READY"
