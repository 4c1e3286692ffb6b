"""Image helpers shared by every condition (ControlNet 1.0 semantics), and the checks on uploads."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

# Extreme panoramas would turn a 512 short side into a huge long side and stall the server; a clear
# error beats minutes of work nobody asked for.
MAX_ASPECT_RATIO = 4.0
# Pillow's own guard (about 179 MP) only warns below twice its limit; decoding that much on a shared
# server is already an attack. 64 MP is far above any photo a client would send.
MAX_INPUT_PIXELS = 64_000_000
# The largest sample the jagilley inputs can ask for (768 short side at 4:1); exact sizes keep to it.
MAX_OUTPUT_PIXELS = 768 * 3072
FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"
BAND_PIXELS = 2**20  # pixels of a 16-bit/float image converted to 8 bits at a time


class InputImageError(ValueError):
    """The uploaded image cannot be used; the message says what to change (and never names server paths)."""


def _sniff(path) -> str:
    """Why a file that Pillow refused is not an image, in the client's terms."""
    try:
        head = Path(path).read_bytes()[:512]
    except OSError:
        return "could not be read"
    if not head:
        return "is empty (0 bytes)"
    text = head.lstrip().lower()
    if text.startswith((b"<svg", b"<?xml")) and b"<svg" in text:
        return "is an SVG drawing (vector graphics); export it as PNG first"
    if text.startswith((b"<!doctype html", b"<html")):
        return "is an HTML page, not an image (is the URL a web page rather than the image itself?)"
    return "is not an image format this server reads"


def load_rgb(path) -> np.ndarray:
    """Decode any Pillow-readable file to HxWx3 uint8. Alpha is composited onto white, like the originals.

    Animated files give their first frame, EXIF rotation is applied, and 16-bit / float greyscale is
    scaled to 8 bits rather than clipped.
    """
    try:
        # Pillow warns about malformed metadata (EXIF) it then ignores; Python's warning line names
        # Pillow's own source file on the server. One note in the client's terms instead.
        with warnings.catch_warnings(record=True) as caught, Image.open(path) as img:
            warnings.simplefilter("always")
            width, height = img.size
            if width * height > MAX_INPUT_PIXELS:
                raise InputImageError(
                    f"image is {width}x{height} ({width * height / 1e6:.0f} MP); "
                    f"send at most {MAX_INPUT_PIXELS / 1e6:.0f} MP"
                )
            # Phone photos are stored sideways with an EXIF orientation tag; the map must match
            # the picture the user sees. In place: a copy of a 64 MP float image is 256 MB more.
            ImageOps.exif_transpose(img, in_place=True)
            rgb = to_rgb(img)
        _note_warnings(caught)
        return rgb
    except InputImageError:
        raise
    except Image.DecompressionBombError:
        raise InputImageError(f"image declares more than {MAX_INPUT_PIXELS / 1e6:.0f} MP; send a smaller one") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow's messages name the server's temp file; say what is wrong with the upload instead.
        truncated = "truncated" in str(exc) or isinstance(exc, EOFError)
        reason = "is truncated (the upload or download was cut short)" if truncated else _sniff(path)
        raise InputImageError(f"image could not be decoded: the file {reason}; send a {FORMATS} file") from None


def _note_warnings(caught) -> None:
    notes = dict.fromkeys(" ".join(str(w.message).split())[:160] for w in caught if issubclass(w.category, UserWarning))
    for note in notes:
        print(f"Note: the image's metadata is malformed and was ignored ({note})", flush=True)


def _to_8bit(img: Image.Image) -> np.ndarray:
    """Pillow's convert('L') clips 16-bit and float pixels at 255, turning a 16-bit scan white.

    Converted in bands of rows: float64 temporaries of a few MB whatever the image's size (converted
    whole, a 64 MP 16-bit PNG of 0.6 MB took 1.8 GB), with the same arithmetic, so the same pixels."""
    width, height = img.size
    rows = max(1, BAND_PIXELS // max(1, width))
    bands = [(top, min(height, top + rows)) for top in range(0, height, rows)]

    def band(top: int, bottom: int) -> np.ndarray:
        return np.asarray(img.crop((0, top, width, bottom)), dtype=np.float64)

    high = 0.0
    for top, bottom in bands:
        values = band(top, bottom)
        if not np.isfinite(values).all():
            raise InputImageError("image holds non-finite pixel values (NaN or infinity); send a normal image")
        high = max(high, float(values.max(initial=0)))
    if img.mode.startswith("I;16") or high > 255:
        scale = (lambda v: v / 257.0) if high <= 65535 else (lambda v: v * (255.0 / high))
    elif img.mode == "F" and high <= 1.0:
        scale = lambda v: v * 255.0  # noqa: E731
    else:
        scale = lambda v: v  # noqa: E731
    out = np.empty((height, width), np.uint8)
    for top, bottom in bands:
        out[top:bottom] = np.clip(np.round(scale(band(top, bottom))), 0, 255)
    return out


def to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I") or img.mode == "F":  # greyscale without alpha: the grey in each channel
        return np.repeat(_to_8bit(img)[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def check_aspect(height: int, width: int, what: str = "image") -> None:
    if min(height, width) < 1:
        raise InputImageError(f"{what} is {width}x{height}; it needs at least one pixel each way")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputImageError(
            f"{what} aspect ratio {ratio:.1f}:1 is too extreme; crop it to at most {MAX_ASPECT_RATIO:.0f}:1"
        )


def target_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """Short side scaled to `resolution`, aspect kept, both sides rounded to a multiple of 64."""
    check_aspect(height, width)
    k = resolution / min(height, width)
    return int(np.round(height * k / 64.0)) * 64, int(np.round(width * k / 64.0)) * 64


def _multiple_of_64(side: float) -> int:
    return max(64, int(np.round(side / 64.0)) * 64)


@dataclass(frozen=True)
class SizePlan:
    """How an upload becomes samples: crop it (exact sizes of another aspect), generate at a multiple of
    64, then resize the samples to the size asked for (the same size unless width/height were given)."""

    generate: tuple[int, int]  # (height, width) the pipeline runs at
    output: tuple[int, int]  # (height, width) of the returned samples
    crop: tuple[int, int, int, int] | None = None  # (top, left, height, width) of the upload to use


def plan_size(height: int, width: int, resolution: int, out_width: int = 0, out_height: int = 0) -> SizePlan:
    """jagilley sizing when no exact size is asked; else the exact size, centre-cropping the upload to its
    aspect (A1111's default "crop and resize") so nothing is stretched."""
    if not out_width and not out_height:
        size = target_size(height, width, resolution)
        return SizePlan(size, size)
    check_aspect(height, width)
    if not out_height:
        out_height = max(1, round(out_width * height / width))
    if not out_width:
        out_width = max(1, round(out_height * width / height))
    check_aspect(out_height, out_width, "width x height")
    if out_width * out_height > MAX_OUTPUT_PIXELS:
        raise InputImageError(
            f"width x height {out_width}x{out_height} is {out_width * out_height / 1e6:.1f} MP; "
            f"ask for at most {MAX_OUTPUT_PIXELS / 1e6:.1f} MP"
        )
    crop = None
    if abs(out_width / out_height - width / height) > 0.01 * width / height:
        if width / height > out_width / out_height:  # upload wider than asked: trim its sides
            keep = max(1, round(height * out_width / out_height))
            crop = (0, (width - keep) // 2, height, keep)
        else:
            keep = max(1, round(width * out_height / out_width))
            crop = ((height - keep) // 2, 0, keep, width)
    generate = (_multiple_of_64(out_height), _multiple_of_64(out_width))
    return SizePlan(generate, (out_height, out_width), crop)


def plan_area(height: int, width: int, megapixels: float, out_width: int = 0, out_height: int = 0,
              multiple: int = 16) -> SizePlan:
    """A model family sized by area (Z-Image-Turbo): about `megapixels` at the upload's aspect, sides in
    multiples of `multiple`, when no exact size is asked; else the exact size as plan_size gives it, generated
    at the next multiples of `multiple`."""
    check_aspect(height, width)
    if not out_width and not out_height:
        scale = (megapixels * 2**20 / (height * width)) ** 0.5
        size = tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))
        return SizePlan(size, size)
    plan = plan_size(height, width, 512, out_width, out_height)
    up = tuple(-(-side // multiple) * multiple for side in plan.output)
    return SizePlan(up, plan.output, plan.crop)


def apply_crop(image: np.ndarray, plan: SizePlan) -> np.ndarray:
    if plan.crop is None:
        return image
    top, left, height, width = plan.crop
    return image[top : top + height, left : left + width]


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """lllyasviel's resize_image interpolation: Lanczos when enlarging, area when shrinking."""
    if image.shape[:2] == (height, width):
        return image
    # lllyasviel's test (the short side grows), so the jagilley sizes resize exactly as before.
    enlarging = min(height, width) > min(image.shape[:2])
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LANCZOS4 if enlarging else cv2.INTER_AREA)


def resize_to_resolution(image: np.ndarray, resolution: int) -> np.ndarray:
    """lllyasviel's resize_image: short side to `resolution`, sides rounded to multiples of 64."""
    return resize_to(image, *target_size(*image.shape[:2], resolution))


INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR}


def resize_map(control_map: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    """Detectors round sizes their own way; the map must match the sample size exactly. "image": a map that
    is a picture (tile, ip2p, shuffle, custom) is resized as those conditions resize the upload (resize_to)."""
    if control_map.shape[:2] == (height, width):
        return control_map
    if interpolation == "image":
        return resize_to(control_map, height, width)
    return cv2.resize(control_map, (width, height), interpolation=INTERPOLATIONS[interpolation])


def to_three_channels(single: np.ndarray) -> np.ndarray:
    if single.ndim == 3:
        return single
    return np.repeat(single[:, :, None], 3, axis=2)


# Uploaded maps ("the image already is a control map"): a check catches a photo sent by mistake.
MAP_SHARE = 0.9  # resampling and JPEG smear a real map's edges, so not every pixel need conform


def binary_map_problem(control_map: np.ndarray) -> str | None:
    """Edge, line and scribble maps are white strokes on black: almost every pixel is near 0 or 255."""
    grey = control_map.max(axis=2) if control_map.ndim == 3 else control_map
    share = float(np.mean((grey < 32) | (grey > 223)))
    if share < MAP_SHARE:
        return (
            f"only {share:.0%} of the image's pixels are black or white, so it is not a map of white lines "
            "on black"
        )
    return None


def palette_map_problem(control_map: np.ndarray, palette: np.ndarray) -> str | None:
    """Segmentation maps are flat areas of palette colours."""
    colours, counts = np.unique(control_map.reshape(-1, 3), axis=0, return_counts=True)
    near = np.zeros(len(colours), bool)
    for start in range(0, len(colours), 16384):  # a photo has ~1e5 colours: bound the temporary
        chunk = colours[start : start + 16384, None, :].astype(np.int16)
        near[start : start + 16384] = (np.abs(chunk - palette[None].astype(np.int16)).max(axis=2) <= 8).any(axis=1)
    share = float(counts[near].sum() / counts.sum())
    if share < MAP_SHARE:
        return f"only {share:.0%} of the image's pixels have a colour of the segmentation palette"
    return None


DARK_SHARE = 0.5  # soft line maps (line art, soft edges) are mostly background, and that is black


def dark_background_map_problem(control_map: np.ndarray) -> str | None:
    """Line art and soft-edge maps are light lines on a black background, with grey in between."""
    grey = control_map.max(axis=2) if control_map.ndim == 3 else control_map
    if float(np.mean(grey < 64)) >= DARK_SHARE:
        return None
    if float(np.mean(grey > 191)) >= DARK_SHARE:
        return "it is mostly light: this condition's maps are light lines on black; invert a dark-on-light drawing"
    return f"only {np.mean(grey < 64):.0%} of its pixels are dark, so it is not a map of light lines on black"


# -- editing (img2img, inpainting): the photo and the mask, sized by the request's size plan -------------

MASK_WHITE_FROM = 128  # a grey mask pixel at least this light regenerates
NOTHING_TO_REGENERATE = (
    "mask_image has nothing to regenerate: it is all black (below grey 128) in the part used, after any crop to "
    "width x height; paint white where the image should change"
)


def load_mask(path) -> np.ndarray:
    """A mask upload as grey 0-255 at its own size. Decoded as any upload (alpha onto white), so its
    transparent pixels regenerate, as in OpenAI's image-edit API."""
    return cv2.cvtColor(load_rgb(path), cv2.COLOR_RGB2GRAY)


def crop_to_aspect(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-cropped to height:width's aspect, as plan_size crops (within 1% it is left whole)."""
    h, w = image.shape[:2]
    if abs(width / height - w / h) <= 0.01 * w / h:
        return image
    if w / h > width / height:
        keep = max(1, round(h * width / height))
        return image[:, (w - keep) // 2 : (w - keep) // 2 + keep]
    keep = max(1, round(w * height / width))
    return image[(h - keep) // 2 : (h - keep) // 2 + keep]


@dataclass(frozen=True)
class EditPlan:
    """Where an edit starts and what an inpaint keeps, at the request's sizes."""

    init: np.ndarray  # RGB at the sample size: the photo sampling starts from
    original: np.ndarray  # RGB at the returned size: the pixels an inpaint keeps
    mask: np.ndarray | None = None  # bool at the sample size: True regenerates (None: img2img, all of it)
    feather: np.ndarray | None = None  # float32 0-1 at the returned size: each pixel's share of the sample

    def composite(self, sample: np.ndarray) -> np.ndarray:
        """The sample (at the returned size) where the feathered mask is, the original's own pixels,
        exactly, wherever it is 0."""
        if self.feather is None:
            return sample
        share = self.feather[..., None]
        mixed = np.rint(self.original * (1.0 - share) + sample * share).astype(np.uint8)
        return np.where(share > 0, mixed, self.original)


def plan_edit(photo: np.ndarray, plan: SizePlan, aspect: tuple[int, int], mask: np.ndarray | None = None,
              mask_blur: int = 0) -> EditPlan:
    """The photo (and grey mask) of any size, centre-cropped to `aspect` (height, width: the first unit's
    image as the size plan crops it) and resized as that image is, so they line up with its map. The mask
    is resized grey, then thresholded at MASK_WHITE_FROM; at the returned size its edge is feathered by a
    Gaussian of width 2 x mask_blur + 1, so every pixel farther than mask_blur pixels from the white area
    is the photo's own."""
    photo = crop_to_aspect(photo, *aspect)
    (gen_h, gen_w), (out_h, out_w) = plan.generate, plan.output
    init, original = resize_to(photo, gen_h, gen_w), resize_to(photo, out_h, out_w)
    if mask is None:
        return EditPlan(init, original)
    mask = crop_to_aspect(mask, *aspect)
    regenerate = resize_to(mask, gen_h, gen_w) >= MASK_WHITE_FROM
    if not regenerate.any():
        raise InputImageError(NOTHING_TO_REGENERATE)
    feather = (resize_to(mask, out_h, out_w) >= MASK_WHITE_FROM).astype(np.float32)
    if mask_blur:
        feather = cv2.GaussianBlur(feather, (2 * mask_blur + 1, 2 * mask_blur + 1), 0)
    return EditPlan(init, original, regenerate, feather)
