"""The serving contract through the real Cog server: async predictions and webhooks, cancellation,
idempotent PUT, 409 while busy, uploads, malformed bodies, webhooks that fail, image URLs that fail,
the private-address switch, who may stop the server, and clean stops."""

import base64
import os
import re
import signal
import socket
import threading
import time
import uuid

import pytest
import requests

from scripts.cog_server import CogServer, free_port, group_alive
from tests.conftest import Receiver, decode, drawing, png_bytes, wait_idle

IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes(drawing())).decode()
QUICK = {"image": IMAGE, "prompt": "a house", "image_resolution": "256", "ddim_steps": 2, "seed": 3}
# Long enough on tiny CPU models to watch, cancel and collide with (~0.1-0.5 s per step).
LONG = {"image": IMAGE, "prompt": "a house", "image_resolution": "768", "ddim_steps": 100, "seed": 3}


@pytest.fixture(scope="module")
def receiver():
    return Receiver()


@pytest.fixture(scope="module")
def special(receiver, tmp_path_factory):
    """canny with tight URL bounds, uploads to the receiver, /shutdown refused and its own temp folder;
    and a second one with the private-address switch on."""
    tmp = tmp_path_factory.mktemp("server-tmp")
    logs = tmp_path_factory.mktemp("logs")
    main = CogServer("canny", log_path=logs / "special.log", args=["--upload-url", receiver.url("/upload/")], env={
        "CONTROLNET_IMAGE_TIMEOUT_S": "3", "CONTROLNET_IMAGE_MAX_MB": "1", "CONTROLNET_SHUTDOWN_FROM": "none",
        "TMPDIR": str(tmp),
    })
    guarded = CogServer("canny", log_path=logs / "guarded.log", env={"CONTROLNET_BLOCK_PRIVATE_URLS": "1"})
    for server in (main, guarded):
        server.launch()
    try:
        for server in (main, guarded):
            server.wait_ready()
        main.tmp = tmp
        yield main, guarded
    finally:
        for server in (main, guarded):
            server.stop()


def post_async(server, inputs, webhook, prediction_id=None, events=None):
    body = {"input": inputs, "webhook": webhook}
    if events:
        body["webhook_events_filter"] = events
    if prediction_id:
        return requests.put(f"{server.url}/predictions/{prediction_id}", json=body,
                            headers={"Prefer": "respond-async"}, timeout=30)
    return requests.post(f"{server.url}/predictions", json=body, headers={"Prefer": "respond-async"}, timeout=30)


def seconds_per_step(logs: str) -> float:
    """From the last progress line, `step k/N  X.Xs elapsed  ...`."""
    step, elapsed = re.findall(r"step (\d+)/\d+\s+([\d.]+)s elapsed", logs)[-1]
    return float(elapsed) / int(step)


# -- malformed requests -----------------------------------------------------------------------------

@pytest.mark.parametrize("body", ["{}", "null", '{"input": null}', "[]", '"text"', "not json", ""])
def test_a_malformed_body_gets_422_that_says_what_to_send(servers, body):
    server = servers["canny"]
    for response in (
        requests.post(f"{server.url}/predictions", data=body, headers={"content-type": "application/json"}, timeout=30),
        requests.put(f"{server.url}/predictions/x{uuid.uuid4().hex}", data=body, headers={"content-type": "application/json"}, timeout=30),
    ):
        assert response.status_code == 422, response.text
        assert '"input"' in response.json()["detail"][0]["msg"] or "JSON" in response.json()["detail"][0]["msg"]
    assert server.health() == "READY"


@pytest.mark.parametrize("value, where", [
    ("NaN", "input.scale is NaN"), ("Infinity", "input.scale is Infinity"), ("-Infinity", "input.scale is -Infinity"),
    ("1e999", "input.scale is 1e999"), ('[1, {"deep": NaN}]', "input.scale[1].deep is NaN"),
])
def test_a_non_finite_number_anywhere_in_a_body_gets_422(special, value, where):
    """Python's JSON takes the bare NaN and Infinity tokens; Cog answered them with 500."""
    main, _ = special
    raw = '{"input": {"image": "%s", "prompt": "a house", "scale": %s}}' % (IMAGE, value)
    for response in (
        requests.post(f"{main.url}/predictions", data=raw, headers={"content-type": "application/json"}, timeout=30),
        requests.put(f"{main.url}/predictions/x{uuid.uuid4().hex}", data=raw, headers={"content-type": "application/json"},
                     timeout=30),
    ):
        assert response.status_code == 422, response.text[:300]
        assert response.json()["detail"][0]["msg"] == f"{where}, not a finite number; send a finite number"
    assert main.health() == "READY"


@pytest.mark.parametrize("field, where", [
    ('"prompt": "a \\ud83c house"', "input.prompt holds a lone surrogate (\\ud83c)"),
    ('"prompt": "a house", "n_prompt": ["x", "\\udfe0"]', "input.n_prompt[1] holds a lone surrogate (\\udfe0)"),
    ('"prompt": "a house", "\\ud800": 1', "a name in input holds a lone surrogate (\\ud800)"),
])
def test_a_lone_surrogate_anywhere_in_a_body_gets_422(special, field, where):
    """JSON lets a string hold half of a surrogate pair; it is not text: the tokenizer raised on it (a
    failed prediction, the worker's self-test) and Cog's answer echoing it could not be encoded (500)."""
    main, _ = special
    raw = '{"input": {"image": "%s", %s}}' % (IMAGE, field)
    response = requests.post(f"{main.url}/predictions", data=raw, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 422, response.text[:300]
    assert response.json()["detail"][0]["msg"].startswith(where)
    # A surrogate pair (one character beyond U+FFFF) is text, and taken.
    paired = '{"input": {"image": "%s", "prompt": "a \\ud83c\\udfe0", "ddim_steps": 1, "image_resolution": "256"}}' % IMAGE
    response = requests.post(f"{main.url}/predictions", data=paired, headers={"content-type": "application/json"}, timeout=120)
    assert response.status_code == 200 and response.json()["status"] == "succeeded", response.text[:300]
    assert response.json()["input"]["prompt"] == "a \U0001f3e0"
    assert main.health() == "READY"


def test_shutdown_is_refused_where_the_policy_says_so(special):
    main, _ = special
    response = requests.post(f"{main.url}/shutdown", timeout=10)
    assert response.status_code == 403 and "CONTROLNET_SHUTDOWN_FROM" in response.json()["detail"]
    assert main.health() == "READY"


@pytest.mark.parametrize("policy, client, allowed", [
    ("loopback", "127.0.0.1", True), ("loopback", "::1", True), ("loopback", "::ffff:127.0.0.1", True),
    ("loopback", "172.17.0.1", False), ("loopback", "10.1.2.3", False), ("loopback", None, False),
    ("none", "127.0.0.1", False), ("any", "203.0.113.9", True),
])
def test_who_may_call_shutdown(monkeypatch, policy, client, allowed):
    """The policy behind the 403 above, for the addresses a real server sees: loopback from `make serve`,
    the Docker bridge from a published port, anything from a cluster network."""
    from cog_base.cog016 import serving

    monkeypatch.setenv("CONTROLNET_SHUTDOWN_FROM", policy)
    assert serving._shutdown_allowed({"client": (client, 5000) if client else None}) is allowed


# -- async predictions, webhooks, cancel, PUT, 409 ------------------------------------------------

def test_async_prediction_sends_its_events_in_order_with_progress_while_it_runs(servers, receiver):
    server = servers["canny"]
    path = f"/hook/{uuid.uuid4().hex}"
    inputs = {**LONG, "ddim_steps": 12}
    response = post_async(server, inputs, receiver.url(path))
    assert response.status_code == 202 and response.json()["status"] in ("starting", "processing")
    bodies = receiver.wait_final(path)
    statuses = [b["status"] for b in bodies]
    assert statuses[-1] == "succeeded" and set(statuses[:-1]) <= {"starting", "processing"}
    assert len(bodies[-1]["output"]) == 2
    # No --upload-url: the files themselves, as the sync answer gives them (Cog sent its temp paths).
    assert [decode(uri).size for uri in bodies[-1]["output"]] == [(1024, 768)] * 2  # short side to 768
    # Progress arrived before the end: a webhook still "processing" already carried step lines.
    assert any(b["status"] == "processing" and "step 1/12" in (b.get("logs") or "") for b in bodies[:-1])
    assert "Timings:" in bodies[-1]["logs"] and "Using seed: 3" in bodies[-1]["logs"]


def test_webhook_events_filter_sends_only_what_was_asked(servers, receiver):
    path = f"/hook/{uuid.uuid4().hex}"
    post_async(servers["canny"], QUICK, receiver.url(path), events=["completed"])
    receiver.wait_final(path)
    time.sleep(1)
    assert [b["status"] for b in receiver.for_prediction(path)] == ["succeeded"]


def test_cancel_ends_within_a_step_then_the_next_prediction_succeeds(servers, receiver):
    server = servers["canny"]
    prediction_id = uuid.uuid4().hex
    path = f"/hook/{prediction_id}"
    assert post_async(server, LONG, receiver.url(path), prediction_id=prediction_id).status_code == 202
    receiver.wait_logs(path, "step 1/")  # progress before cancelling
    # A second client while it runs: 409, written in the README.
    busy = server.predict(QUICK, timeout=30)
    assert busy.status_code == 409
    # The same id again is idempotent: the running prediction, not a new one.
    again = post_async(server, LONG, receiver.url(path), prediction_id=prediction_id)
    assert again.status_code == 202 and again.json()["id"] == prediction_id
    asked = time.monotonic()
    assert requests.post(f"{server.url}/predictions/{prediction_id}/cancel", timeout=10).status_code == 200
    bodies = receiver.wait_final(path)
    assert bodies[-1]["status"] == "canceled"
    # Within one denoising step: a step's duration is read from the progress lines, so a loaded
    # machine (slower steps) does not fail this, while a cancel that waited for the end would.
    assert time.monotonic() - asked < 5 + 2 * seconds_per_step(bodies[-1]["logs"])
    assert not re.search(rf"step {LONG['ddim_steps']}/", bodies[-1]["logs"]), "it ran to the end"
    wait_idle(server)
    assert server.predict(QUICK).json()["status"] == "succeeded"
    assert requests.post(f"{server.url}/predictions/unknown/cancel", timeout=10).status_code == 404


def test_uploads_go_out_by_put_with_names_that_never_collide(special, receiver):
    main, _ = special
    names = set()
    for _ in range(2):
        path = f"/hook/{uuid.uuid4().hex}"
        post_async(main, QUICK, receiver.url(path))
        final = receiver.wait_final(path)[-1]
        assert final["status"] == "succeeded", final.get("error")
        assert all(url.startswith(receiver.url("/upload/")) for url in final["output"])
        names |= {url.rsplit("/", 1)[-1] for url in final["output"]}
        wait_idle(main)
    assert len(names) == 4 and all(f"/upload/{n}" in receiver.uploads for n in names)
    assert all(receiver.uploads[f"/upload/{n}"].startswith(b"\x89PNG") for n in names)


@pytest.mark.parametrize("hook", ["closed port", "hanging receiver"])
def test_a_webhook_that_fails_never_holds_the_server(servers, receiver, hook):
    server = servers["canny"]
    url = f"http://127.0.0.1:{free_port()}/hook" if hook == "closed port" else receiver.url("/hang")
    started = time.monotonic()
    assert server.predict(QUICK, timeout=600).json()["status"] == "succeeded"
    baseline = time.monotonic() - started
    started = time.monotonic()
    response = requests.post(f"{server.url}/predictions", json={"input": QUICK, "webhook": url}, timeout=600)
    assert response.status_code == 200 and response.json()["status"] == "succeeded"
    # Cog alone held this answer for ~320 s of webhook retries; the bound here is a few seconds.
    assert time.monotonic() - started < 2 * baseline + 10
    # Another client is served right away, whatever the webhook is still doing.
    assert server.predict(QUICK, timeout=600).status_code == 200


# -- image URLs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, message", [
    ("/missing.png", "answered HTTP 404"),
    ("/hang.png", "did not answer in time"),
    ("/big.png", "send at most 1 MiB"),
])
def test_image_urls_are_bounded_and_leave_nothing_behind(special, receiver, path, message):
    main, _ = special
    started = time.monotonic()
    body = main.predict({**QUICK, "image": receiver.url(path)}).json()
    assert body["status"] == "failed" and message in body["error"]
    assert time.monotonic() - started < 45  # the hanging host answers nothing for 60 s
    assert str(main.tmp) not in body["error"] and "Traceback" not in (body.get("logs") or "")
    wait_idle(main)
    # Only the last successful prediction's outputs (kept until the next one) may be there.
    left = [p for p in main.tmp.rglob("*") if p.is_file() and not p.parent.name.startswith("controlnet-canny-")]
    assert not left, "a failed download left files behind"


def test_the_private_address_switch_refuses_loopback_urls(special, receiver):
    _, guarded = special
    body = guarded.predict({**QUICK, "image": receiver.url("/house.png")}).json()
    assert body["status"] == "failed" and "private, loopback or link-local" in body["error"]
    body = guarded.predict({**QUICK, "lora_url": receiver.url("/style.safetensors")}).json()
    assert body["status"] == "failed" and "private, loopback or link-local" in body["error"]
    assert guarded.predict(QUICK).json()["status"] == "succeeded"


def test_an_input_mistake_reaches_the_client_as_one_line(servers):
    body = servers["canny"].predict({**QUICK, "image": "data:image/png;base64," + base64.b64encode(b"nope").decode()}).json()
    assert body["status"] == "failed" and "could not be decoded" in body["error"]
    assert "Traceback" not in body["logs"] and "/tmp" not in body["error"] and "site-packages" not in body["logs"]
    assert "Input error: image could not be decoded" in body["logs"]
    assert "Traceback" in servers["canny"].log()  # the detail stays in the server's own log


def test_health_check_shows_no_server_paths(servers):
    text = requests.get(f"{servers['canny'].url}/health-check", timeout=10).text
    assert "/weights" not in text and os.path.expanduser("~") not in text


# -- stopping -------------------------------------------------------------------------------------

def port_free(port) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# The fault this guards against was a race (2 stops in 10 failed, 16 others did not): the suite tries
# each case once, `make stop-trials` (STOP_TRIALS=n) n times over.
STOP_TRIALS = int(os.environ.get("STOP_TRIALS", "1"))


@pytest.mark.parametrize("trial", range(STOP_TRIALS))
@pytest.mark.parametrize("how, when", [
    ("SIGTERM to the group", "idle"), ("SIGTERM to the group", "busy"), ("SIGTERM to the group", "starting"),
    ("SIGINT to the server", "busy"), ("SIGINT to the group", "busy"), ("SIGTERM to the server", "idle"),
])
def test_a_stop_signal_ends_the_server_within_10_s_and_frees_its_port(tmp_path, how, when, trial):
    server = CogServer("canny", log_path=tmp_path / "server.log")
    server.launch()
    try:
        if when == "starting":
            time.sleep(1.5)
        else:
            server.wait_ready()
            if when == "busy":
                threading.Thread(target=lambda: server.predict(LONG, timeout=120), daemon=True).start()
                deadline = time.monotonic() + 30
                while server.health() != "BUSY" and time.monotonic() < deadline:
                    time.sleep(0.1)
        sig = signal.SIGINT if "SIGINT" in how else signal.SIGTERM
        started = time.monotonic()
        if "group" in how:
            os.killpg(server.process.pid, sig)
        else:
            server.process.send_signal(sig)
        server.process.wait(timeout=10)
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 5
        while group_alive(server.process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_alive(server.process.pid), "a worker outlived the server"
        assert port_free(server.port)
    finally:
        server.stop()
