"""Whether this worker can still serve, for Cog's /health-check and Kubernetes' probes.

An unexpected failure may be the request's (an input nobody foresaw) or the worker's (CUDA in a bad
state, a library left half-initialised: the cancelled first training of issue 16 broke every later
one while /health-check said READY). Counting failures cannot tell them apart, and would let one
client's retries take a server down; so after each unexpected failure the worker runs a self-test,
a one-step generation on its own drawing. If that fails too, the worker is broken: /health-check
says UNHEALTHY with the reason (Cog calls `healthcheck()` in the worker), and under Kubernetes the
readiness file Cog wrote is removed and an `unhealthy` file written beside it, which the deploy
manifests' liveness probe watches, so the pod leaves the rotation and is restarted.

The state is kept per condition (and ControlNet version): on `multi`, or on a 1.0 image whose 1.1
ControlNet is broken, one condition can fail while the others serve. So the self-test runs on each
condition the failed request used, the state names the broken ones, and only a success on a broken
condition (self-test or request) clears it: a success on another one does not. Its lines (and the
operator's "restart the server") go to the server's log, never into a client's prediction logs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

# Where Cog 0.16.12 writes its readiness file under Kubernetes (cog/server/probes.py).
PROBE_ROOT = Path("/var/run/cog")


class WorkerHealth:
    def __init__(self, probe_root: Path | None = None, log: Callable[[str], None] = print):
        self.problems: dict[str, str] = {}  # what is broken (a condition, "hough ControlNet 1.1") -> why
        self.log = log
        # Only where Cog itself keeps probe files: elsewhere nothing outside the process is touched.
        self.probe_root = probe_root if probe_root is not None else (
            PROBE_ROOT if "KUBERNETES_SERVICE_HOST" in os.environ else None)

    @property
    def problem(self) -> str | None:
        return "; ".join(f"{what}: {why}" for what, why in self.problems.items()) or None

    def after_unexpected_failure(self, error: BaseException, self_tests: dict[str, Callable[[], None]]) -> None:
        """Run the self-test of each thing the failed request used (what -> its self-test): a failing
        one is marked broken, a passing one that was broken is healthy again."""
        for what, self_test in self_tests.items():
            try:
                self_test()
            except Exception as exc:
                if type(exc).__name__ == "CancelationException":
                    raise
                self._broken(what, f"a request failed unexpectedly ({type(error).__name__}) and so did the worker's "
                                   f"self-test ({type(exc).__name__}); restart the server")
            else:
                self.log(f"Self-test of {what} after the unexpected error passed: it is healthy")
                self.succeeded((what,))

    def succeeded(self, used: Iterable[str]) -> None:
        """A request (or self-test) on `used` worked: those are healthy; any other broken one stays so."""
        healed = [what for what in used if what in self.problems]
        if not healed:
            return
        for what in healed:
            del self.problems[what]
            self.log(f"{what} served again: healthy")
        if self.probe_root is None:
            return
        if self.problems:
            if self.probe_root.is_dir():
                (self.probe_root / "unhealthy").write_text(self.problem + "\n")
            return
        (self.probe_root / "unhealthy").unlink(missing_ok=True)
        if self.probe_root.is_dir():
            (self.probe_root / "ready").touch()

    def check(self) -> bool:
        """What Cog's health check calls: an exception's message becomes /health-check's
        `user_healthcheck_error`, beside status UNHEALTHY."""
        if self.problems:
            raise RuntimeError(self.problem)
        return True

    def _broken(self, what: str, problem: str) -> None:
        self.problems[what] = problem
        self.log(f"UNHEALTHY: {what}: {problem}")
        if self.probe_root is not None and self.probe_root.is_dir():
            (self.probe_root / "ready").unlink(missing_ok=True)
            (self.probe_root / "unhealthy").write_text(self.problem + "\n")
