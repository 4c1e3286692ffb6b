"""Files users point the server at (LoRAs, embeddings, fine-tuned checkpoints), fetched into a bounded cache.

A request's asset is an http(s) URL or a `data:` URI: it is streamed to disk with a byte bound, a
time bound and models.urls' address check, kept in an on-disk cache keyed by the URL (a repeat
request does not download again) and evicted least-recently-used when the cache outgrows its size. A start-up asset (COG_WEIGHTS) may also
be a local path; a client's (lora_url, embedding_url, init_from) may not. The operator's archives are
unpacked with tarfile's "data" filter, which refuses absolute paths, links out of the folder and device
files; a client's with models.archives' bounds as well. No Cog here: the shared predictor passes the settings in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import shutil
import tarfile
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path

from models import archives
from models.urls import URLError, download, human

MiB = 2**20


class AssetError(ValueError):
    """An asset could not be fetched or used; the message says what to send instead."""


@dataclass
class AssetCache:
    root: Path
    max_bytes: int = 4096 * MiB  # the whole cache
    max_file_bytes: int = 1024 * MiB  # one asset: SD 1.5 LoRAs are 2-300 MB, embeddings kilobytes
    timeout_s: float = 120.0  # a whole download

    def __post_init__(self):
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, source: str) -> Path:
        return self.root / hashlib.sha256(source.encode()).hexdigest()[:32]

    def fetch(self, source: str, what: str) -> Path:
        """A local file holding the asset; downloads only on a cache miss."""
        source = source.strip()
        path = self.path_for(source)
        if path.is_file():
            os.utime(path)  # most recently used
            return path
        if source.startswith("data:"):
            data = _decode_data_uri(source, what)
            if len(data) > self.max_file_bytes:
                raise AssetError(f"{what} is {human(len(data))}; send at most {human(self.max_file_bytes)}")
            partial = path.with_suffix(".partial")
            partial.write_bytes(data)
            partial.replace(path)  # only a complete file ever has the cache's name
        elif source.startswith(("http://", "https://")):
            self._download(source, path, what)
        else:
            raise AssetError(f"{what} must be an http(s) URL or a data: URI, not {source[:40]!r}")
        self.evict(keep=path)
        return path

    def forget(self, *sources: str) -> None:
        """Drop these assets: one that failed must be fetched again next time (its host may have fixed it)."""
        for source in sources:
            if source:
                self.path_for(source.strip()).unlink(missing_ok=True)

    def _download(self, url: str, path: Path, what: str) -> None:
        try:
            download(url, path, what, self.max_file_bytes, self.timeout_s)
        except URLError as exc:
            raise AssetError(str(exc)) from None

    def evict(self, keep: Path | None = None) -> None:
        files = sorted((p for p in self.root.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for old in files:
            if total <= self.max_bytes:
                break
            if old != keep:
                total -= old.stat().st_size
                old.unlink(missing_ok=True)


def _decode_data_uri(uri: str, what: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise AssetError(f"{what}: a data: URI needs a comma before its payload")
    try:
        if header.endswith(";base64"):
            return base64.b64decode(payload, validate=True)
        return urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise AssetError(f"{what}: the data: URI is not valid base64") from None


def fetch_weights(source: str, cache: AssetCache) -> Path:
    """COG_WEIGHTS: a local file or folder, or a URL; archives (.tar, .tar.gz, .zip) become folders. The
    operator's setting, so a local path is fine and the archive is unpacked as the operator packed it."""
    local = Path(source).expanduser()
    if not source.startswith(("http://", "https://", "data:")):
        if not local.exists():
            raise AssetError(f"COG_WEIGHTS={source!r}: no such file or folder")
        path = local
    else:
        path = cache.fetch(source, "COG_WEIGHTS")
    return _as_folder(path, cache, _unpack_trusted)


def fetch_client_weights(source: str, cache: AssetCache, what: str) -> Path:
    """Weights a client names (init_from): only what a client can reach itself, an http(s) URL or a
    data: URI (a server path would let a client probe and unpack the server's files), and an archive
    unpacks to at most the cache's size and CLIENT_ARCHIVE_ENTRIES files."""
    path = cache.fetch(source, what)  # refuses anything else, in the same words whether or not it exists

    def unpack(archive: Path, folder: Path) -> None:
        try:
            archives.unpack(archive, folder, archives.Bounds(cache.max_bytes, CLIENT_ARCHIVE_ENTRIES), what=f"the {what} archive")
        except archives.ArchiveError as exc:
            raise AssetError(str(exc)) from None

    return _as_folder(path, cache, unpack)


CLIENT_ARCHIVE_ENTRIES = 10_000  # a diffusers folder holds a handful of files


def _unpack_trusted(path: Path, folder: Path) -> None:
    """The operator's archive, through the same bounded unpacker as a client's (one set of path and
    link checks on every Python: `extractall(filter=...)` needs 3.11.4+, and the plain-Docker image runs
    Debian's 3.11.2), with bounds a real checkpoint never meets but a wrong or damaged file does."""
    bounds = archives.Bounds(
        int(float(os.environ.get("CONTROLNET_WEIGHTS_MAX_UNPACKED_MB", "65536")) * 2**20), WEIGHTS_ARCHIVE_ENTRIES
    )
    try:
        archives.unpack(path, folder, bounds, what="the COG_WEIGHTS archive")
    except archives.ArchiveError as exc:
        raise AssetError(str(exc)) from None


WEIGHTS_ARCHIVE_ENTRIES = 100_000


def _as_folder(path: Path, cache: AssetCache, unpack) -> Path:
    if path.is_dir() or not (tarfile.is_tarfile(path) or zipfile.is_zipfile(path)):
        return path
    folder = cache.root / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".d")
    if not (folder / ".unpacked").exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            unpack(path, folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # a refused archive leaves nothing in the cache
            raise
        (folder / ".unpacked").touch()
    # An archive of one folder: use that folder.
    entries = [p for p in folder.iterdir() if p.name != ".unpacked"]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder
