"""MiDaS relative depth as ControlNet 1.0's depth condition was trained on: nearer is brighter, 0-255.

The network and its loading are the shared MiDaS estimator's (models/midas.py, also behind normal).
"""

from __future__ import annotations

import numpy as np

from models.image import to_three_channels
from models.midas import MidasDepth


def depth_to_map(depth: np.ndarray) -> np.ndarray:
    """lllyasviel's annotator: MiDaS's inverse depth min-max normalised to 0-255 (truncated), grey in 3 channels."""
    depth = np.asarray(depth, dtype=np.float32)
    span = depth.max() - depth.min()
    # A constant depth would divide 0 by 0 (his code then cast NaNs); nothing stands nearer, so all black.
    normalized = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    return to_three_channels((normalized * 255.0).clip(0, 255).astype(np.uint8))


class DepthDetector(MidasDepth):
    def __call__(self, image: np.ndarray) -> np.ndarray:
        return depth_to_map(self.depth(image))
