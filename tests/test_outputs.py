"""Outputs and the HTTP path around them (issue 18): output_format / output_quality, a data: URI input
decoded once and not echoed back, and a request sent on the previous prediction's final webhook taken
(not refused with 409). Through the real Cog server where the server is what is tested; the session's
running canny server is reused."""

import base64
import http.server
import io
import json
import threading
import urllib.request
import uuid

import numpy as np
import pytest
import requests
from PIL import Image

from cog_base.cog016 import serving
from predictors.canny.predict import Predictor
from tests.conftest import drawing, png_bytes

IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes(drawing())).decode()
QUICK = {"image": IMAGE, "prompt": "a house", "image_resolution": "256", "ddim_steps": 1, "seed": 3}
MIMES = {"png": "image/png", "webp": "image/webp", "jpg": "image/jpeg"}
PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}


@pytest.fixture(scope="module")
def predictor():
    p = Predictor()
    p.setup()
    return p


def pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def opened(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


# -- output_format, output_quality ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
def test_output_format_sets_each_files_type_and_extension(predictor, image_file, fmt):
    paths = predictor.generate(image=image_file(), prompt="a house", image_resolution="256", ddim_steps=1, seed=3,
                               output_format=fmt)
    assert len(paths) == 2  # the control map, then the sample
    for path in paths:
        assert path.suffix == f".{fmt}"
        with Image.open(path) as img:
            assert img.format == PIL_FORMATS[fmt] and img.size == (320, 256)


def test_png_is_the_default_and_lossless_and_webp_jpg_are_near_it(predictor, image_file):
    inputs = dict(image=image_file(), prompt="a house", image_resolution="256", ddim_steps=1, seed=3)
    # A prediction's files last until the next one: read each at once.
    default = predictor.generate(**inputs)
    assert [p.suffix for p in default] == [".png", ".png"]
    reference = [pixels(p) for p in default]
    png = [pixels(p) for p in predictor.generate(**inputs, output_format="png", output_quality=1)]  # png ignores it
    assert all((a == b).all() for a, b in zip(reference, png))
    # The same images, lossy: close to the PNG's pixels, not equal.
    webp = [pixels(p).astype(int) for p in predictor.generate(**inputs, output_format="webp", output_quality=100)]
    assert all(0 < np.abs(a - b).mean() < 20 for a, b in zip(reference, webp))


@pytest.mark.parametrize("fmt", ["webp", "jpg"])
def test_output_quality_changes_the_size_of_lossy_files(predictor, image_file, fmt):
    inputs = dict(image=image_file(), prompt="a house", image_resolution="256", ddim_steps=1, seed=3, output_format=fmt)
    low = [p.stat().st_size for p in predictor.generate(**inputs, output_quality=5)]
    high = [p.stat().st_size for p in predictor.generate(**inputs, output_quality=95)]
    assert all(a < b for a, b in zip(low, high)), (low, high)


@pytest.mark.parametrize("fmt", ["webp", "jpg"])
def test_the_server_answers_in_the_format_asked(servers, fmt):
    body = servers["canny"].predict({**QUICK, "output_format": fmt, "output_quality": 50}).json()
    assert body["status"] == "succeeded", body.get("error")
    assert [uri.split(";", 1)[0] for uri in body["output"]] == [f"data:{MIMES[fmt]}"] * 2
    assert [opened(uri).format for uri in body["output"]] == [PIL_FORMATS[fmt]] * 2


@pytest.mark.parametrize("inputs", [{"output_format": "gif"}, {"output_format": "PNG"}, {"output_quality": 0},
                                    {"output_quality": 101}, {"output_quality": "high"}])
def test_a_bad_output_format_or_quality_gets_422(servers, inputs):
    response = servers["canny"].predict({**QUICK, **inputs})
    assert response.status_code == 422
    assert list(inputs)[0] in json.dumps(response.json()["detail"])


def test_a_bad_output_format_in_process_says_what_to_send(predictor, image_file):
    with pytest.raises(ValueError, match="output_format must be one of png, webp, jpg"):
        predictor.generate(image=image_file(), prompt="a house", output_format="gif")


# -- the input: decoded once, not echoed ----------------------------------------------------------

def test_a_data_uri_input_is_decoded_once(monkeypatch):
    from cog import types as cog_types

    decodes = []
    a2b = serving.binascii.a2b_base64
    monkeypatch.setattr(serving.binascii, "a2b_base64", lambda data, **kwargs: decodes.append(len(data)) or a2b(data, **kwargs))
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("decoded through urllib"))
    path = cog_types.Path.validate(IMAGE)
    assert len(decodes) == 1  # Cog's own validator decoded it twice: once for the name, once for the bytes
    assert path.filename == "file.png" and path.convert().read_bytes() == png_bytes(drawing())
    path.unlink()


@pytest.mark.parametrize("uri", [
    "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256))).decode(),
    "data:Image/JPEG;base64,/9j/4AAQ",
    "data:image/webp;name=a.webp;base64,UklGRg==",
    "data:;base64,aGVsbG8=",
    "data:image/png;base64,aGVs\nbG8=",
    "data:image/png;base64,aGVsbG8%3D",
    "data:text/plain,hello%20world",
    "data:,plain",
])
def test_data_uris_decode_as_urllib_decodes_them(uri):
    with urllib.request.urlopen(uri) as expected:
        assert serving._decode_data_uri(uri) == (expected.headers.get_content_type(), expected.read())


def test_the_answer_does_not_echo_a_large_input(servers):
    big = drawing(1200, 900)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(big)).decode()
    body = servers["canny"].predict({**QUICK, "image": uri}).json()
    assert body["status"] == "succeeded", body.get("error")
    echoed = body["input"]["image"]
    assert echoed.startswith("data:text/plain,") and len(echoed) < 200 and str(len(uri)) in echoed
    assert body["input"]["prompt"] == "a house"  # the rest of the input is echoed as sent
    # A small input is still echoed whole.
    assert len(serving._short_echo({"image": "data:image/png;base64,AAAA"})["image"]) == 26


# -- the answer's serialisation, the guard's parse ------------------------------------------------

ANSWER = {"id": "p1", "input": {"prompt": "une maison, été 🏠", "seed": 3, "scale": 9.0, "image": "data:text/plain,x"},
          "output": ["data:image/png;base64," + base64.b64encode(png_bytes(drawing())).decode()] * 2,
          "logs": "step 1/1\n", "error": None, "status": "succeeded", "metrics": {"predict_time": 0.123456789},
          "created_at": "2026-12-01T15:00:00.000000+00:00"}


def test_cogs_answers_are_rendered_by_orjson_with_starlettes_bytes(monkeypatch):
    """Cog's sync answers (data: URIs) went through the stdlib's character-by-character scan: 53 ms
    at 4 samples of 1024x768 (docs/benchmarks.md). Same bytes, not the stdlib's encoder."""
    from starlette import responses
    from starlette.responses import JSONResponse

    main = type("CogHttpMain", (), {"Server": object, "JSONResponse": JSONResponse})
    monkeypatch.setattr(serving, "_patch_request_json", lambda: None)
    monkeypatch.setattr(serving.signal, "signal", lambda *a: None)
    serving._patch_http_main(main)
    expected = JSONResponse(ANSWER).body
    monkeypatch.setattr(responses.json, "dumps", lambda *a, **k: pytest.fail("rendered by the stdlib's json"))
    assert main.JSONResponse(ANSWER).body == expected
    assert main.JSONResponse(ANSWER).headers["content-length"] == str(len(expected))


def test_what_orjson_refuses_is_rendered_as_starlette_renders_it(monkeypatch):
    from starlette.responses import JSONResponse

    fast = serving._fast_json_response(JSONResponse)
    for content in ({1: "an int key"}, {"big": 2**70}):
        assert fast(content).body == JSONResponse(content).body
    assert json.loads(serving._json_bytes({"big": 2**70})) == {"big": 2**70}
    assert json.loads(serving._json_bytes(ANSWER)) == ANSWER


@pytest.mark.parametrize("raw", [
    b'{"input": {"image": "data:,x", "scale": 9.5, "seed": 12345678901234567890, "n": [1, 2.5e-3, -0.0]}, "webhook": null}',
    b'{"input": {}, "id": "x\\u00e9\\ud83c\\udfe0"}',
])
def test_the_guard_hands_fastapi_the_body_it_parsed(monkeypatch, raw):
    """FastAPI parsed each body a second time (~1.2 ms for a 0.8 MB image); what it is handed is what
    json.loads makes of the bytes."""
    import asyncio

    from starlette import requests as starlette_requests
    from starlette.requests import Request

    seen = {}
    loads = json.loads

    async def app(scope, receive, send):
        request = Request(scope, receive)
        monkeypatch.setattr(starlette_requests.json, "loads", lambda *a, **k: pytest.fail("parsed again"))
        seen["body"] = await request.json()
        monkeypatch.setattr(starlette_requests.json, "loads", loads)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    monkeypatch.setattr(Request, "json", Request.json)  # undone after the test
    serving._patch_request_json()
    scope = {"type": "http", "path": "/predictions", "method": "POST", "headers": [], "query_string": b""}
    messages = iter([{"type": "http.request", "body": raw, "more_body": False}])
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    asyncio.run(serving.Guard(app)(scope, receive, send))
    assert sent[0]["status"] == 204
    assert seen["body"] == json.loads(raw) and json.dumps(seen["body"]) == json.dumps(json.loads(raw))


# -- the 409 race ------------------------------------------------------------------------------------

def test_a_request_sent_on_the_final_webhook_is_taken(servers):
    """Each final webhook sends the next prediction at once, from the webhook's handler: none may get
    409 (Cog sent the final webhook before it marked itself idle). Bounded: 10 control-map-only predictions."""
    server, rounds = servers["canny"], 10
    statuses, done = [], threading.Event()

    def send(path):
        body = {"input": {**QUICK, "preprocess_only": True}, "webhook_events_filter": ["completed"],
                "webhook": f"http://127.0.0.1:{httpd.server_address[1]}{path}"}
        return requests.post(f"{server.url}/predictions", json=body, headers={"Prefer": "respond-async"}, timeout=30)

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            final = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            if final.get("status") != "succeeded" or len(statuses) >= rounds:
                done.set()
            else:
                statuses.append(send(f"/race/{uuid.uuid4().hex}").status_code)
                if statuses[-1] != 202:
                    done.set()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        assert send("/race/first").status_code == 202
        assert done.wait(300), f"the loop stopped: {statuses}"
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert statuses == [202] * rounds
