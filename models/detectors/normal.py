"""MiDaS depth turned into a normal map, as ControlNet 1.0's normal condition was trained on.

The depth is the shared MiDaS estimator's (models/midas.py, also behind depth): lllyasviel's DPT-Hybrid and
file, run on the image at detect resolution as his annotator did.
"""

from __future__ import annotations

import cv2
import numpy as np

from models.midas import MidasDepth

# The z component before normalisation: lllyasviel's `a`. Larger values flatten every normal.
Z = np.pi * 2.0


def depth_to_normal(depth: np.ndarray, bg_threshold: float) -> np.ndarray:
    """lllyasviel's annotator/midas normal, returned with the channels flipped as the 1.0 model expects.

    `depth` is MiDaS's raw relative inverse depth (larger = nearer). Pixels whose min-max normalised depth is
    below `bg_threshold` (0-1) count as background and get the flat normal. His gradio_normal2image fed the
    ControlNet `detected_map[:, :, ::-1]`, so the map here is (z, y, x): flat = (255, 127, 127).
    """
    depth = np.asarray(depth, dtype=np.float32)
    span = depth.max() - depth.min()
    # A constant depth map would divide 0 by 0; it has no gradient anyway, so every normal is flat.
    normalized = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    # Gradients of the raw depth, not the normalised one: their size against Z sets how tilted normals look.
    x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    z = np.full_like(x, Z)
    background = normalized < bg_threshold
    x[background] = 0
    y[background] = 0
    normal = np.stack([x, y, z], axis=2)
    normal /= np.sum(normal**2.0, axis=2, keepdims=True) ** 0.5
    image = (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
    # cv2.resize, which the caller applies next, rejects the negative strides of a flipped view.
    return np.ascontiguousarray(image[:, :, ::-1])


class NormalDetector(MidasDepth):
    condition = "normal"

    def __call__(self, image: np.ndarray, bg_threshold: float = 0.0) -> np.ndarray:
        return depth_to_normal(self.depth(image), bg_threshold)
