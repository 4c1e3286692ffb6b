"""The real Cog HTTP server (`python -m cog.server.http`, the image's entry point) in a subprocess."""

import base64
import io

import pytest
import requests
from PIL import Image

from scripts.cog_server import CogServer
from tests.conftest import drawing, png_bytes


def data_uri(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with CogServer("canny", log_path=tmp_path_factory.mktemp("cog") / "server.log") as running:
        yield running


def test_health_check_is_ready(server):
    assert requests.get(f"{server.url}/health-check", timeout=10).json()["status"] == "READY"


def test_start_up_says_tiny_weights_are_served(server):
    assert "TINY RANDOM-WEIGHT" in server.log()


def test_openapi_schema_has_the_jagilley_inputs(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    inputs = schema["components"]["schemas"]["Input"]
    props = inputs["properties"]
    assert sorted(inputs["required"]) == ["image", "prompt"]
    assert list(props) == [
        "image", "prompt", "num_samples", "image_resolution", "ddim_steps", "scale", "seed", "eta",
        "a_prompt", "n_prompt", "low_threshold", "high_threshold",
    ]
    assert props["image"]["format"] == "uri"
    assert props["ddim_steps"]["default"] == 20 and props["ddim_steps"]["minimum"] == 1
    assert props["scale"]["default"] == 9.0
    assert props["low_threshold"]["default"] == 100 and props["high_threshold"]["default"] == 200
    enums = schema["components"]["schemas"]
    assert enums["num_samples"]["enum"] == ["1", "4"] and props["num_samples"]["default"] == "1"
    assert enums["image_resolution"]["enum"] == ["256", "512", "768"]
    assert "default" not in props["seed"] or props["seed"]["default"] is None
    assert schema["components"]["schemas"]["Output"]["type"] == "array"


def test_sync_prediction_returns_the_map_then_the_sample(server):
    response = server.predict(
        {"image": data_uri(png_bytes(drawing())), "prompt": "a house", "image_resolution": "256", "ddim_steps": 2, "seed": 7}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    images = [decode(uri) for uri in body["output"]]
    assert [img.size for img in images] == [(320, 256), (320, 256)]
    assert "Using seed: 7" in body["logs"]
    assert "TINY RANDOM-WEIGHT" in body["logs"]


def test_four_samples_over_http(server):
    body = server.predict(
        {"image": data_uri(png_bytes(drawing(mode="RGBA"))), "prompt": "x", "num_samples": "4", "image_resolution": "256", "ddim_steps": 1}
    ).json()
    assert body["status"] == "succeeded", body.get("error")
    assert len(body["output"]) == 5
    assert "Using seed: " in body["logs"]


@pytest.mark.parametrize(
    "bad",
    [
        {"ddim_steps": -3},
        {"num_samples": "7"},
        {"image_resolution": "1024"},
        {"scale": 0},
        {"low_threshold": 256},
        {"seed": -2},
        {"image": "not a url"},
        {"prompt": None},
    ],
)
def test_bad_input_gets_422(server, bad):
    inputs = {"image": data_uri(png_bytes(drawing())), "prompt": "a house"} | bad
    inputs = {k: v for k, v in inputs.items() if v is not None}
    response = server.predict(inputs)
    assert response.status_code == 422, response.text


def test_undecodable_image_fails_with_a_message_and_the_server_survives(server):
    body = server.predict({"image": data_uri(b"not an image at all"), "prompt": "x"}).json()
    assert body["status"] == "failed"
    assert "could not be decoded" in body["error"]
    ok = server.predict({"image": data_uri(png_bytes(drawing())), "prompt": "x", "image_resolution": "256", "ddim_steps": 1})
    assert ok.json()["status"] == "succeeded"
