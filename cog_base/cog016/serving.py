"""Narrow fixes to Cog 0.16.12's own HTTP server, installed from inside it.

The image runs Cog's entry point unchanged (`python -m cog.server.http`), and Cog imports the
predictor module (hence this package) in its HTTP process to read the schema and again in the
prediction worker it spawns. `install()` adjusts, in whichever of the two processes it runs:

HTTP process (cog/server/http.py, runner.py, webhook.py, types.py)
- a guard in front of the app: a body that is not `{"input": {...}}` gets 422 with what to send
  (Cog answers `{}`, `null` and `{"input": null}` with 500 from an unhandled ValidationError in
  `_predict`), and so does a NaN, Infinity or 1e999 anywhere in a body (Python's JSON takes them; Cog
  answered 500) and a string with a lone UTF-16 surrogate (not text: the same 500); bodies over a
  bound get 413; `POST /shutdown` is refused unless the client is on
  loopback (Cog lets anyone who reaches the port stop the server); `POST /trainings/{id}/cancel`
  is answered by the predictions' cancel route, which runs the same `runner.cancel` (Cog's training
  route calls the async cancel handler without awaiting it: every training cancel was a 500 and
  cancelled nothing);
- image URLs (and a train-mode server's training archive URLs, with their own bounds) are fetched
  with a byte bound and one wall-clock deadline, every redirect checked, the optional
  private-address block of models.urls, stopped at once by a cancel, and no 0-byte temp file left
  after a failure (`URLPath.convert` copies an unbounded stream into a temp file it never removes
  on error); a stop removes the input folders in flight;
- webhooks are sent from a per-prediction thread with timeouts and two retries at most: Cog sends
  them on its event loop with no timeout and retries the final one for ~320 s, during which the
  prediction cannot finish and every other client gets 409;
- an async prediction on a server started without `--upload-url` returns its files as data: URIs,
  as a sync one does (Cog put the server's own temp-file paths in the webhook: useless to the client,
  and a leak of server paths); a sync one keeps Cog's own path (files encoded once, after the answer
  check, which decoded data: URIs twice each);
- a long data: URI input is echoed in the answer and the webhooks as a short data: URI saying what
  was sent (Cog echoed the whole image in each);
- Cog's answers and the webhooks' bodies are serialised by orjson (the same bytes as Starlette's
  json.dumps for what Cog answers; 30x faster on an answer of data: URIs), and the body the guard
  parsed is the one FastAPI validates (it parsed it again);
- the final webhook goes out once Cog has marked the prediction done (it sent it before, so a
  request sent on it could get 409);
- SIGTERM/SIGINT set the shutdown event from a fresh thread (Cog's handler takes a lock inside a
  signal handler), a request still open gets 2 s so that the worker is stopped (and cleans up), and
  a watchdog ends the process 9 s after the first signal if it is still up;
- cancel: see cog_base/cog016/cancel.py (both processes).

Both (cog/types.py)
- a file input that is not a string gets 422 instead of a 500 from inside Cog's validator; a data:
  URI is decoded once (Cog decoded it twice).

Prediction worker (cog/server/worker.py)
- a client's input mistake (a ValueError raised by the predictor), and a server failure whose
  message is written for the client (the predictor's ExpectedFault, UnexpectedError), is printed to
  the logs as one line, its traceback only to the server's own stream; any other failure keeps
  Cog's traceback.

Every fix is tested through the real server (tests/test_serving.py), the log lines in-process
(tests/test_worker_logs.py).
"""

from __future__ import annotations

import atexit
import binascii
import io
import ipaddress
import json
import math
import mimetypes
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
import urllib.request
from pathlib import Path

from cog_base.cog016 import cancel

MAX_BODY_BYTES = int(float(os.environ.get("CONTROLNET_MAX_BODY_MB", "64")) * 2**20)
IMAGE_MAX_BYTES = int(float(os.environ.get("CONTROLNET_IMAGE_MAX_MB", "50")) * 2**20)
IMAGE_TIMEOUT_S = float(os.environ.get("CONTROLNET_IMAGE_TIMEOUT_S", "30"))
# A train-mode server's one file input is the training archive (`pairs`), a predict-mode server's are
# images: the mode is the route (--x-mode train serves /trainings only), and URLPath knows no input name.
TRAIN_ARCHIVE_MAX_BYTES = int(float(os.environ.get("CONTROLNET_TRAIN_ARCHIVE_MAX_MB", "4096")) * 2**20)
TRAIN_ARCHIVE_TIMEOUT_S = float(os.environ.get("CONTROLNET_TRAIN_ARCHIVE_TIMEOUT_S", "600"))
URL_INPUTS = {
    "predict": ("image URL", IMAGE_MAX_BYTES, IMAGE_TIMEOUT_S),
    "train": ("pairs archive URL", TRAIN_ARCHIVE_MAX_BYTES, TRAIN_ARCHIVE_TIMEOUT_S),
}
WEBHOOK_TIMEOUT = (3.0, 5.0)  # connect, read
WEBHOOK_RETRIES = 2  # the final webhook only; at most ~3 x 8 s, on a thread of its own
STOP_GRACE_S = 2.0  # what a request still open at a stop gets to finish
STOP_WATCHDOG_S = 9.0
REQUEST_ROUTES = ("/predictions", "/trainings")

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    if _running_cog_http():
        _patch_http_main(sys.modules["__main__"])
        _patch_url_inputs()
        _patch_webhooks()
        _patch_tasks()
        cancel.install_http()
    _patch_path_validation()
    _patch_worker_tracebacks()
    cancel.install_worker()


def _running_cog_http() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "cog.server.http"


# -- the guard ------------------------------------------------------------------------------------

def _json_response(status: int, detail):
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return status, headers, body


class _NonFinite(str):
    """A NaN, Infinity or out-of-range number (1e999) in a body, as written."""


def _finite_float(text: str):
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _parsed_body(raw: bytes):
    """(the body as json.loads gives it, None), or (None, why Cog cannot take it)."""
    try:
        # Python's JSON takes the bare tokens NaN and Infinity, which no JSON client should send; Cog
        # answered them with 500 when it encoded its reply. A finite number parses as json.loads parses
        # it, so a body with none of them is json.loads(raw) exactly, and FastAPI is handed it.
        body = json.loads(raw, parse_constant=_NonFinite, parse_float=_finite_float) if raw.strip() else None
    except ValueError:
        return None, "the body is not valid JSON; send {\"input\": {...}}"
    if not isinstance(body, dict):
        return None, "the body must be a JSON object: {\"input\": {...}}"
    if not isinstance(body.get("input"), dict):
        return None, "the body needs an \"input\" object holding the inputs: {\"input\": {\"image\": ..., \"prompt\": ...}}"
    problem = _bad_value_at(body)
    return (None, problem) if problem else (body, None)


def _bad_value_at(value, path: str = "") -> str | None:
    """What to fix about the first value Cog cannot take: a NaN, Infinity or out-of-range number, or
    a string (value or key) holding a lone UTF-16 surrogate (JSON's "\\ud83c" without its pair): no
    text, so the tokenizer raised on it and the answer echoing it could not be encoded (500)."""
    if isinstance(value, _NonFinite):
        return f"{path} is {value}, not a finite number; send a finite number"
    if isinstance(value, str):
        surrogate = _lone_surrogate(value)
        return None if surrogate is None else (
            f"{path or 'the body'} holds a lone surrogate ({surrogate}), which is not text; send valid Unicode "
            "(a character beyond U+FFFF as its surrogate pair, or as UTF-8)")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip(".")
        surrogate = _lone_surrogate(key) if isinstance(key, str) else None
        if surrogate is not None:
            return (f"a name in {path or 'the body'} holds a lone surrogate ({surrogate}), which is not text; "
                    "send valid Unicode")
        found = _bad_value_at(item, where)
        if found:
            return found
    return None


def _lone_surrogate(text: str) -> str | None:
    if text.isascii():  # O(1) in CPython: the 0.8 MB image is never scanned
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return ascii(text[exc.start])[1:-1]
    return None


# The scope key under which the guard hands FastAPI the body it parsed (Starlette's Request.json).
PARSED_BODY = "controlnet_cog.parsed_body"


def _patch_request_json() -> None:
    """FastAPI parses the body of each request again (Request.json); the guard's parse is the same
    object (~1.2 ms for a 0.8 MB body)."""
    from starlette.requests import Request

    original = Request.json

    async def parsed_json(self):
        if not hasattr(self, "_json") and PARSED_BODY in self.scope:
            self._json = self.scope[PARSED_BODY]
        return await original(self)

    Request.json = parsed_json


class Guard:
    """ASGI middleware in front of Cog's FastAPI app."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path == "/shutdown" and method == "POST" and not _shutdown_allowed(scope):
            return await _reply(send, *_json_response(
                403, "POST /shutdown is not accepted from this client (CONTROLNET_SHUTDOWN_FROM); stop the "
                "container or process instead"))
        if method == "POST" and path.startswith("/trainings/") and path.endswith("/cancel"):
            scope = _with_path(scope, "/predictions/" + path[len("/trainings/"):])
            return await self.app(scope, receive, send)
        if method in ("POST", "PUT") and path.startswith(REQUEST_ROUTES) and not path.endswith("/cancel"):
            raw, too_big = await _read_body(receive)
            if too_big:
                return await _reply(send, *_json_response(
                    413, f"the body is over {MAX_BODY_BYTES // 2**20} MiB; send large images as URLs"))
            body, problem = _parsed_body(raw)
            if problem:
                detail = [{"loc": ["body"], "msg": problem, "type": "value_error"}]
                return await _reply(send, *_json_response(422, detail))
            return await self.app({**scope, PARSED_BODY: body}, _replay(raw), send)
        return await self.app(scope, receive, send)


def _with_path(scope, path: str):
    return {**scope, "path": path, "raw_path": path.encode()}


def _shutdown_allowed(scope) -> bool:
    """CONTROLNET_SHUTDOWN_FROM: loopback (default), any, or none."""
    policy = os.environ.get("CONTROLNET_SHUTDOWN_FROM", "loopback").strip().lower()
    if policy in ("any", "none"):
        return policy == "any"
    client = (scope.get("client") or ("",))[0]
    try:
        address = ipaddress.ip_address(client)
    except ValueError:  # a Unix socket or no peer address: not a network client
        return False
    # A dual-stack bind reports an IPv4 loopback client as ::ffff:127.0.0.1.
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


async def _read_body(receive) -> tuple[bytes, bool]:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks), False


def _replay(raw: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _reply(send, status, headers, body) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _patch_http_main(main) -> None:
    server_class = main.Server

    class GuardedServer(server_class):
        def __init__(self, config):
            config.app = Guard(config.app)
            # uvicorn waits for open requests (a sync prediction) before the app's shutdown, which stops
            # the worker; Cog gives up after 5 s and skips that shutdown, so the worker's files stayed
            # and the watchdog had to end the process.
            config.timeout_graceful_shutdown = STOP_GRACE_S
            super().__init__(config=config)

    main.Server = GuardedServer
    main.JSONResponse = _fast_json_response(main.JSONResponse)
    _patch_request_json()
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if previous is signal.default_int_handler:
            # Python's own SIGINT handler raises KeyboardInterrupt in the main thread, which Cog's
            # main() turns into a stop: keep it, and only add the watchdog.
            signal.signal(signum, _watching(previous))
        elif callable(previous):
            signal.signal(signum, _stop_handler(previous))


def _fast_json_response(base):
    """Cog's JSONResponse (Starlette's: json.dumps, ensure_ascii=False, compact) rendered by orjson,
    which writes the same bytes for what Cog answers (strings, numbers, lists, dicts with string keys;
    a NaN cannot reach it: the guard refuses one in the input, and Cog's own figures are finite). The
    stdlib scans every character of the data: URIs: 53 ms for 4 samples at 1024x768, orjson 1.7 ms."""
    import orjson

    class FastJSONResponse(base):
        def render(self, content) -> bytes:
            try:
                return orjson.dumps(content)
            except TypeError:  # what orjson refuses (a non-string key, an int over 64 bits): Starlette's way
                return super().render(content)

    return FastJSONResponse


def _stop_handler(previous):
    def handler(signum, frame):
        # Setting a threading.Event takes a lock the interrupted main thread may hold; a thread
        # does it safely. The watchdog makes sure the process (and its port) goes away.
        threading.Thread(target=previous, args=(signum, frame), daemon=True).start()
        _start_watchdog()

    return handler


def _watching(previous):
    def handler(signum, frame):
        _start_watchdog()
        previous(signum, frame)

    return handler


_watchdog_started = False


def _start_watchdog() -> None:
    global _watchdog_started
    if _watchdog_started:
        return
    _watchdog_started = True

    def watchdog():
        time.sleep(STOP_WATCHDOG_S)
        print(f"controlnet-cog: still running {STOP_WATCHDOG_S:.0f}s after the stop signal; exiting now", file=sys.stderr, flush=True)
        remove_inputs()
        for child in _children():
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()


def _children() -> list[int]:
    try:
        text = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text()
    except OSError:
        return []
    return [int(pid) for pid in text.split()]


# -- image URLs -----------------------------------------------------------------------------------

def _patch_path_validation() -> None:
    """A file input sent as a JSON object, list or number reached urllib inside Cog's validator and
    raised AttributeError, i.e. HTTP 500 (found by tests/test_fuzz.py): make it a 422 that says what
    to send. The input models are built after this module is imported, so they bind this validator."""
    import pathlib

    from cog import types as cog_types

    original = cog_types.Path.validate.__func__

    def validate(cls, value):
        if not isinstance(value, (str, pathlib.Path)):
            raise ValueError("a file input must be a string: an http(s) URL or a data: URI")
        if isinstance(value, str) and value.startswith("data:"):
            # Cog decodes a data: URI twice, once for its file name and once for its bytes (~5 ms each
            # for a 0.6 MB image): decoded once here.
            content_type, data = _decode_data_uri(value)
            extension = mimetypes.guess_extension(content_type)
            return cog_types.URLPath(source=value, filename="file" + (extension or ""), fileobj=io.BytesIO(data))
        return original(cls, value)

    cog_types.Path.validate = classmethod(validate)


_BASE64_URI = re.compile(r"data:([A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+)?((?:;[^,;]*)*);base64,")


def _decode_data_uri(uri: str) -> tuple[str, bytes]:
    """(content type, bytes) of a data: URI, as urllib's data: handler gives them. The usual form,
    `data:<type>;base64,<data>` without %-escapes, is decoded by binascii directly: urllib first copies
    the whole payload through unquote_to_bytes (3.3 ms instead of 5.0 for a 0.6 MB image)."""
    match = _BASE64_URI.match(uri)
    if match and "%" not in uri:
        return (match.group(1) or "text/plain").lower(), binascii.a2b_base64(uri[match.end():])
    with urllib.request.urlopen(uri) as decoded:  # noqa: S310  data: only (the caller's check)
        return decoded.headers.get_content_type(), decoded.read()


def _cog_mode() -> str:
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--x-mode" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--x-mode="):
            return arg.split("=", 1)[1]
    return "predict"


def _patch_url_inputs() -> None:
    from cog import types as cog_types

    from models.urls import URLError, download


    def convert(self):
        if self._path is None:
            dest = Path(tempfile.mkdtemp(prefix="cog-input-")) / (self.filename or "input")
            _input_dirs.add(dest.parent)
            try:
                if str(self.source).startswith("data:"):  # already decoded, bounded by the body size
                    with open(dest, "wb") as out:
                        shutil.copyfileobj(self.fileobj, out)
                else:
                    # At request time: Cog hides sys.argv while it imports the predictor (hence this module).
                    what, max_bytes, timeout_s = URL_INPUTS.get(_cog_mode(), URL_INPUTS["predict"])
                    download(self.source, dest, what, max_bytes, timeout_s, abort=cancel.current_stop())
            except URLError as exc:
                _remove_input_dir(dest.parent)
                raise ValueError(str(exc)) from None
            self._path = dest
        return self._path

    def unlink(self, missing_ok: bool = False) -> None:
        if self._path:
            _remove_input_dir(self._path.parent)

    cog_types.URLPath.convert = convert
    cog_types.URLPath.unlink = unlink
    atexit.register(remove_inputs)


# The input folders of predictions in flight; a stop removes them (Cog's cleanup runs only when a
# prediction ends, and a stop does not wait for that).
_input_dirs: set[Path] = set()


def _remove_input_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    _input_dirs.discard(folder)


def remove_inputs() -> None:
    for folder in list(_input_dirs):
        _remove_input_dir(folder)


# -- async outputs, the answer's input, the final webhook ------------------------------------------

# A file input sent as a data: URI longer than this is not echoed back in the answer and the webhooks.
ECHO_MAX_CHARS = 4096
SETTLE_TIMEOUT_S = 10.0  # how long the final webhook waits for Cog to mark the prediction done


class _Inline:
    """upload_url of an async request on a server without --upload-url (Cog passes None then, as for
    a sync request, whose files its answer path turns into data: URIs itself)."""


def _patch_tasks() -> None:
    from cog.files import upload_file
    from cog.json import upload_files
    from cog.server import runner as cog_runner

    predict = cog_runner.PredictionRunner.predict

    def runner_predict(self, prediction, is_train, task_kwargs=None):
        # Cog's _predict passes upload_url only for async requests (None without --upload-url).
        if task_kwargs and "upload_url" in task_kwargs and task_kwargs["upload_url"] is None:
            task_kwargs = {**task_kwargs, "upload_url": _Inline}
        return predict(self, prediction, is_train, task_kwargs=task_kwargs)

    original = cog_runner.PredictTask.__init__

    def __init__(self, prediction_request, is_train, upload_url=None):
        inline = upload_url is _Inline
        original(self, prediction_request, is_train, upload_url=None if inline else upload_url)
        if inline:
            # An async answer's files as data: URIs, as a sync answer has them. Only async: a sync
            # answer's outputs then stay paths, which Cog's answer check takes without decoding them
            # (it decoded each data: URI twice) and which Cog's answer path encodes once.
            self._file_uploader = lambda output: upload_files(output, upload_file=upload_file)
        self._p.input = _short_echo(self._p.input)

    track = cog_runner.PredictTask.track

    def task_track(self, fut) -> None:
        track(self, fut)
        settled = getattr(self._webhook_sender, "settled", None)
        if settled is not None:
            fut.add_done_callback(lambda _: settled.set())

    cog_runner.PredictionRunner.predict = runner_predict
    cog_runner.PredictTask.__init__ = __init__
    cog_runner.PredictTask.track = task_track


def _short_echo(inputs):
    """The answer's (and every webhook's) copy of the input, with each long data: URI replaced by a
    short one that says what was sent: the client has it already, and Cog echoed the whole image in
    every answer and webhook. Still a URI, as the schema's file inputs are."""
    if not isinstance(inputs, dict):
        return inputs
    short = {}
    for name, value in inputs.items():
        source = getattr(value, "source", value)
        if isinstance(source, str) and source.startswith("data:") and len(source) > ECHO_MAX_CHARS:
            mime = source[5:source.find(",")].split(";")[0] or "text/plain"
            value = f"data:text/plain,omitted:%20a%20{mime.replace('/', '%2F')}%20data%20URI%20of%20{len(source)}%20characters"
        short[name] = value
    return short


# -- webhooks -------------------------------------------------------------------------------------

def _patch_webhooks() -> None:
    from cog.server import runner as cog_runner
    from cog.server import webhook as cog_webhook

    cog_runner.webhook_caller_filtered = lambda url, events: _webhook_sender(url, events, cog_webhook)


def _webhook_sender(url: str, events_filter, cog_webhook):
    import requests
    from fastapi.encoders import jsonable_encoder
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    from cog.schema import Status

    throttler = cog_webhook.ResponseThrottler(response_interval=cog_webhook._response_interval)
    session = cog_webhook.requests_session()  # Cog's headers: user agent, trace context, auth token
    retrying = cog_webhook.requests_session()
    adapter = HTTPAdapter(max_retries=Retry(total=WEBHOOK_RETRIES, backoff_factor=0.2,
                                            status_forcelist=[429, 500, 502, 503, 504], allowed_methods=["POST"]))
    retrying.mount("http://", adapter)
    retrying.mount("https://", adapter)
    outbox: queue.Queue = queue.Queue()
    # Set when Cog marks the prediction done (PredictTask.track): Cog sends the final webhook before
    # that, so a client that sent its next request on it got 409 now and then.
    settled = threading.Event()

    def deliver():
        while True:
            payload, terminal = outbox.get()
            if terminal:
                settled.wait(SETTLE_TIMEOUT_S)
            try:
                # orjson: the final webhook of an async answer carries its files as data: URIs, which
                # requests' json.dumps scans character by character (~50 ms at 4 samples of 1024x768).
                (retrying if terminal else session).post(url, data=_json_bytes(payload), timeout=WEBHOOK_TIMEOUT,
                                                         headers={"Content-Type": "application/json"})
            except requests.RequestException as exc:
                print(f"controlnet-cog: webhook to {url.split('?')[0]} failed ({type(exc).__name__}); the prediction "
                      "is unaffected", file=sys.stderr, flush=True)
            if terminal:
                return

    threading.Thread(target=deliver, daemon=True, name="webhook").start()

    def caller(response, event) -> None:
        if event not in events_filter or not throttler.should_send_response(response):
            return
        # Encoded now: the response object keeps changing after this event.
        payload = jsonable_encoder(response.model_dump(exclude_unset=True))
        outbox.put((payload, Status.is_terminal(response.status)))
        throttler.update_last_sent_response_time()

    caller.settled = settled
    return caller


def _json_bytes(payload) -> bytes:
    import orjson

    try:
        return orjson.dumps(payload)
    except TypeError:
        return json.dumps(payload, allow_nan=False).encode()


# -- worker logs ----------------------------------------------------------------------------------

def _patch_worker_tracebacks() -> None:
    try:
        from cog.server import worker as cog_worker
    except ImportError:
        return
    shim = types.SimpleNamespace(**{name: getattr(traceback, name) for name in dir(traceback) if not name.startswith("__")})

    def print_exc(*args, **kwargs):
        error = sys.exc_info()[1]
        # A client's mistake, or a failure whose message was written for the client (the predictor's
        # `log_prefix` classes): one line in the prediction's logs. Their tracebacks (an unexpected
        # error's cause may name server paths) go only to the server's own log.
        prefix = "Input error" if isinstance(error, ValueError) and not isinstance(error, UnicodeError) \
            else getattr(type(error), "log_prefix", None)
        if prefix:
            print(f"{prefix}: {error}", file=sys.stderr, flush=True)
            stream = _server_stream()
            if stream is not None:
                traceback.print_exc(file=stream)
                stream.flush()
            return
        traceback.print_exc(*args, **kwargs)

    shim.print_exc = print_exc
    cog_worker.traceback = shim


def _server_stream():
    """The worker's original stderr, which Cog's stream redirector keeps beside the captured one:
    what is written there reaches the server's log but not the prediction's logs."""
    import gc

    from cog.server.helpers import StreamRedirector

    for obj in gc.get_objects():
        if isinstance(obj, StreamRedirector):
            for wrapped in getattr(obj, "_streams", []):
                if wrapped.name == "<stderr>":
                    return getattr(wrapped, "_original_fp", None)
    return None
