"""Line art from a photo (ControlNet 1.1's lineart condition): white lines on black.

The two networks are controlnet_aux's LineartDetector, the ones lllyasviel trained on
awacke1/Image-to-Line-Drawings: "realistic" (sk_model.pth, detailed) and "coarse" (sk_model2.pth),
the 1.1 demo's Lineart and Lineart_Coarse preprocessors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
# Importing any controlnet_aux submodule runs the package __init__, which imports every detector
# (a few seconds and a burst of timm/mediapipe warnings, once per process).
from controlnet_aux.lineart import Generator, LineartDetector as AuxLineartDetector

from models import default_device
from models.detectors import require_files
from models.image import dark_background_map_problem

WEIGHTS_FILES = {"realistic": "sk_model.pth", "coarse": "sk_model2.pth"}  # as named in lllyasviel/Annotators


class LineartDetector:
    map_problem = staticmethod(dark_background_map_problem)  # an uploaded map must be light lines on black

    def __init__(self, realistic: torch.nn.Module, coarse: torch.nn.Module):
        self._detector = AuxLineartDetector(realistic, coarse)

    @property
    def networks(self) -> dict[str, torch.nn.Module]:
        return {"realistic": self._detector.model, "coarse": self._detector.model_coarse}

    def __call__(self, image: np.ndarray, lineart_preprocessor: str = "realistic") -> np.ndarray:
        if lineart_preprocessor not in WEIGHTS_FILES:
            raise ValueError(f"lineart_preprocessor must be one of {', '.join(WEIGHTS_FILES)}, not {lineart_preprocessor!r}")
        # controlnet_aux resizes the short side to detect_resolution and the result to image_resolution;
        # asking for the short side we already have keeps the map at the input size (sides are multiples
        # of 64 already). It inverts the network's dark-on-light drawing, as the 1.1 demo fed the model.
        short_side = min(image.shape[:2])
        return self._detector(
            image, coarse=lineart_preprocessor == "coarse", detect_resolution=short_side, image_resolution=short_side,
            output_type="np",
        )

    @classmethod
    def from_weights(cls, folder: Path | None) -> "LineartDetector":
        folder = require_files(folder, WEIGHTS_FILES.values(), "lineart")
        # controlnet_aux's own loader reads a local folder without touching the network.
        aux = AuxLineartDetector.from_pretrained(
            str(folder), filename=WEIGHTS_FILES["realistic"], coarse_filename=WEIGHTS_FILES["coarse"]
        )
        return cls(aux.model.to(default_device()), aux.model_coarse.to(default_device()))

    @classmethod
    def save_random(cls, folder: Path, seed: int = 0) -> None:
        """Each real file is a bare state_dict of Generator(3, 1, 3); these have random weights."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for offset, name in enumerate(WEIGHTS_FILES.values()):
            torch.manual_seed(seed + offset)  # two different networks, so the choice shows in the map
            torch.save(Generator(3, 1, 3).state_dict(), folder / name)
