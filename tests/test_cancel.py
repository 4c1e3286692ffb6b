"""Cancel at every stage of a prediction or training, and stop signals, through the real Cog server
(cog_base/cog016/cancel.py, cog_base/cog016/serving.py): a cancel the server accepts always ends `canceled`, leaves
the server READY and serving, and a stop leaves none of a client's files behind."""

import json
import signal
import sys
import threading
import time
import types
import uuid

import pytest
import requests

from scripts.cog_server import CogServer, group_alive
from tests.conftest import Receiver, data_uri, wait_idle
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


def test_a_stop_during_a_prediction_leaves_none_of_its_files(canny):
    """Last of the tests on this module's canny server: it stops it. SIGTERM left the prediction's input
    folder behind (Cog removes it only when the prediction ends)."""
    threading.Thread(target=lambda: canny.predict(LONG, timeout=120), daemon=True).start()
    wait_busy(canny)
    assert [p for p in canny.tmp.iterdir() if p.name.startswith("cog-input-")], "no input folder to remove"
    assert_stops_cleanly(canny)


# -- training ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A fresh train-mode custom server (as `cog train` runs the image), with a temp folder of its own."""
    tmp = tmp_path_factory.mktemp("train-tmp")
    server = CogServer("custom", mode="train", log_path=tmp_path_factory.mktemp("logs") / "train.log",
                       env={"TMPDIR": str(tmp)})
    server.tmp = tmp
    with server:
        yield server


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from tests.test_train import toy_files, write_archive

    archive = write_archive(tmp_path_factory.mktemp("pairs") / "pairs.zip", toy_files())
    return data_uri(archive.read_bytes(), "application/zip")


def training(pairs, **inputs):
    return {"pairs": pairs, "max_train_steps": 2, "resolution": 64, "train_batch_size": 2, "seed": 3,
            "validation_every": 0, "mixed_precision": "no", **inputs}


def put_training(server, training_id, inputs, receiver):
    body = {"input": inputs, "webhook": receiver.url(f"/hook/{training_id}")}
    response = requests.put(f"{server.url}/trainings/{training_id}", json=body, headers={"Prefer": "respond-async"},
                            timeout=30)
    assert response.status_code == 202, response.text


def test_a_cancelled_first_training_leaves_the_worker_able_to_train(trainer, receiver, pairs):
    """The first training's cancel came while train() was importing torch: every later training failed
    (`cannot initialize type "RpcBackendOptions"`) while /health-check said READY."""
    put_training(trainer, "first", training(pairs, max_train_steps=100000), receiver)
    time.sleep(0.5)
    assert cancel(trainer, "first", route="trainings").status_code == 200
    assert receiver.wait_final("/hook/first", timeout=120)[-1]["status"] == "canceled"
    wait_idle(trainer, timeout=60)
    body = trainer.train(training(pairs), timeout=300).json()
    assert body["status"] == "succeeded", body.get("error")


def test_a_cancel_straight_after_a_training_put_cancels(trainer, receiver, pairs):
    for trial in range(3):
        training_id = f"straight-{trial}"
        put_training(trainer, training_id, training(pairs, max_train_steps=100000), receiver)
        assert cancel(trainer, training_id, route="trainings").status_code == 200
        assert receiver.wait_final(f"/hook/{training_id}", timeout=120)[-1]["status"] == "canceled"
        wait_idle(trainer, timeout=60)


def test_a_non_finite_number_in_a_training_body_gets_422(trainer, pairs):
    raw = json.dumps({"input": training(pairs)})[:-2] + ', "learning_rate": NaN}}'
    response = requests.post(f"{trainer.url}/trainings", data=raw, headers={"content-type": "application/json"},
                             timeout=30)
    assert response.status_code == 422 and "input.learning_rate is NaN" in response.json()["detail"][0]["msg"]


def test_a_stop_during_a_training_leaves_none_of_the_client_data(trainer, receiver, pairs):
    """Last on the training server: it stops it. SIGTERM took the 9 s watchdog and left the unpacked pairs."""
    put_training(trainer, "stopped", training(pairs, max_train_steps=100000), receiver)
    receiver.wait_logs("/hook/stopped", "step 1/")
    assert list(trainer.tmp.iterdir()), "nothing of the training's in the temp folder to remove"
    assert_stops_cleanly(trainer)


# -- helpers ----------------------------------------------------------------------------------------

def wait_busy(server, timeout=60):
    deadline = time.monotonic() + timeout
    while server.health() != "BUSY":
        assert time.monotonic() < deadline, "never BUSY"
        time.sleep(0.1)


def assert_stops_cleanly(server):
    """SIGTERM to the server process, as `docker stop` sends it: it ends without the watchdog, and nothing
    it held for a client is left in its temp folder."""
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=30)
    deadline = time.monotonic() + 5
    while group_alive(server.process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(server.process.pid), "a worker outlived the server"
    assert "after the stop signal; exiting now" not in server.log(), "the watchdog had to end it"
    # torch's compile cache (torchinductor_<user>) is the server's own, not a client's.
    assert [p for p in server.tmp.rglob("*") if not p.relative_to(server.tmp).parts[0].startswith("torchinductor_")] == []


# -- the worker's cancel handling, on its own (cog_base/cog016/cancel.py) ----------------------------------

@pytest.fixture
def child():
    """Cog's prediction-worker object, as cog_base installs it, running a prediction (not started)."""
    from cog.server.worker import _ChildWorker

    import cog_base  # noqa: F401  (installs the patches)

    from cog.server.exceptions import CancelationException

    from cog_base.cog016 import cancel

    worker = object.__new__(_ChildWorker)
    worker._cancelable, worker._cancel, worker._early_signal, worker._raised_at = True, "none", False, 0.0
    # What its loop sets up; the follow-up's signals to this process are noted, not acted on.
    previous = signal.signal(signal.SIGUSR2, lambda *args: None), sys.unraisablehook
    sys.unraisablehook = cancel._unraisable_hook(worker, sys.unraisablehook, CancelationException)
    try:
        yield worker
    finally:
        worker._cancelable = False  # ends its follow-up thread
        time.sleep(2 * cancel.RETRY_S)
        signal.signal(signal.SIGUSR2, previous[0])
        sys.unraisablehook = previous[1]


def test_a_cancel_inside_a_lora_load_or_an_import_waits_for_its_end(child, tmp_path, monkeypatch):
    """A cancel raised inside load_lora_weights read as a bad LoRA (9 of 40); inside `import torch` it
    poisoned the worker."""
    from cog.server.exceptions import CancelationException

    from models import critical

    with critical.section():
        child._signal_handler(signal.SIGUSR1, sys._getframe())  # does not raise
    assert child._cancel == "wanted"
    (tmp_path / "slow_module.py").write_text(
        "import sys\nsys.modules['tests_cancel_child']._signal_handler(10, sys._getframe())\nDONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "tests_cancel_child", child)
    import slow_module  # the handler ran inside its import and did not raise

    assert slow_module.DONE
    with pytest.raises(CancelationException):
        child._signal_handler(signal.SIGUSR2, sys._getframe())  # the retry, outside both
    assert child._cancel == "raised"
    child._signal_handler(signal.SIGUSR2, sys._getframe())  # once only: cleanup is not cut


def test_an_error_that_follows_a_cancel_ends_canceled(child):
    """diffusers' loader wrapped the cancel as `not a LoRA ... (CancelationException)`."""
    from cog.server.eventtypes import Cancel
    from cog.server.exceptions import CancelationException

    from cog_base.cog016 import cancel

    def predict():
        try:
            child._signal_handler(signal.SIGUSR1, sys._getframe())
        except Exception as exc:
            raise ValueError(f"lora_url is not a LoRA ({type(exc).__name__})") from None

    with pytest.raises(CancelationException):
        cancel._started(child, "t", predict, Cancel, CancelationException)
    assert child._cancel == "raised"


def test_a_cancel_python_dropped_is_raised_again(child):
    """Raised inside a garbage-collector callback, a cancel is printed and dropped: a training ran on."""
    from cog.server.exceptions import CancelationException

    with pytest.raises(CancelationException) as raised:
        child._signal_handler(signal.SIGUSR1, sys._getframe())
    sys.unraisablehook(types.SimpleNamespace(exc_value=raised.value, exc_type=CancelationException,
                                             exc_traceback=None, err_msg=None, object=None))
    assert child._cancel == "wanted"  # the follow-up signals it again

