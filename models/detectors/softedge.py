"""Soft edges for ControlNet 1.1's softedge model: PiDiNet or HED, each plain or "safe".

The 1.1 model was trained on all four of the demo's preprocessors (SoftEdge_PIDI, SoftEdge_PIDI_safe,
SoftEdge_HED, SoftEdge_HED_safe); PiDiNet is the demo's default. "Safe" quantises the edge strength to
a few levels, which hides the faint gradients some photos leak into the map. Both networks and their
inference are controlnet_aux's: PidiNetDetector (table5_pidinet.pth) and HEDdetector with lllyasviel's
Apache-2.0 HED (ControlNetHED.pth, the network of the hed condition; loaded here too because each image
carries only its own detector module).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
# Importing any controlnet_aux submodule runs the package __init__, which imports every detector
# (a few seconds and a burst of timm/mediapipe warnings, once per process).
from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector
from controlnet_aux.pidi import PidiNetDetector
from controlnet_aux.pidi.model import pidinet

from models import default_device
from models.detectors import require_files
from models.image import dark_background_map_problem

HED_FILE = "ControlNetHED.pth"  # as named in lllyasviel/Annotators
PIDI_FILE = "table5_pidinet.pth"
PREPROCESSORS = ("pidinet", "pidinet_safe", "hed", "hed_safe")


class SoftEdgeDetector:
    map_problem = staticmethod(dark_background_map_problem)  # an uploaded map must be light edges on black

    def __init__(self, pidinet_network: torch.nn.Module, hed_network: torch.nn.Module):
        self._detectors = {"pidinet": PidiNetDetector(pidinet_network), "hed": HEDdetector(hed_network)}

    @property
    def networks(self) -> dict[str, torch.nn.Module]:
        return {name: detector.netNetwork for name, detector in self._detectors.items()}

    def __call__(self, image: np.ndarray, softedge_preprocessor: str = "pidinet") -> np.ndarray:
        if softedge_preprocessor not in PREPROCESSORS:
            raise ValueError(
                f"softedge_preprocessor must be one of {', '.join(PREPROCESSORS)}, not {softedge_preprocessor!r}"
            )
        network, _, safe = softedge_preprocessor.partition("_")
        # Asking for the short side the image already has keeps the map at the input size (controlnet_aux
        # would otherwise resize to its detect and image resolutions).
        short_side = min(image.shape[:2])
        return self._detectors[network](
            image, detect_resolution=short_side, image_resolution=short_side, safe=bool(safe), output_type="np"
        )

    @classmethod
    def from_weights(cls, folder: Path | None) -> "SoftEdgeDetector":
        folder = require_files(folder, [PIDI_FILE, HED_FILE], "softedge")
        # controlnet_aux's own loaders read a local folder without touching the network.
        pidi = PidiNetDetector.from_pretrained(str(folder), filename=PIDI_FILE).netNetwork
        hed = HEDdetector.from_pretrained(str(folder), filename=HED_FILE).netNetwork
        return cls(pidi.to(default_device()), hed.to(default_device()))

    @classmethod
    def save_random(cls, folder: Path, seed: int = 0) -> None:
        """The real files with random weights: PiDiNet's training checkpoint ({"state_dict": ...} with
        DataParallel's "module." prefix, as controlnet_aux reads it) and HED's bare state_dict."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        state = {f"module.{key}": value for key, value in pidinet().state_dict().items()}
        torch.save({"state_dict": state}, folder / PIDI_FILE)
        hed = ControlNetHED_Apache2()
        with torch.no_grad():
            # The real network subtracts a learned per-channel mean from 0-255 pixels; zero would leave
            # that path untested.
            hed.norm.uniform_(100.0, 150.0)
        torch.save(hed.state_dict(), folder / HED_FILE)
