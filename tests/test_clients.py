"""What real jagilley clients send: `image_resolution` and `num_samples` as JSON integers (768, 4). A choice
input whose choices are all numbers takes an integer that is one of them as that choice, over HTTP (the
guard rewrites it before Cog's schema validates) and in generate(); anything else keeps its 422 / error."""

import functools
import threading
import time
import uuid

import numpy as np
import pytest
import requests

from cog_base.inputs import NUMERIC_CHOICES
from scripts.cog_server import CogServer
from tests.conftest import Receiver, data_uri, decode, drawing, png_bytes, set_up

IMAGE = data_uri(png_bytes(drawing()))
QUICK = {"image": IMAGE, "prompt": "a house", "ddim_steps": 1, "seed": 5}
predictor = functools.cache(set_up)


def test_the_numeric_choice_inputs_are_the_two_jagilley_sends_as_numbers():
    assert NUMERIC_CHOICES == {"num_samples": ("1", "4"), "image_resolution": ("256", "512", "768")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with CogServer("canny", log_path=tmp_path_factory.mktemp("logs") / "canny.log") as running:
        yield running


def test_integers_for_numeric_choices_are_taken_over_http_as_those_choices(server):
    as_numbers = server.predict({**QUICK, "image_resolution": 256, "num_samples": 4})
    assert as_numbers.status_code == 200, as_numbers.text[:400]
    body = as_numbers.json()
    assert body["status"] == "succeeded", body.get("error")
    assert body["input"]["image_resolution"] == "256" and body["input"]["num_samples"] == "4"
    as_strings = server.predict({**QUICK, "image_resolution": "256", "num_samples": "4"}).json()
    assert len(body["output"]) == 5  # the map, then 4 samples
    # The same request as with the strings: the same pixels.
    for ours, theirs in zip(body["output"], as_strings["output"], strict=True):
        np.testing.assert_array_equal(np.asarray(decode(ours)), np.asarray(decode(theirs)))
    assert decode(body["output"][1]).size == (320, 256)


@pytest.mark.parametrize("name, value", [
    ("image_resolution", 700), ("image_resolution", "abc"), ("image_resolution", 768.0), ("image_resolution", True),
    ("image_resolution", "0768"), ("num_samples", 2), ("num_samples", [4]), ("scheduler", 1),
])
def test_anything_else_still_gets_422(server, name, value):
    response = server.predict({**QUICK, name: value})
    assert response.status_code == 422, response.text[:400]
    assert name in response.text
    assert server.health() == "READY"


def test_an_async_put_takes_integers_too(server):
    receiver = Receiver()
    prediction_id = f"c{uuid.uuid4().hex}"
    response = requests.put(
        f"{server.url}/predictions/{prediction_id}", headers={"Prefer": "respond-async"}, timeout=30,
        json={"input": {**QUICK, "image_resolution": 256}, "webhook": receiver.url(f"/hook/{prediction_id}"),
              "webhook_events_filter": ["completed"]})
    assert response.status_code == 202, response.text[:400]
    final = receiver.wait_final(f"/hook/{prediction_id}", timeout=300)[-1]
    assert final["status"] == "succeeded", final.get("error")
    assert final["id"] == prediction_id and final["input"]["image_resolution"] == "256"


def test_generate_takes_integers_for_numeric_choices_and_nothing_else(tmp_path):
    p = predictor("canny")
    path = tmp_path / "drawing.png"
    drawing().save(path)
    files = p.generate(image=path, prompt="a house", image_resolution=256, num_samples=4, ddim_steps=1, seed=5)
    assert len(files) == 5
    for value in (700, 768.0, True, "abc"):
        with pytest.raises(ValueError, match="image_resolution must be one of 256, 512, 768"):
            p.generate(image=path, prompt="a house", image_resolution=value, ddim_steps=1)
    with pytest.raises(ValueError, match="controlnet_version must be one of 1.0, 1.1"):
        p.generate(image=path, prompt="a house", controlnet_version=1.1, ddim_steps=1)  # not a numeric choice


def test_without_a_webhook_a_sync_put_with_the_clients_own_id_answers_with_the_result_and_can_be_cancelled(server):
    """Cog 0.16 has no GET /predictions/{id}: a client without a webhook sends a sync PUT under an id it chose,
    which it can cancel from another connection (docs/serving.md, the asynchronous flow)."""
    prediction_id = f"c{uuid.uuid4().hex}"
    answer = requests.put(f"{server.url}/predictions/{prediction_id}", json={"input": QUICK}, timeout=300)
    assert answer.status_code == 200 and answer.json()["status"] == "succeeded" and answer.json()["id"] == prediction_id
    assert len(answer.json()["output"]) == 2
    assert requests.get(f"{server.url}/predictions/{prediction_id}", timeout=10).status_code == 405
    long_id, answers = f"c{uuid.uuid4().hex}", []
    slow = {**QUICK, "image_resolution": "768", "ddim_steps": 100}
    sender = threading.Thread(target=lambda: answers.append(
        requests.put(f"{server.url}/predictions/{long_id}", json={"input": slow}, timeout=600)))
    sender.start()
    deadline = time.monotonic() + 120
    while requests.get(f"{server.url}/health-check", timeout=10).json()["status"] != "BUSY":
        assert time.monotonic() < deadline, "the prediction never started"
        time.sleep(0.1)
    assert requests.post(f"{server.url}/predictions/{long_id}/cancel", timeout=30).status_code == 200
    sender.join(timeout=120)
    assert answers and answers[0].json()["status"] == "canceled", answers and answers[0].text[:300]
