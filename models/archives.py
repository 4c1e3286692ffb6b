"""Unpacking an archive a client sent (.zip, or .tar optionally compressed), bounded while it unpacks.

A few megabytes can unpack to many gigabytes and a zip's headers may state any size, so neither
`extractall` nor a sum of declared sizes bounds what reaches the disk. Here every member is streamed
with a running count of bytes written and entries made, and the first byte or entry over a bound
stops the unpacking (the caller removes the folder). Paths that leave the folder, links and device
files are refused, and a damaged archive is named by its member: no message quotes a server path.
"""

from __future__ import annotations

import errno
import lzma
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

CHUNK = 2**20
# Python raises these for a truncated or corrupt stream, depending on the compression.
DAMAGED = (tarfile.ReadError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError)


class ArchiveError(ValueError):
    """The archive cannot be unpacked; the message says why, in the client's terms."""


class NotAnArchive(ArchiveError):
    """Neither a zip nor a tar."""


@dataclass(frozen=True)
class Bounds:
    max_bytes: int | None  # all members' content together; None: no bound (an operator's own file)
    max_entries: int | None  # files and folders


def human(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


class _Budget:
    def __init__(self, bounds: Bounds, what: str):
        self.bounds, self.what = bounds, what
        self.bytes = self.entries = 0

    def entry(self, count: int = 1) -> None:
        self.entries += count
        if self.bounds.max_entries is not None and self.entries > self.bounds.max_entries:
            raise ArchiveError(f"{self.what} holds more than {self.bounds.max_entries:,} files and folders; "
                               "send fewer files")

    def spend(self, n: int, declared: bool = False) -> None:
        if not declared:
            self.bytes += n
        if self.bounds.max_bytes is not None and (n if declared else self.bytes) > self.bounds.max_bytes:
            raise ArchiveError(f"{self.what} unpacks to more than {human(self.bounds.max_bytes)}; send a smaller one")


def _target(dest: Path, name: str, what: str) -> Path:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise ArchiveError(f"{what} holds a path outside its folder: {name[:200]!r}")
    return dest.joinpath(*parts)


def _make_dir(target: Path, name: str, what: str) -> None:
    with _clashes(name, what):
        target.mkdir(parents=True, exist_ok=True)


class _clashes:
    """A member whose path another member already took as a file or a folder (or a name longer than
    the file system takes) is the archive's problem; a full disk is the server's and stays an OSError."""

    def __init__(self, name: str, what: str):
        self.name, self.what = name, what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, OSError) and exc.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG):
            problem = "a name too long" if exc.errno == errno.ENAMETOOLONG else "two entries for one path"
            raise ArchiveError(f"{self.what} holds {problem} at {self.name[:200]!r}; pack plain files and folders "
                               "only") from None
        return False


def _copy(source, target: Path, budget: _Budget, name: str) -> None:
    with _clashes(name, budget.what):
        target.parent.mkdir(parents=True, exist_ok=True)
        out = open(target, "wb")
    with out:
        while True:
            try:
                chunk = source.read(CHUNK)
            except DAMAGED as exc:
                raise ArchiveError(_damaged(budget.what, name, exc)) from None
            if not chunk:
                return
            budget.spend(len(chunk))  # before writing: nothing over the bound reaches the disk
            out.write(chunk)


def _damaged(what: str, name: str | None, exc: BaseException) -> str:
    reason = "its checksum does not match" if "CRC" in str(exc) else "it is truncated or corrupt"
    member = f" at {name[:200]!r}" if name else ""
    return f"{what} is damaged{member} ({reason}); pack it again and resend it"


def unpack(archive: Path, dest: Path, bounds: Bounds, what: str = "the archive") -> Path:
    """Extract a .zip or .tar(.gz/.bz2/.xz) into dest; ArchiveError (and a partly filled dest) on any refusal."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(bounds, what)
    if zipfile.is_zipfile(archive):
        _unzip(archive, dest, budget)
        return dest
    try:
        is_tar = tarfile.is_tarfile(archive)
    except (OSError, EOFError, zlib.error, lzma.LZMAError):
        is_tar = False
    if not is_tar:
        raise NotAnArchive(f"{what} is neither a zip nor a tar")
    _untar(archive, dest, budget)
    return dest


def _unzip(archive: Path, dest: Path, budget: _Budget) -> None:
    what = budget.what
    try:
        zf = zipfile.ZipFile(archive)
    except DAMAGED as exc:
        raise ArchiveError(_damaged(what, None, exc)) from None
    with zf:
        infos = zf.infolist()
        # The central directory lists every member: an honest bomb is refused before a byte is written.
        # Its sizes may lie, so the running count while unpacking is the bound that holds.
        budget.spend(sum(i.file_size for i in infos), declared=True)
        budget.entry(len(infos))
        for info in infos:
            target = _target(dest, info.filename, what)
            if info.is_dir():
                _make_dir(target, info.filename, what)
                continue
            try:
                source = zf.open(info)
            except RuntimeError:  # zipfile's words for a password-protected member
                raise ArchiveError(f"{what} is encrypted at {info.filename[:200]!r}; pack it without a password") from None
            except NotImplementedError:
                raise ArchiveError(f"{what} uses a compression method this server cannot read at "
                                   f"{info.filename[:200]!r}; pack it with the standard one (deflate)") from None
            except DAMAGED as exc:
                raise ArchiveError(_damaged(what, info.filename, exc)) from None
            with source:
                _copy(source, target, budget, info.filename)


# tarfile's extraction filter exists from Python 3.11.4 and 3.12 on; Debian bookworm's 3.11.2, which the
# plain-Docker image runs, lacks it (referring to its errors at import time failed every image's setup).
# There the checks below (_target, links refused, plain files and folders only) stand alone.
_DATA_FILTER = getattr(tarfile, "data_filter", None)
# Its refusals, in the client's terms (its own messages name the destination folder).
_UNSAFE = {
    getattr(tarfile, name): kind for name, kind in (
        ("AbsolutePathError", "an absolute path"),
        ("OutsideDestinationError", "a path outside its folder"),
        ("SpecialFileError", "a device or other special file"),
        ("AbsoluteLinkError", "a link"),
        ("LinkOutsideDestinationError", "a link"),
    ) if hasattr(tarfile, name)
}


def _untar(archive: Path, dest: Path, budget: _Budget) -> None:
    what = budget.what
    try:
        tf = tarfile.open(archive)
    except DAMAGED as exc:
        raise ArchiveError(_damaged(what, None, exc)) from None
    with tf:
        while True:
            try:
                member = tf.next()  # one header at a time: a compressed bomb is never listed in full
            except DAMAGED as exc:
                raise ArchiveError(_damaged(what, None, exc)) from None
            if member is None:
                return
            tf.members.clear()  # tarfile keeps every header it read; nothing here looks back
            budget.entry()
            _target(dest, member.name, what)  # before the filter, which would make '/x' relative
            if _DATA_FILTER is not None:
                try:
                    member = _DATA_FILTER(member, str(dest))
                except tarfile.FilterError as exc:
                    kind = _UNSAFE.get(type(exc), "an unsafe entry")
                    raise ArchiveError(f"{what} holds {kind}: {exc.tarinfo.name[:200]!r}; pack plain files and "
                                       "folders only") from None
            if member.issym() or member.islnk():
                raise ArchiveError(f"{what} holds a link: {member.name[:200]!r}; pack the files themselves "
                                   "(tar -h follows links)")
            target = _target(dest, member.name, what)
            if member.isdir():
                _make_dir(target, member.name, what)
            elif member.isreg():
                source = tf.extractfile(member)
                _copy(source, target, budget, member.name)
            else:  # what the filter refuses as special, where there is no filter
                raise ArchiveError(f"{what} holds a device or other special file: {member.name[:200]!r}; pack "
                                   "plain files and folders only")
