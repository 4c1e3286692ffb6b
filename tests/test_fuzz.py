"""Property-based requests generated from each served /openapi.json (schemathesis): whatever a client
sends, valid or not, the server never answers 5xx, never hangs, and is healthy and serving at the end.

Bounded here (FUZZ_EXAMPLES per operation, default 8, every condition); `make fuzz` runs 500 per
operation. Three things are pinned down in each generated request, and only these: URLs (image,
LoRA, embedding, webhook) point at a loopback host that answers 404, because fetching arbitrary
hosts would leave this machine (URL handling has its own tests); and step counts and sizes of
otherwise valid requests are capped so each case takes a second on a CPU, not minutes. Out-of-range
values are left as generated, so validation is fuzzed in full. POST /shutdown is fuzzed too: the
suite's servers refuse it (CONTROLNET_SHUTDOWN_FROM=none).
"""

import http.server
import os
import threading

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.conftest import SERVED

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))
CONDITIONS = SERVED  # FUZZ_CONDITIONS, or every condition the suite serves together
URL_FIELDS = ("image", "input_image", "lora_url", "embedding_url", "init_image", "mask_image",
              *(f"controlnet_{n}_image" for n in range(1, 4)))  # `make fuzz COND=multi`: its units' images


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(404)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


_host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
_host.daemon_threads = True
threading.Thread(target=_host.serve_forever, daemon=True).start()
LOOPBACK = f"http://127.0.0.1:{_host.server_address[1]}/x.png"


def keep_local_and_quick(body):
    if not isinstance(body, dict):
        return
    if "webhook" in body:
        body["webhook"] = LOOPBACK
    inputs = body.get("input")
    if not isinstance(inputs, dict):
        return
    for field in URL_FIELDS:
        if isinstance(inputs.get(field), str) and inputs[field].lower().startswith(("http:", "https:")):
            inputs[field] = LOOPBACK
    caps = {"ddim_steps": (1, 2), "width": (0, 256), "height": (0, 256), "detect_resolution": (128, 256)}
    for field, (low, high) in caps.items():
        if isinstance(inputs.get(field), int) and not isinstance(inputs[field], bool) and low <= inputs[field] <= 2048:
            inputs[field] = min(inputs[field], high)
    if inputs.get("image_resolution") in ("512", "768"):
        inputs["image_resolution"] = "256"


@pytest.fixture(scope="module")
def sent(request):
    """Requests sent, per condition and operation; the total is printed at the end of the run."""
    counts: dict = {}
    yield counts
    total = sum(n for per_condition in counts.values() for n in per_condition.values())
    detail = "; ".join(f"{condition} {sum(ops.values())}" for condition, ops in counts.items())
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            reporter.ensure_newline()
            reporter.write_line(f"fuzz: {total} requests sent to {len(counts)} server(s) ({detail}), "
                                f"up to {EXAMPLES} per operation and mode")


# schemathesis' pytest integration (from_fixture) relies on a private attribute pytest 9 removed, so the
# generated cases are driven with hypothesis directly.
@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_request_gets_a_server_error(servers, sent, condition, mode):
    server = servers[condition]
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/predictions", "/predictions/{prediction_id}", "/shutdown"}
    calls = {}
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def call(case):
            keep_local_and_quick(case.body)
            calls[operation.label] = calls.get(operation.label, 0) + 1
            case.call_and_validate(base_url=server.url, checks=[not_a_server_error], timeout=120)

        try:
            call()
        except Unsatisfiable:
            # Some operations have nothing to violate (no body; any string is a valid prediction id).
            assert mode == GenerationMode.NEGATIVE, operation.label
    for label, n in calls.items():
        sent.setdefault(condition, {})[label] = sent.get(condition, {}).get(label, 0) + n
    assert calls.get("POST /predictions", 0) >= min(EXAMPLES, 5)


@pytest.mark.parametrize("condition", CONDITIONS)
def test_healthy_and_serving_after_fuzzing(servers, condition):
    from scripts.image_test import image_inputs
    from tests.test_serving import QUICK

    server = servers[condition]
    assert requests.get(f"{server.url}/health-check", timeout=10).json()["status"] == "READY"
    # image-test's sample: a transparent corner (inpaint's mask), and multi's first unit instead of `image`
    shared = {name: value for name, value in QUICK.items() if name != "image"}
    body = server.predict({**shared, **image_inputs(condition)}).json()
    assert body["status"] == "succeeded", body.get("error")
