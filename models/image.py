"""Image helpers shared by every condition (ControlNet 1.0 semantics)."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageOps

# Extreme panoramas would turn a 512 short side into a huge long side and stall the server; a clear
# error beats minutes of work nobody asked for.
MAX_ASPECT_RATIO = 4.0
# Pillow's own guard (about 179 MP) only warns below twice its limit; decoding that much on a shared
# server is already an attack. 64 MP is far above any photo a client would send.
MAX_INPUT_PIXELS = 64_000_000


class InputImageError(ValueError):
    """The uploaded image cannot be used; the message says what to change."""


def load_rgb(path) -> np.ndarray:
    """Decode any Pillow-readable file to HxWx3 uint8. Alpha is composited onto white, like the originals."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_INPUT_PIXELS:
                raise InputImageError(
                    f"image is {width}x{height} ({width * height / 1e6:.0f} MP); "
                    f"send at most {MAX_INPUT_PIXELS / 1e6:.0f} MP"
                )
            # Phone photos are stored sideways with an EXIF orientation tag; the map must match
            # the picture the user sees.
            return to_rgb(ImageOps.exif_transpose(img))
    except InputImageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputImageError(
            f"image could not be decoded ({exc}); send a PNG, JPEG or WebP file as a URL or data: URI"
        ) from exc


def to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def target_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """Short side scaled to `resolution`, aspect kept, both sides rounded to a multiple of 64."""
    if min(height, width) < 1:
        raise InputImageError(f"image is {width}x{height}; it needs at least one pixel each way")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputImageError(
            f"image aspect ratio {ratio:.1f}:1 is too extreme; crop it to at most {MAX_ASPECT_RATIO:.0f}:1"
        )
    k = resolution / min(height, width)
    return int(np.round(height * k / 64.0)) * 64, int(np.round(width * k / 64.0)) * 64


def resize_to_resolution(image: np.ndarray, resolution: int) -> np.ndarray:
    """lllyasviel's resize_image: Lanczos when enlarging, area when shrinking."""
    height, width = image.shape[:2]
    new_h, new_w = target_size(height, width, resolution)
    enlarging = resolution > min(height, width)
    interpolation = cv2.INTER_LANCZOS4 if enlarging else cv2.INTER_AREA
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR}


def resize_map(control_map: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    """Detectors round sizes their own way; the map must match the sample size exactly."""
    if control_map.shape[:2] == (height, width):
        return control_map
    return cv2.resize(control_map, (width, height), interpolation=INTERPOLATIONS[interpolation])


def to_three_channels(single: np.ndarray) -> np.ndarray:
    if single.ndim == 3:
        return single
    return np.repeat(single[:, :, None], 3, axis=2)
