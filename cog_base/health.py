"""Whether this worker can still serve, for Cog's /health-check and Kubernetes' probes.

An unexpected failure may be the request's (an input nobody foresaw) or the worker's (CUDA in a bad
state, a library left half-initialised: the cancelled first training of issue 16 broke every later
one while /health-check said READY). Counting failures cannot tell them apart, and would let one
client's retries take a server down; so after each unexpected failure the worker runs a self-test,
a one-step generation on its own drawing. If that fails too, the worker is broken: /health-check
says UNHEALTHY with the reason (Cog calls `healthcheck()` in the worker), and under Kubernetes the
readiness file Cog wrote is removed and an `unhealthy` file written beside it, which the deploy
manifests' liveness probe watches, so the pod leaves the rotation and is restarted. A later success
(self-test or request) clears it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

# Where Cog 0.16.12 writes its readiness file under Kubernetes (cog/server/probes.py).
PROBE_ROOT = Path("/var/run/cog")


class WorkerHealth:
    def __init__(self, probe_root: Path | None = None, log: Callable[[str], None] = print):
        self.problem: str | None = None
        self.log = log
        # Only where Cog itself keeps probe files: elsewhere nothing outside the process is touched.
        self.probe_root = probe_root if probe_root is not None else (
            PROBE_ROOT if "KUBERNETES_SERVICE_HOST" in os.environ else None)

    def after_unexpected_failure(self, error: BaseException, self_test: Callable[[], None]) -> None:
        try:
            self_test()
        except Exception as exc:
            if type(exc).__name__ == "CancelationException":
                raise
            self._broken(f"a request failed unexpectedly ({type(error).__name__}) and so did the worker's "
                         f"self-test ({type(exc).__name__}); restart the server")
        else:
            self.log("Self-test after the unexpected error passed: the server is healthy")
            self.succeeded()

    def succeeded(self) -> None:
        if self.problem is None:
            return
        self.problem = None
        self.log("The worker served again: healthy")
        if self.probe_root is not None:
            (self.probe_root / "unhealthy").unlink(missing_ok=True)
            if self.probe_root.is_dir():
                (self.probe_root / "ready").touch()

    def check(self) -> bool:
        """What Cog's health check calls: an exception's message becomes /health-check's
        `user_healthcheck_error`, beside status UNHEALTHY."""
        if self.problem is not None:
            raise RuntimeError(self.problem)
        return True

    def _broken(self, problem: str) -> None:
        self.problem = problem
        self.log(f"UNHEALTHY: {problem}")
        if self.probe_root is not None and self.probe_root.is_dir():
            (self.probe_root / "ready").unlink(missing_ok=True)
            (self.probe_root / "unhealthy").write_text(problem + "\n")
