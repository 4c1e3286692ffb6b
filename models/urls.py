"""Fetching a URL a client gave us, bounded and, when asked, never towards the server's own network.

Every server-side fetch (image inputs, LoRAs, embeddings, COG_WEIGHTS) goes through `open_url`:
redirects are followed by hand so each hop is checked, and with CONTROLNET_BLOCK_PRIVATE_URLS=1 a URL
whose host resolves to a loopback, private, link-local (cloud metadata), shared or reserved address is
refused. The check resolves the name itself; a DNS answer that changes between the check and the
connection (rebinding) is not covered, so hosted deployments should also filter egress.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
import urllib.parse
from pathlib import Path

import requests

MAX_REDIRECTS = 5


class URLError(ValueError):
    """The URL cannot be fetched; the message says why, in the client's terms."""


def block_private() -> bool:
    return os.environ.get("CONTROLNET_BLOCK_PRIVATE_URLS", "").strip().lower() in ("1", "true", "yes", "on")


def check_url(url: str, what: str) -> None:
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
                f"{what}: {parts.hostname} is a private, loopback or link-local address, which this server does "
                "not fetch; use a public URL or send the file as a data: URI"
            )


def open_url(url: str, what: str, timeout: tuple[float, float] = (10.0, 30.0)) -> requests.Response:
    """A streaming 200 response for `url`, every redirect hop checked; the caller closes it."""
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url, what)
        host = urllib.parse.urlsplit(url).hostname
        try:
            response = requests.get(url, stream=True, timeout=timeout, allow_redirects=False)
        except requests.Timeout:
            raise URLError(f"{what}: {host} did not answer in time; check the URL") from None
        except requests.RequestException as exc:
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


def stream_to(response: requests.Response, out, what: str, max_bytes: int, deadline_s: float) -> int:
    """Copy a response into `out` until done, over `max_bytes` or past `deadline_s` (a trickling server)."""
    host = urllib.parse.urlsplit(response.url).hostname
    declared = int(response.headers.get("Content-Length") or 0)
    if declared > max_bytes:
        raise URLError(f"{what} is {human(declared)}; send at most {human(max_bytes)}")
    deadline = time.monotonic() + deadline_s
    size = 0
    try:
        for chunk in response.iter_content(2**20):
            size += len(chunk)
            if size > max_bytes:
                raise URLError(f"{what} is over {human(max_bytes)}; send a smaller file")
            if time.monotonic() > deadline:
                raise URLError(f"{what}: downloading from {host} took over {deadline_s:.0f}s; use a faster host or a smaller file")
            out.write(chunk)
    except requests.Timeout:
        raise URLError(f"{what}: {host} stopped sending; check the URL") from None
    except requests.RequestException as exc:
        raise URLError(f"{what}: the download from {host} failed ({type(exc).__name__})") from None
    finally:
        response.close()
    return size


def download(url: str, dest: Path, what: str, max_bytes: int, deadline_s: float) -> Path:
    """`url` into `dest`, all or nothing: a failed download leaves no file behind."""
    partial = Path(f"{dest}.partial")
    try:
        with open(partial, "wb") as out:
            stream_to(open_url(url, what, timeout=(10.0, min(30.0, deadline_s))), out, what, max_bytes, deadline_s)
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest
