"""Output images to files: PNG (lossless), WebP or JPEG, several at once, off the request's thread.

PNG is written at zlib level 1: the pixels are the same at every level, and level 1 took about half
the time of Pillow's default (6) for ~12% more bytes on a photo-like sample (docs/benchmarks.md, "CPU:
encoding and HTTP overhead"). Pillow releases the GIL while it compresses, so a small thread pool
encodes the samples and the control maps side by side, and the maps while the pipeline runs.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

FORMATS = ("png", "webp", "jpg")
PNG_COMPRESS_LEVEL = 1
# WebP method 0..6 trades speed for size; 4 (libwebp's default) was ~3x slower than 0 for ~15% fewer
# bytes at the same quality.
WEBP_METHOD = 0

_pool: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        # Up to 4 samples and 3 maps per request; more threads than cores only queue.
        _pool = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="encode")
    return _pool


def save_options(fmt: str, quality: int) -> dict:
    """Pillow's save() arguments for one format; quality (1-100) applies to webp and jpg."""
    if fmt == "png":
        return {"format": "PNG", "compress_level": PNG_COMPRESS_LEVEL}
    if fmt == "webp":
        return {"format": "WEBP", "quality": quality, "method": WEBP_METHOD}
    if fmt == "jpg":
        return {"format": "JPEG", "quality": quality}
    raise ValueError(f"output_format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def save(img, stem: str, fmt: str = "png", quality: int = 80) -> str:
    """Write `img` (a PIL image) to `stem` plus the format's extension; returns the path."""
    options = save_options(fmt, quality)
    if fmt == "jpg" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    path = f"{stem}.{fmt}"
    img.save(path, **options)
    return path


def submit(img, stem: str, fmt: str = "png", quality: int = 80) -> Future:
    """save() on the encoding pool: a Future of the path."""
    save_options(fmt, quality)  # a bad format fails here, in the caller
    return pool().submit(save, img, stem, fmt, quality)
