"""Cancel at every stage of a prediction or training, and stop signals, through the real Cog server
(cog_base/cancel.py, cog_base/serving.py): a cancel the server accepts always ends `canceled`, leaves
the server READY and serving, and a stop leaves none of a client's files behind."""

import signal
import time
import uuid

import pytest
import requests

from scripts.cog_server import CogServer
from tests.conftest import Receiver, wait_idle
from tests.test_serving import LONG, QUICK, post_async

URL_DEADLINE_S = 3  # CONTROLNET_IMAGE_TIMEOUT_S and CONTROLNET_ASSET_TIMEOUT_S of this module's server
STRAIGHT_AFTER_PUT_TRIALS = 10


@pytest.fixture(scope="module")
def receiver():
    return Receiver()


@pytest.fixture(scope="module")
def canny(tmp_path_factory):
    """canny with tight URL bounds and a temp folder of its own."""
    tmp = tmp_path_factory.mktemp("server-tmp")
    server = CogServer("canny", log_path=tmp_path_factory.mktemp("logs") / "canny.log", env={
        "CONTROLNET_IMAGE_TIMEOUT_S": str(URL_DEADLINE_S), "CONTROLNET_ASSET_TIMEOUT_S": str(URL_DEADLINE_S),
        "CONTROLNET_ASSET_CACHE": str(tmp_path_factory.mktemp("assets")), "TMPDIR": str(tmp),
    })
    server.tmp = tmp
    with server:
        yield server


def cancel(server, prediction_id, route="predictions"):
    return requests.post(f"{server.url}/{route}/{prediction_id}/cancel", timeout=10)


def client_files(tmp) -> list:
    """What the server keeps of clients in its temp folder: input folders, and outputs other than the
    last prediction's (kept until the next one)."""
    return [p for p in tmp.rglob("*") if p.is_file() and not p.parent.name.startswith("controlnet-canny-")]


def test_a_cancel_straight_after_the_put_always_cancels(canny, receiver):
    """Cog dropped a cancel that came before its worker ran the prediction: 13 of 30 ran to the end."""
    for trial in range(STRAIGHT_AFTER_PUT_TRIALS):
        prediction_id = uuid.uuid4().hex
        path = f"/hook/{prediction_id}"
        assert post_async(canny, LONG, receiver.url(path), prediction_id=prediction_id).status_code == 202
        assert cancel(canny, prediction_id).status_code == 200
        final = receiver.wait_final(path, timeout=120)[-1]
        assert final["status"] == "canceled", (trial, final["status"], final.get("error"))
        wait_idle(canny, timeout=60)
    assert canny.predict(QUICK).json()["status"] == "succeeded"


@pytest.mark.parametrize("field", ["image", "lora_url"])
def test_a_cancel_during_an_input_download_cancels_it(canny, receiver, field):
    """Image URLs download in the HTTP process (Cog did not interrupt them: `failed` 41 s later), LoRAs
    in the worker."""
    prediction_id = uuid.uuid4().hex
    path = f"/hook/{prediction_id}"
    inputs = {**QUICK, field: receiver.url("/trickle")}
    assert post_async(canny, inputs, receiver.url(path), prediction_id=prediction_id).status_code == 202
    time.sleep(1)  # the download is under way; the host sends a byte every 0.2 s
    asked = time.monotonic()
    assert cancel(canny, prediction_id).status_code == 200
    final = receiver.wait_final(path, timeout=60)[-1]
    assert final["status"] == "canceled", final.get("error")
    assert time.monotonic() - asked < URL_DEADLINE_S  # not the download's own end at the deadline
    wait_idle(canny, timeout=60)
    assert client_files(canny.tmp) == []
    assert canny.predict(QUICK).json()["status"] == "succeeded"


@pytest.mark.parametrize("field", ["image", "lora_url"])
def test_a_trickling_host_is_cut_off_at_the_deadline(canny, receiver, field):
    """The bound was checked between 1 MiB chunks: a byte a second held the server as long as it went on."""
    started = time.monotonic()
    body = canny.predict({**QUICK, field: receiver.url("/trickle")}).json()
    assert body["status"] == "failed" and f"took over {URL_DEADLINE_S}s" in body["error"], body.get("error")
    assert time.monotonic() - started < URL_DEADLINE_S + 10
    assert str(canny.tmp) not in body["error"] and "Traceback" not in (body.get("logs") or "")
    wait_idle(canny, timeout=60)
    assert client_files(canny.tmp) == []
