"""Content shuffle (ControlNet 1.1's shuffle condition): the image's pixels moved along a smooth random flow.

The 1.1 model learned to recompose an image from such a shuffle, so it carries the upload's colours and
textures, not its layout. controlnet_aux's ContentShuffleDetector draws the flow from numpy's global
random state; the 1.1 demo seeded that state first, so the same request gave the same map. Here the seed
is fixed (the demo's default seed), so the map depends on the image alone and a request's seed keeps
selecting the samples as on every other image; numpy's global state is restored afterwards.
"""

from __future__ import annotations

import numpy as np
# Importing any controlnet_aux submodule runs the package __init__, which imports every detector
# (a few seconds and a burst of timm/mediapipe warnings, once per process).
from controlnet_aux.shuffle import ContentShuffleDetector as AuxShuffleDetector

SEED = 12345
FLOW_SCALE = 256  # the demo's f: the flow's noise is drawn on a grid of this many pixels, then smoothed


class ShuffleDetector:
    # No map_problem: a shuffle map is the photo's own pixels moved, which no check tells from a photo, and an
    # unshuffled upload sent as the map (control_image_is_map) is a use of its own: the layout is kept.

    def __init__(self):
        self._detector = AuxShuffleDetector()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        short_side = min(height, width)
        saved = np.random.get_state()
        np.random.seed(SEED)
        try:
            # The demo shuffled at the sample size: the caller passes the image already at that size, and
            # asking for its own short side keeps it there.
            return self._detector(
                image, h=height, w=width, f=FLOW_SCALE, detect_resolution=short_side, image_resolution=short_side,
                output_type="np",
            )
        finally:
            np.random.set_state(saved)

    @classmethod
    def from_weights(cls, folder=None) -> "ShuffleDetector":
        return cls()
