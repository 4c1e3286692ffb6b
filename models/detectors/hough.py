"""Straight lines by M-LSD, drawn white on black (ControlNet 1.0's hough condition).

The network and its line decoding are controlnet_aux's (the same code as lllyasviel's annotator);
only the drawing is done here, at the size of the image the caller passes in.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
# Importing any controlnet_aux submodule runs the package __init__, which imports every detector
# (a few seconds and a burst of timm/mediapipe warnings, once per process).
from controlnet_aux.mlsd import MLSDdetector
from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
from controlnet_aux.mlsd.utils import pred_lines

from models import default_device
from models.detectors import require_files
from models.image import binary_map_problem, to_three_channels

WEIGHTS_FILE = "mlsd_large_512_fp32.pth"  # as named in lllyasviel/Annotators
# The network halves the image four times and concatenates skip connections, so both sides must be
# multiples of 16; ControlNet ran it on the detect-resolution image, whose sides are multiples of 64.
_NETWORK_MULTIPLE = 64


class HoughDetector:
    map_problem = staticmethod(binary_map_problem)  # an uploaded map must be lines: white on black

    def __init__(self, model: torch.nn.Module):
        # Anything pred_lines accepts: a module with parameters (it reads their device) that maps a
        # 1x4xHxW batch to the 1x9x(H/2)x(W/2) centre/displacement map.
        self.model = model

    @torch.inference_mode()
    def __call__(self, image: np.ndarray, value_threshold: float = 0.1, distance_threshold: float = 0.1) -> np.ndarray:
        height, width = image.shape[:2]
        network_size = [max(_NETWORK_MULTIPLE, round(side / _NETWORK_MULTIPLE) * _NETWORK_MULTIPLE) for side in (height, width)]
        try:
            lines = pred_lines(image, self.model, network_size, value_threshold, distance_threshold)
        except IndexError:
            # pred_lines indexes an empty array when no segment passes the thresholds; ControlNet
            # gave an empty map then, and so do we (it swallowed every exception; we don't).
            lines = []
        canvas = np.zeros((height, width), dtype=np.uint8)
        for x_start, y_start, x_end, y_end in lines:
            cv2.line(canvas, (int(x_start), int(y_start)), (int(x_end), int(y_end)), 255, 1)
        return to_three_channels(canvas)

    @classmethod
    def from_weights(cls, folder: Path | None) -> "HoughDetector":
        folder = require_files(folder, [WEIGHTS_FILE], "hough")
        # controlnet_aux's own loader reads a local folder without touching the network.
        model = MLSDdetector.from_pretrained(str(folder), filename=WEIGHTS_FILE).model
        return cls(model.to(default_device()))

    @classmethod
    def save_random(cls, folder: Path, seed: int = 0) -> None:
        """The real file is a bare state_dict of MobileV2_MLSD_Large; this one has random weights."""
        torch.manual_seed(seed)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(MobileV2_MLSD_Large().state_dict(), folder / WEIGHTS_FILE)

