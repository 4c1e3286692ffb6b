"""A cancel that Cog 0.16.12 accepts always cancels, whatever stage the prediction or training is in.

Cog (cog/server/worker.py) sends a cancel as SIGUSR1 to the prediction worker, plus a Cancel message
on its pipe, once; the worker raises CancelationException only if a prediction is running at that
instant. So a cancel was lost, or did harm, at three stages:

- before the worker runs the prediction: the HTTP process is still converting its file inputs (data:
  URIs and URL downloads, `start_prediction`), or the prediction is in the pipe. The worker ignored
  the signal and dropped the message, then ran the prediction to the end (13 of 30 cancels sent
  straight after a PUT's 202), and a URL download went on to its own end (`failed`, not `canceled`);
- inside an import: the exception left half-initialised modules behind (torch's C types cannot
  register twice), and every later training failed while /health-check said READY;
- inside a change to the shared pipeline (models.critical: loading a LoRA), reported as a bad LoRA.

Here, in the HTTP process: a cancel that comes while the inputs are being prepared stops their
downloads (models.urls' abort) and the prediction is never handed to the worker; it ends `canceled`.
In the worker: a signal that comes before the prediction runs is remembered and, once the prediction
starts, applied if the pipe holds the Cancel message for it (a signal for a prediction that has just
ended is told apart by that message's id); a cancel inside an import or a models.critical section is
delayed until it ends (re-signalled every 50 ms). A cancel is raised once; raised again only if
Python dropped it (raised inside a garbage-collector callback) or the prediction still runs 3 s later
(code that swallowed it), and an error that follows a cancel ends `canceled`.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

from models import critical

RETRY_S = 0.05  # a delayed cancel is tried again this often
RERAISE_S = 3.0  # a cancel raised this long ago with the prediction still running was swallowed
EARLY_CANCEL_WAIT_S = 2.0  # the Cancel message follows its signal within microseconds


# -- HTTP process ---------------------------------------------------------------------------------

@dataclass
class _Starting:
    """A prediction whose inputs the HTTP process is still preparing."""
    stop: threading.Event = field(default_factory=threading.Event)  # ends its downloads
    canceled: bool = False


_starting: dict = {}  # tag -> _Starting, under the worker's _predictions_lock
_local = threading.local()


def current_stop() -> threading.Event | None:
    """What ends the download this thread is running for a prediction's input (URLPath.convert)."""
    return getattr(_local, "stop", None)


def install_http() -> None:
    from cog.server import worker as cog_worker
    from cog.server.eventtypes import Done, Envelope, PredictionInput

    Worker = cog_worker.Worker
    cog_cancel = Worker.cancel

    def _start_prediction(self, tag, payload, *, context):
        # Called by Worker.predict before the client has its answer, so a cancel always finds the entry.
        starting = _Starting()
        with self._predictions_lock:
            _starting[tag] = starting

        def start_prediction() -> None:
            error = None
            try:
                _convert_inputs(self._input_download_pool, payload, starting.stop)
            except Exception as exc:  # Cog's own start_prediction turns any failure into a failed prediction
                error = exc
            with self._predictions_lock:
                del _starting[tag]
                if not starting.canceled and error is None:
                    try:
                        self._events.send(Envelope(event=PredictionInput(payload=payload, context=context or {}),
                                                   tag=tag))
                        return
                    except Exception as exc:
                        error = exc
            done = Done(canceled=True) if starting.canceled else Done(error=True, error_detail=str(error))
            self._publish(Envelope(done, tag))
            self._complete_prediction(done, tag)

        return start_prediction

    def cancel(self, tag=None) -> None:
        with self._predictions_lock:
            starting = _starting.get(tag)
            state = self._predictions_in_flight.get(tag)
            if starting is not None and state is not None:
                starting.canceled = state.cancel_sent = True
                starting.stop.set()
                return
        cog_cancel(self, tag)  # the worker has it: Cog's signal and message

    Worker._start_prediction = _start_prediction
    Worker.cancel = cancel


def _convert_inputs(pool, payload: dict, stop: threading.Event) -> None:
    """Cog's step: every file input (a URLPath, or a list of them) made a local file, in parallel. Here a
    failure or a cancel also ends the downloads still running."""
    from cog.types import URLPath

    jobs = {}
    for name, value in payload.items():
        items = value if isinstance(value, list) else [value]
        if items and all(isinstance(item, URLPath) for item in items):
            jobs[name] = [pool.submit(_convert, item, stop) for item in items]
    every = [job for name_jobs in jobs.values() for job in name_jobs]
    finished, _ = futures.wait(every, return_when=futures.FIRST_EXCEPTION)
    failed = [job for job in finished if job.exception() is not None]
    if failed:
        stop.set()
        futures.wait(every)
        raise failed[0].exception()
    for name, name_jobs in jobs.items():
        payload[name] = [job.result() for job in name_jobs] if isinstance(payload[name], list) else name_jobs[0].result()


def _convert(item, stop: threading.Event):
    _local.stop = stop
    try:
        return item.convert()
    finally:
        _local.stop = None


# -- prediction worker ----------------------------------------------------------------------------

def install_worker() -> None:
    from cog.server import worker as cog_worker
    from cog.server.eventtypes import Cancel
    from cog.server.exceptions import CancelationException

    Child = cog_worker._ChildWorker
    cog_loop, cog_predict = Child._loop, Child._predict

    def _loop(self, predict, redirector):
        self._early_signal = False  # a SIGUSR1 came while no prediction was running
        self._cancel = "none"  # this prediction's: none, wanted (delayed), raised
        self._raised_at = 0.0
        self._events = _Inbox(self._events, self, Cancel)
        signal.signal(signal.SIGUSR2, self._signal_handler)  # a delayed cancel, tried again
        sys.unraisablehook = _unraisable_hook(self, sys.unraisablehook, CancelationException)
        return cog_loop(self, predict, redirector)

    def _predict(self, tag, payload, *, context, predict, redirector):
        self._cancel = "none"
        started = functools.partial(_started, self, tag, predict, Cancel, CancelationException)
        return cog_predict(self, tag, payload, context=context, predict=started, redirector=redirector)

    def _signal_handler(self, signum, frame):
        if not self._cancelable:
            if signum == signal.SIGUSR1:
                self._early_signal = True
            return
        if self._cancel == "raised":
            return
        first = self._cancel == "none"
        if _uninterruptible(frame):
            self._cancel = "wanted"
        else:
            self._cancel, self._raised_at = "raised", time.monotonic()
        if first:  # once the state is set: the follow-up ends when it reads "none"
            threading.Thread(target=_follow_up, args=(self,), daemon=True).start()
        if self._cancel == "raised":
            raise CancelationException()

    Child._loop, Child._predict, Child._signal_handler = _loop, _predict, _signal_handler


class _Inbox:
    """The worker's end of Cog's pipe, with the messages read early (while looking for a Cancel) put back.
    A Cancel that reaches the idle loop is for a prediction that has ended: its signal was stale."""

    def __init__(self, connection, child, cancel_type):
        self.connection, self.held = connection, []
        self._child, self._cancel_type = child, cancel_type

    def recv(self):
        envelope = self.held.pop(0) if self.held else self.connection.recv()
        if isinstance(envelope.event, self._cancel_type):
            self._child._early_signal = False
        return envelope

    def __getattr__(self, name):
        return getattr(self.connection, name)


def _cancel_waiting(child, tag, cancel_type) -> bool:
    """Whether the early signal was this prediction's: its Cancel message is in the pipe."""
    child._early_signal = False
    inbox = child._events
    pipe = inbox.connection.connection  # Cog's LockedConnection locks sends only
    with critical.section():  # a signal now must not cut a message in half
        deadline = time.monotonic() + EARLY_CANCEL_WAIT_S
        while pipe.poll(max(0.0, deadline - time.monotonic())):
            envelope = pipe.recv()
            if isinstance(envelope.event, cancel_type):
                if envelope.tag == tag:
                    return True
                continue  # an ended prediction's
            inbox.held.append(envelope)
            if time.monotonic() > deadline:
                break
    return False


def _uninterruptible(frame) -> bool:
    """Inside an import (a module cut half-way stays broken) or a models.critical section."""
    if critical.active():
        return True
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _started(child, tag, predict, cancel_type, cancelation, **inputs):
    """The predictor's predict/train, as Cog's _predict calls it (inside _handle_predict_error, so
    cancelable already: a signal from now on raises)."""
    if child._early_signal and _cancel_waiting(child, tag, cancel_type):
        _raise(child, cancelation)
    try:
        return predict(**inputs)
    except Exception as exc:
        if child._cancel == "raised" and not isinstance(exc, cancelation):
            # Code that wraps whatever it catches (a library's fallback, a loader's "not a LoRA")
            # turned the cancel into another error: it is still a cancel.
            raise cancelation() from exc
        raise


def _raise(child, cancelation):
    child._cancel, child._raised_at = "raised", time.monotonic()
    raise cancelation()


def _follow_up(child) -> None:
    """Until the prediction ends: a delayed cancel is signalled again every RETRY_S, and one raised but
    swallowed (a library's `except Exception: pass`) is raised again after RERAISE_S."""
    while child._cancelable and child._cancel != "none":
        time.sleep(RETRY_S)
        if child._cancel == "raised" and time.monotonic() - child._raised_at > RERAISE_S:
            child._cancel = "wanted"
        if child._cancel == "wanted":
            os.kill(os.getpid(), signal.SIGUSR2)


def _unraisable_hook(child, previous, cancelation):
    """A cancel raised inside a weakref callback or __del__ (the garbage collector ran at that moment) is
    printed and dropped by Python: try again at once, and keep it out of the client's logs."""

    def hook(unraisable):
        if isinstance(unraisable.exc_value, cancelation) and child._cancel == "raised":
            child._cancel = "wanted"
            return
        previous(unraisable)

    return hook
