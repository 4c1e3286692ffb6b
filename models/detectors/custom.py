"""A condition you trained yourself has no detector: the upload is the control map.

The base runs this "detector" on the image already resized to the sample size with the interpolation
the trainer used for the conditioning images (models.image.resize_to), so the map the ControlNet sees
is the one it learned from.
"""

from __future__ import annotations

import numpy as np


class CustomDetector:
    def __call__(self, image: np.ndarray) -> np.ndarray:
        return image

    @classmethod
    def from_weights(cls, folder=None) -> "CustomDetector":
        return cls()
