"""Canny edges, computed on the image already resized to the sample size (ControlNet 1.0's canny2image)."""

from __future__ import annotations

import cv2
import numpy as np

from models.image import binary_map_problem, to_three_channels


class CannyDetector:
    map_problem = staticmethod(binary_map_problem)  # an uploaded map must be edges: white on black

    def __call__(self, image: np.ndarray, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
        return to_three_channels(cv2.Canny(image, low_threshold, high_threshold))

    @classmethod
    def from_weights(cls, folder=None) -> "CannyDetector":
        return cls()
