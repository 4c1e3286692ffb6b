"""Start, wait for and stop a real Cog HTTP server in a subprocess (tests and the quickstart)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from scripts.cog_config import ROOT


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind this process like Ctrl-C does, so every `with CogServer(...)` stops its server.

    The server runs in a session of its own (see launch()), so a signal to this process never reaches
    it; without a handler SIGTERM ends this process on the spot and leaves the server running,
    holding its port. Installed once, only over the default action, only from the main thread
    (Python runs handlers there)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_exit)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CogServer:
    def __init__(
        self, condition: str, port: int | None = None, log_path: Path | None = None, env: dict | None = None,
        args: list[str] | None = None, mode: str = "predict", weights: str = "",
    ):
        """mode "train" serves /trainings (Cog's --x-mode train); weights becomes the server's COG_WEIGHTS."""
        self.condition = condition
        self.args = list(args or []) + ["--mode", mode] + (["--weights", weights] if weights else [])
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path or ROOT / "outputs" / f"server-{condition}-{self.port}.log")
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "CogServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 300) -> None:
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:  # Ctrl-C or SIGTERM while it sets up: `with` calls no __exit__ then
            self.stop()
            raise

    def launch(self) -> None:
        """Start the process without waiting, so several servers can set up at once."""
        exit_on_sigterm()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # A session of its own, so stop() also reaches the prediction worker it spawns.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scripts.serve", self.condition, "--port", str(self.port), *self.args],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Cog server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            status = self.health()
            if status == "READY":
                return
            if status == "SETUP_FAILED":
                self.stop()
                raise RuntimeError(f"Cog server setup failed:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Cog server not READY after {timeout:.0f}s:\n{self.log()[-4000:]}")

    def health(self) -> str | None:
        try:
            return requests.get(f"{self.url}/health-check", timeout=5).json().get("status")
        except (requests.RequestException, ValueError):
            return None

    def predict(self, inputs: dict, timeout: float = 600) -> requests.Response:
        return requests.post(f"{self.url}/predictions", json={"input": inputs}, timeout=timeout)

    def train(self, inputs: dict, timeout: float = 24 * 3600) -> requests.Response:
        return requests.post(f"{self.url}/trainings", json={"input": inputs}, timeout=timeout)

    def stop(self, timeout: float = 10) -> float:
        """SIGTERM to Cog's HTTP process only (it stops its worker itself; a signal to the whole group
        also hits the worker mid-flight), SIGKILL to the group after `timeout`; returns the seconds taken."""
        if self.process is None:
            return 0.0
        start = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # The worker may outlive its parent by a moment; nothing of the group may be left behind.
        deadline = time.monotonic() + 5
        while group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_alive(self.process.pid):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        return time.monotonic() - start


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
