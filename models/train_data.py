"""Paired training data for a ControlNet: read an archive, check every pair, before any model loads.

The archive (.zip or .tar, optionally compressed) follows the Hugging Face image-folder metadata
convention that diffusers' ControlNet example reads:

    images/<name>                 the targets (what the model should draw)
    conditioning_images/<name>    the control maps, same file names
    prompts.jsonl                 {"file_name": "<name>", "text": "<caption>"} per line
                                  (or prompts.csv with the columns file_name,text)

optionally inside one top-level folder. Every problem is reported at once, with the names involved,
so a user fixes the archive in one round instead of paying for a GPU start per mistake.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from models import archives
from models.archives import Bounds
from models.image import InputImageError, load_rgb, resize_to

IMAGES = "images"
CONDITIONING = "conditioning_images"
CAPTION_FILES = ("prompts.jsonl", "prompts.csv")
# What an archive may unpack to (archive bombs: a few MB can unpack to many GB). A training set is
# PNG/JPEG images, compressed already, so it unpacks to about its archive's size (photos stored as
# BMP/TIFF deflate by a few times): 20 times is far above a real set, and a 10 MB bomb stops at
# 256 MiB. The totals are the environment's (CONTROLNET_TRAIN_MAX_UNPACKED_MB,
# CONTROLNET_TRAIN_MAX_FILES): 16 GiB holds ~20,000 pairs of 512 px PNG photos, 200,000 files
# twice fill50k (the 50,000 pairs of diffusers' example).
MAX_UNPACKED_MB = 16384
MAX_FILES = 200_000
MAX_RATIO = 20
RATIO_FLOOR = 256 * 2**20
LISTED = 5  # names quoted per problem; the count says how many more


class TrainingDataError(ValueError):
    """The training archive cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Pair:
    name: str
    image: Path  # target
    conditioning: Path  # control map
    caption: str


def _names(items) -> str:
    items = sorted(items)
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return ", ".join(items[:LISTED]) + more


def unpack_bounds(archive_bytes: int) -> Bounds:
    """What a training archive may unpack to: CONTROLNET_TRAIN_MAX_UNPACKED_MB and CONTROLNET_TRAIN_MAX_FILES,
    and at most MAX_RATIO times the archive's own size (with RATIO_FLOOR for small archives)."""
    env = os.environ.get
    max_bytes = int(float(env("CONTROLNET_TRAIN_MAX_UNPACKED_MB", str(MAX_UNPACKED_MB))) * 2**20)
    return Bounds(max_bytes=min(max_bytes, max(RATIO_FLOOR, MAX_RATIO * archive_bytes)),
                  max_entries=int(env("CONTROLNET_TRAIN_MAX_FILES", str(MAX_FILES))))


def unpack(archive: Path, dest: Path) -> Path:
    """Extract a .zip or .tar(.gz/.bz2/.xz) into dest within unpack_bounds(); paths that leave it, links
    and device files are refused."""
    archive = Path(archive)
    try:
        return archives.unpack(archive, dest, unpack_bounds(archive.stat().st_size), what="the pairs archive")
    except archives.NotAnArchive:
        raise TrainingDataError(
            "pairs must be a .zip or .tar archive holding images/, conditioning_images/ and prompts.jsonl "
            "(or prompts.csv); this file is neither a zip nor a tar"
        ) from None
    except archives.ArchiveError as exc:
        raise TrainingDataError(str(exc)) from None


def _visible_files(folder: Path) -> dict[str, Path]:
    # macOS zips carry __MACOSX/ and ._name resource forks, and editors leave dotfiles.
    return {p.name: p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def _find_root(folder: Path) -> Path:
    """The folder holding images/ and conditioning_images/: the archive's root or its one top folder."""
    candidates = [folder] + [p for p in folder.iterdir() if p.is_dir() and p.name != "__MACOSX"]
    for candidate in candidates:
        if (candidate / IMAGES).is_dir() and (candidate / CONDITIONING).is_dir():
            return candidate
    found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_dir())[:10]
    raise TrainingDataError(
        f"the archive needs a folder {IMAGES}/ (targets) and a folder {CONDITIONING}/ (control maps, same "
        f"file names) at its top, beside prompts.jsonl; it holds the folders: {', '.join(found) or 'none'}"
    )


def _read_captions(root: Path) -> dict[str, str]:
    present = [root / name for name in CAPTION_FILES if (root / name).is_file()]
    if not present:
        raise TrainingDataError(
            "no captions: put prompts.jsonl (one {\"file_name\": \"<name>\", \"text\": \"<caption>\"} per line) "
            "or prompts.csv (columns file_name,text) beside images/"
        )
    path = present[0]
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise TrainingDataError(f"{path.name} is not UTF-8 text (line {line} holds the byte 0x{exc.object[exc.start]:02x}); "
                                "save it as UTF-8") from None
    rows: list[tuple[int, dict]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise TrainingDataError(f"{path.name} line {number} is not JSON: {line[:80]!r}") from None
            if not isinstance(row, dict):
                raise TrainingDataError(f"{path.name} line {number} is not a JSON object: {line[:80]!r}")
            rows.append((number, row))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or not {"file_name", "text"} <= set(reader.fieldnames):
            raise TrainingDataError(f"{path.name} needs a header row with the columns file_name,text")
        rows = [(number, row) for number, row in enumerate(reader, 2)]
    captions: dict[str, str] = {}
    for number, row in rows:
        if "file_name" not in row or "text" not in row:
            raise TrainingDataError(f"{path.name} line {number} needs both file_name and text")
        # Image-folder metadata may name the file relative to the metadata file (images/<name>).
        name = Path(str(row["file_name"])).name
        captions[name] = str(row["text"] or "").strip()
    return captions


def read_pairs(
    archive: Path, dest: Path, resolution: int, log: Callable[[str], None] = print
) -> list[Pair]:
    """Unpack and check the archive; every pair decodes and has a caption, or TrainingDataError says
    which do not. Sizes that differ are fine (every pair is resized to `resolution`) and logged."""
    folder = unpack(archive, Path(dest))
    root = _find_root(folder)
    targets, maps = _visible_files(root / IMAGES), _visible_files(root / CONDITIONING)
    if not targets and not maps:
        raise TrainingDataError(f"no pairs: {IMAGES}/ and {CONDITIONING}/ are empty")
    problems = []
    if targets.keys() - maps.keys():
        problems.append(f"{len(targets.keys() - maps.keys())} target(s) in {IMAGES}/ have no control map of the "
                        f"same name in {CONDITIONING}/: {_names(targets.keys() - maps.keys())}")
    if maps.keys() - targets.keys():
        problems.append(f"{len(maps.keys() - targets.keys())} control map(s) in {CONDITIONING}/ have no target of "
                        f"the same name in {IMAGES}/: {_names(maps.keys() - targets.keys())}")
    names = sorted(targets.keys() & maps.keys())
    if not names and not problems:
        raise TrainingDataError("no pairs")
    captions = _read_captions(root)
    uncaptioned = [n for n in names if not captions.get(n)]
    if uncaptioned:
        problems.append(f"{len(uncaptioned)} pair(s) have no caption (or an empty one) in the prompts file: "
                        f"{_names(uncaptioned)}")
    sizes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
    unreadable = []
    for name in names:
        try:
            sizes[name] = (load_rgb(targets[name]).shape[:2], load_rgb(maps[name]).shape[:2])
        except InputImageError as exc:
            unreadable.append(f"{name} ({exc})")
    if unreadable:
        problems.append(f"{len(unreadable)} pair(s) have an image that cannot be decoded: {_names(unreadable)}")
    if problems:
        raise TrainingDataError("the training data cannot be used:\n- " + "\n- ".join(problems))
    if not names:
        raise TrainingDataError("no pairs")

    unused = sorted(captions.keys() - set(names))
    if unused:
        log(f"WARNING: {len(unused)} caption(s) name no pair and are ignored: {_names(unused)}")
    mismatched = [n for n, (t, c) in sizes.items() if t != c]
    if mismatched:
        log(f"WARNING: {len(mismatched)} pair(s) have a target and a control map of different sizes; both are "
            f"resized to {resolution}x{resolution}, so check they are aligned: {_names(mismatched)}")
    counts = Counter(t for t, _ in sizes.values())
    if len(counts) > 1 or any(shape != (resolution, resolution) for shape in counts):
        listed = ", ".join(f"{w}x{h} ({n})" for (h, w), n in counts.most_common(LISTED))
        log(f"Sizes {listed}: every pair is resized (short side) and centre-cropped to {resolution}x{resolution}")
    log(f"Training data: {len(names)} pairs, captions from {next(n for n in CAPTION_FILES if (root / n).is_file())}")
    return [Pair(n, targets[n], maps[n], captions[n]) for n in names]


def square(path: Path, resolution: int) -> np.ndarray:
    """HxWx3 uint8 at resolution x resolution: the short side resized with the interpolation serving uses
    (models.image.resize_to), then the centre crop diffusers' recipe takes."""
    rgb = load_rgb(path)
    height, width = rgb.shape[:2]
    scale = resolution / min(height, width)
    new_h, new_w = max(resolution, round(height * scale)), max(resolution, round(width * scale))
    rgb = resize_to(rgb, new_h, new_w)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    return np.ascontiguousarray(rgb[top : top + resolution, left : left + resolution])

