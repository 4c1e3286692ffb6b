"""ControlNet 1.1's ip2p (Instruct Pix2Pix) condition has no detector: the control map is the upload.

The base runs this "detector" on the image already resized to the sample size, as the 1.1 demo did; the
prompt says what to change ("make it winter"). The model was trained on half instruction prompts and half
description prompts, so either works; lllyasviel found "make it into X" works better than "make Y into X".
"""

from __future__ import annotations

import numpy as np


class Ip2pDetector:
    def __call__(self, image: np.ndarray) -> np.ndarray:
        return image

    @classmethod
    def from_weights(cls, folder=None) -> "Ip2pDetector":
        return cls()
