"""Surface normals from NormalBAE (Bae et al., ScanNet), as ControlNet 1.1's normalbae model was trained on.

Not 1.0's normals from MiDaS depth (models/detectors/normal.py): another network and another convention, so
the normal image carries both and picks by controlnet_version. The network and its inference are
controlnet_aux's NormalBaeDetector (EfficientNet-B5 encoder, the file lllyasviel/Annotators' scannet.pt).

Why not controlnet_aux's own loader: it builds the network at its real size only (hard-coded widths), so a
tiny random file could not go through it. `network()` builds controlnet_aux's NNET with each layer as wide
as the file says (the real file gives the real network: a test checks it layer by layer), and
`save_random()` writes a narrow one in the same format and key names.
"""

from __future__ import annotations

import contextlib
import io
import types
from pathlib import Path

import numpy as np
import torch
# Importing any controlnet_aux submodule runs the package __init__, which imports every detector
# (a few seconds and a burst of timm/mediapipe warnings, once per process).
from controlnet_aux.normalbae import NormalBaeDetector as AuxNormalBaeDetector
from controlnet_aux.normalbae.nets.NNET import NNET
from controlnet_aux.normalbae.nets.submodules.submodules import UpSampleBN

from models import default_device
from models.detectors import fit_to_state, require_files

WEIGHTS_FILE = "scannet.pt"  # as named in lllyasviel/Annotators
# controlnet_aux's settings for the ScanNet model (NormalBaeDetector.from_pretrained).
ARGS = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                             importance_ratio=0.7)
# The decoder's forward hard-codes these three widths (x_d2, x_d3, x_d4); every other width is the file's.
FIXED_WIDTHS = {"up2": 512, "up3": 256, "up4": 128}


def _quietly(build):
    # controlnet_aux's Encoder prints two progress lines per build.
    with contextlib.redirect_stdout(io.StringIO()):
        return build()


def network(state: dict[str, torch.Tensor]) -> NNET:
    """controlnet_aux's NNET at the widths of `state` (scannet.pt's "model", without DataParallel's prefix)."""
    with torch.device("meta"):
        nnet = _quietly(lambda: NNET(ARGS))
    return fit_to_state(nnet, state).eval()


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """scannet.pt as controlnet_aux's load_checkpoint reads it ("model", keys without "module.")."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {key.removeprefix("module."): value for key, value in checkpoint["model"].items()}


class NormalBaeDetector:
    def __init__(self, network: torch.nn.Module):
        self._detector = AuxNormalBaeDetector(network)

    @property
    def network(self) -> torch.nn.Module:
        return self._detector.model

    def __call__(self, image: np.ndarray) -> np.ndarray:
        # controlnet_aux resizes the short side to detect_resolution and the result to image_resolution;
        # asking for the short side we already have keeps the map at the input size. Its map is 1.1's: the
        # normal's (x, y, z) in [-1, 1] as RGB 0-255, unnormalised, as the 1.1 model was trained on.
        short_side = min(image.shape[:2])
        return self._detector(image, detect_resolution=short_side, image_resolution=short_side, output_type="np")

    @classmethod
    def from_weights(cls, folder: Path | None) -> "NormalBaeDetector":
        folder = require_files(folder, [WEIGHTS_FILE], "normal")
        return cls(network(read_state(folder / WEIGHTS_FILE)).to(default_device()))

    @classmethod
    def save_random(cls, folder: Path, seed: int = 0) -> None:
        """scannet.pt's format ({"model": state_dict} with DataParallel's "module." prefix) with random
        weights: the same EfficientNet-B5 depth at a tenth of its widths, the decoder's free widths cut too."""
        with torch.device("meta"):
            nnet = _quietly(lambda: NNET(ARGS))
        # Building NNET imported controlnet_aux's vendored geffnet (through torch.hub) under that top-level name.
        from geffnet.efficientnet_builder import BN_EPS_TF_DEFAULT
        from geffnet.gen_efficientnet import _gen_efficientnet

        torch.manual_seed(seed)
        encoder = _gen_efficientnet("tf_efficientnet_b5_ap", channel_multiplier=0.1, depth_multiplier=2.2,
                                    bn_eps=BN_EPS_TF_DEFAULT, pad_type="same")
        encoder.global_pool, encoder.classifier = torch.nn.Identity(), torch.nn.Identity()
        nnet.encoder.original_model = encoder
        with torch.no_grad():
            features = nnet.encoder(torch.zeros(1, 3, 64, 64))
        # The decoder reads features 4, 5, 6, 8 and 11 (x_block0..4), as its forward does.
        block0, block1, block2, block3, block4 = (features[i].shape[1] for i in (4, 5, 6, 8, 11))
        decoder = nnet.decoder
        decoder.conv2 = torch.nn.Conv2d(block4, block4, kernel_size=1)
        decoder.up1 = UpSampleBN(block4 + block3, 64)
        decoder.up2 = UpSampleBN(64 + block2, FIXED_WIDTHS["up2"])
        decoder.up3 = UpSampleBN(FIXED_WIDTHS["up2"] + block1, FIXED_WIDTHS["up3"])
        decoder.up4 = UpSampleBN(FIXED_WIDTHS["up3"] + block0, FIXED_WIDTHS["up4"])
        for name in ("out_conv_res8", "out_conv_res4", "out_conv_res2", "out_conv_res1"):
            head = getattr(decoder, name).to_empty(device="cpu")
            for layer in head.modules():
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {f"module.{key}": value for key, value in nnet.state_dict().items()}
        torch.save({"model": state}, folder / WEIGHTS_FILE)
