"""models/urls.py on its own, against a local host: the wall-clock bound holds whatever the host sends,
a cancel stops a download at once, and nothing is left on disk either way. (Through the real server:
tests/test_serving.py and tests/test_cancel.py.)"""

import threading
import time

import pytest

from models.urls import DownloadAborted, URLError, download
from tests.conftest import Receiver

DEADLINE_S = 2.0


@pytest.fixture(scope="module")
def host():
    return Receiver()


@pytest.mark.parametrize("path", ["/trickle", "/trickle-headers"])
def test_a_trickling_host_is_cut_off_at_the_deadline(host, tmp_path, path):
    """requests' read timeout alone let a byte a second hold a download for as long as the host kept sending."""
    dest = tmp_path / "file"
    started = time.monotonic()
    with pytest.raises(URLError, match=r"took over 2s|did not answer in time \(within 2s\)") as error:
        download(host.url(path), dest, "image URL", 2**20, DEADLINE_S)
    assert time.monotonic() - started < DEADLINE_S + 3
    assert "image URL" in str(error.value) and str(tmp_path) not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .partial


def test_an_abort_stops_a_download_at_once(host, tmp_path):
    abort = threading.Event()
    threading.Timer(0.5, abort.set).start()
    started = time.monotonic()
    with pytest.raises(DownloadAborted, match="canceled"):
        download(host.url("/trickle"), tmp_path / "file", "lora_url", 2**20, 30.0, abort=abort)
    assert time.monotonic() - started < 3
    assert list(tmp_path.iterdir()) == []


def test_a_complete_download_is_kept(host, tmp_path):
    host.files["/ok.bin"] = b"x" * 300_000
    path = download(host.url("/ok.bin"), tmp_path / "file", "image URL", 2**20, DEADLINE_S)
    assert path.read_bytes() == b"x" * 300_000 and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
