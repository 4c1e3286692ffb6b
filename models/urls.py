"""Fetching a URL a client gave us, bounded and, when asked, never towards the server's own network.

Every server-side fetch (image inputs, training archives, LoRAs, embeddings, COG_WEIGHTS, init_from)
goes through `download`: one wall-clock deadline for the whole transfer (`Deadline`), redirects
followed by hand so each hop is checked, and with CONTROLNET_BLOCK_PRIVATE_URLS=1 a URL whose host
resolves to a loopback, private, link-local (cloud metadata), shared or reserved address refused. The check resolves the name itself; a DNS answer that changes between the check and the
connection (rebinding) is not covered, so hosted deployments should also filter egress.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

MAX_REDIRECTS = 5


class URLError(ValueError):
    """The URL cannot be fetched; the message says why, in the client's terms."""


class DownloadAborted(URLError):
    """The download was stopped from outside (a cancel), not by anything the host did."""


def block_private() -> bool:
    return os.environ.get("CONTROLNET_BLOCK_PRIVATE_URLS", "").strip().lower() in ("1", "true", "yes", "on")


REFUSED_FETCH = "which this server does not fetch; use a public URL or send the file as a data: URI"


def check_url(url: str, what: str, refused: str = REFUSED_FETCH) -> None:
    """Raise URLError unless `url` is http(s) and, under the private-address switch, every address its
    host resolves to is global; `refused` ends the message for a refused address."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise URLError(f"{what} must be an http(s) URL or a data: URI")
    if not block_private():
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError):
        raise URLError(f"{what}: the host {parts.hostname!r} does not resolve; check the URL") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if not address.is_global:
            raise URLError(
                f"{what}: {parts.hostname} is a private, loopback or link-local address, {refused}")


class Deadline:
    """One download's wall-clock bound, whatever the host sends.

    requests' timeouts bound each socket operation, not the transfer: a host that sends a byte a second
    (body or headers) never trips them. So every connection of the download is opened through this
    object's session, and a watchdog thread shuts the connection's socket when the time is up or
    `abort` is set; the blocked read returns at once and the download fails with the reason.
    """

    def __init__(self, seconds: float, abort: threading.Event | None = None):
        self.seconds = seconds
        self.abort = abort or threading.Event()
        self.reason: str | None = None  # "deadline" or "aborted", once the watchdog has acted
        self._end = time.monotonic() + seconds
        self._finished = threading.Event()
        self._sockets: list[socket.socket] = []
        self.session = requests.Session()
        adapter = _WatchedAdapter(self._sockets.append)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def timeouts(self) -> tuple[float, float]:
        """(connect, read) for one hop: never past the deadline, so the watchdog is the backstop."""
        left = max(0.1, self._end - time.monotonic())
        return min(10.0, left), min(30.0, left)

    def check(self, what: str, host: str | None, answered: bool = True) -> None:
        """Raise the watchdog's reason, if it acted; `answered`: the host had sent its headers."""
        if self.reason == "aborted":
            raise DownloadAborted(f"{what}: the download from {host} was canceled")
        if self.reason == "deadline" and not answered:
            raise URLError(f"{what}: {host} did not answer in time (within {self.seconds:.0f}s); check the URL")
        if self.reason == "deadline":
            raise URLError(f"{what}: downloading from {host} took over {self.seconds:.0f}s; use a faster host or a "
                           "smaller file")

    def __enter__(self) -> "Deadline":
        threading.Thread(target=self._watch, daemon=True, name="download-deadline").start()
        return self

    def __exit__(self, *exc) -> None:
        self._finished.set()
        self.session.close()

    def _watch(self) -> None:
        while not self._finished.wait(0.05):
            if self.reason is None:
                if self.abort.is_set():
                    self.reason = "aborted"
                elif time.monotonic() >= self._end:
                    self.reason = "deadline"
            if self.reason:  # again on each tick: a connection opening now is shut as soon as it has a socket
                for sock in list(self._sockets):
                    with contextlib.suppress(OSError):
                        # The plain socket's shutdown, also under TLS: the SSL object stays intact for the
                        # thread blocked reading it, which then sees the end of the stream.
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _WatchedAdapter(HTTPAdapter):
    """Hands the socket of every connection its pools open to `register`, once connected (urllib3's pool
    hook `_new_conn`; the socket itself, because http.client lets go of it when a response owns it)."""

    def __init__(self, register):
        super().__init__()
        self._register = register

    def get_connection_with_tls_context(self, *args, **kwargs):
        pool = super().get_connection_with_tls_context(*args, **kwargs)
        if not getattr(pool, "_watched", False):
            new_conn = pool._new_conn

            def watched_new_conn():
                connection = new_conn()
                connect = connection.connect

                def watched_connect():
                    connect()
                    self._register(connection.sock)

                connection.connect = watched_connect
                return connection

            pool._new_conn = watched_new_conn
            pool._watched = True
        return pool


def open_url(url: str, what: str, deadline: "Deadline") -> requests.Response:
    """A streaming 200 response for `url`, every redirect hop checked; the caller closes it."""
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url, what)
        host = urllib.parse.urlsplit(url).hostname
        try:
            response = deadline.session.get(url, stream=True, timeout=deadline.timeouts(), allow_redirects=False)
        except requests.Timeout:
            deadline.check(what, host, answered=False)
            raise URLError(f"{what}: {host} did not answer in time; check the URL") from None
        except requests.RequestException as exc:
            deadline.check(what, host, answered=False)
            raise URLError(f"{what}: could not connect to {host} ({type(exc).__name__}); check the URL") from None
        if response.is_redirect:
            response.close()
            url = urllib.parse.urljoin(url, response.headers["location"])
            continue
        if response.status_code != 200:
            response.close()
            raise URLError(f"{what}: {host} answered HTTP {response.status_code}; check the URL")
        return response
    raise URLError(f"{what}: more than {MAX_REDIRECTS} redirects; send the file's own URL")


def human(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def stream_to(response: requests.Response, out, what: str, max_bytes: int, deadline: "Deadline") -> int:
    """Copy a response into `out` until done, over `max_bytes`, past the deadline or aborted."""
    host = urllib.parse.urlsplit(response.url).hostname
    declared = int(response.headers.get("Content-Length") or 0)
    if declared > max_bytes:
        response.close()
        raise URLError(f"{what} is {human(declared)}; send at most {human(max_bytes)}")
    size = 0
    try:
        for chunk in response.iter_content(2**20):
            size += len(chunk)
            if size > max_bytes:
                raise URLError(f"{what} is over {human(max_bytes)}; send a smaller file")
            out.write(chunk)
    except requests.Timeout:
        deadline.check(what, host)
        raise URLError(f"{what}: {host} stopped sending; check the URL") from None
    except requests.RequestException as exc:
        deadline.check(what, host)
        raise URLError(f"{what}: the download from {host} failed ({type(exc).__name__})") from None
    finally:
        response.close()
    deadline.check(what, host)  # a body without a length ends at the shut socket like a complete one
    return size


def download(url: str, dest: Path, what: str, max_bytes: int, deadline_s: float,
             abort: threading.Event | None = None) -> Path:
    """`url` into `dest` within `deadline_s` in all (or until `abort` is set), all or nothing: a failed
    download leaves no file behind."""
    partial = Path(f"{dest}.partial")
    try:
        with Deadline(deadline_s, abort) as deadline, open(partial, "wb") as out:
            stream_to(open_url(url, what, deadline), out, what, max_bytes, deadline)
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest
