"""HED soft edges (ControlNet 1.0's hed condition, with lllyasviel's Apache-2.0 HED network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
# Importing any controlnet_aux submodule runs the package __init__, which imports every detector
# (a few seconds and a burst of timm/mediapipe warnings, once per process).
from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

from models import default_device
from models.detectors import require_files

WEIGHTS_FILE = "ControlNetHED.pth"  # as named in lllyasviel/Annotators


class HedDetector:
    def __init__(self, network: torch.nn.Module):
        self._detector = HEDdetector(network)

    @property
    def network(self) -> torch.nn.Module:
        return self._detector.netNetwork

    def __call__(self, image: np.ndarray) -> np.ndarray:
        # controlnet_aux's inference is lllyasviel's line for line, but it first resizes the short
        # side to detect_resolution and the result to image_resolution; asking for the short side
        # we already have keeps the map at the input size (sides rounded to multiples of 64, which
        # the caller's images already are).
        short_side = min(image.shape[:2])
        return self._detector(image, detect_resolution=short_side, image_resolution=short_side, output_type="np")

    @classmethod
    def from_weights(cls, folder: Path | None) -> "HedDetector":
        folder = require_files(folder, [WEIGHTS_FILE], "hed")
        # controlnet_aux's own loader reads a local folder without touching the network.
        detector = HEDdetector.from_pretrained(str(folder), filename=WEIGHTS_FILE)
        return cls(detector.netNetwork.to(default_device()))

    @classmethod
    def save_random(cls, folder: Path, seed: int = 0) -> None:
        """The real file is a bare state_dict of ControlNetHED_Apache2; this one has random weights."""
        torch.manual_seed(seed)
        network = ControlNetHED_Apache2()
        with torch.no_grad():
            # The real network subtracts a learned per-channel mean from 0-255 pixels; zero would
            # leave that path untested.
            network.norm.uniform_(100.0, 150.0)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(network.state_dict(), folder / WEIGHTS_FILE)
