"""ControlNet 1.1's inpaint condition: the upload, with the pixels to repaint masked out.

The 1.1 model was trained on the image with masked pixels set to -1 (outside the 0-1 range of every
other map). The mask is the request's `mask_image` when it sends one (white repaints; the predictor
hands it over at the sample size, and the request then inpaints: cog_base's editing path keeps every
pixel outside it). Without one, it is the upload's own alpha channel: transparent pixels (alpha below
128) are the ones to repaint, as in OpenAI's image-edit API; that path only conditions generation on
the unmasked pixels (the samples are generated whole and may differ outside the mask too).
The map is returned as RGBA with those pixels transparent; the pipeline turns them into -1
(models.pipeline.control_image). As in the 1.1 demo, the mask is resized to the sample size, blurred
(sigma 5 px) and thresholded at one half, which rounds its corners and drops specks.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageOps

from models.image import MAX_INPUT_PIXELS, InputImageError

OPAQUE_FROM = 128  # alpha at or above this keeps the pixel
MASK_BLUR = 5.0  # the 1.1 demo's default "Mask Blur" (Gaussian sigma, in sample pixels)
NEEDS_MASK = (
    "inpaint needs a mask: send mask_image (white where to repaint), or a PNG or WebP whose transparent pixels "
    "(alpha 0) mark what to repaint; the image has none (in the part used, after any crop to width x height)"
)
EMPTY_MASK = "inpaint: the transparent area is too small to repaint at this size (under a few pixels); make it larger"
NO_UPLOADED_MAP = (
    "an inpaint control image is the photo and its mask, which an uploaded map cannot carry (its alpha is "
    "composited away); send the photo with transparent pixels where to repaint"
)


def upload_mask(path) -> np.ndarray | None:
    """The upload's pixels to repaint (True), from its alpha channel, at the upload's size and orientation.
    None when it has no transparent pixel, or cannot be read (the image decoder then says why)."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_INPUT_PIXELS:
                return None
            img = ImageOps.exif_transpose(img)  # as models.image.load_rgb, so mask and image line up
            if "A" not in img.getbands() and "transparency" not in img.info:
                return None
            alpha = np.asarray(img.convert("RGBA"))[..., 3]
    except Exception:  # the image decoder reports an unreadable upload in the client's terms
        return None
    mask = alpha < OPAQUE_FROM
    return mask if mask.any() else None


class InpaintDetector:
    @staticmethod
    def map_problem(control_map: np.ndarray) -> str | None:
        return NO_UPLOADED_MAP

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """RGBA: the image, alpha 0 where the model sees -1 (to repaint)."""
        if mask is None:
            raise InputImageError(NEEDS_MASK)
        height, width = image.shape[:2]
        soft = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        masked = cv2.GaussianBlur(soft, (0, 0), MASK_BLUR) > 0.5
        if not masked.any():
            raise InputImageError(EMPTY_MASK)
        alpha = np.where(masked, np.uint8(0), np.uint8(255))
        return np.dstack([image, alpha])

    @classmethod
    def from_weights(cls, folder=None) -> "InpaintDetector":
        return cls()


def request_mask(path, image_resolution, width: int = 0, height: int = 0) -> np.ndarray | None:
    """upload_mask, cropped as the request crops the upload (exact sizes of another aspect), so the mask
    covers the same pixels as the image the detector gets. Invalid sizes are left to the request's checks."""
    from models.image import apply_crop, plan_size

    mask = upload_mask(path)
    if mask is None:
        return None
    try:
        plan = plan_size(*mask.shape, int(image_resolution), int(width or 0), int(height or 0))
    except (TypeError, ValueError):
        return mask
    mask = apply_crop(mask, plan)
    return mask if mask.any() else None
