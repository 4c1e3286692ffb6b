"""MiDaS v3 DPT-Hybrid relative depth: one estimator for the depth and normal conditions.

Why controlnet_aux's MiDaS (lllyasviel's annotator code and his file, dpt_hybrid-midas-501f0c75.pt) and not
transformers' DPT (Intel/dpt-hybrid-midas, the same weights converted):
- parity: ControlNet 1.0 ran MiDaS on the image at detect_resolution, any aspect ratio. transformers' hybrid
  DPT only accepts its 384x384 training size (its neck assumes a square grid), so every map would have been
  predicted on a squashed 384x384 image and stretched back. Here the network sees what 1.0's saw.
- tiny-weight testability: its module tree is fixed at the real size (123 M parameters, 490 MB, seconds per
  map on a CPU), but every width is readable from the file. `network()` rebuilds the same modules, from
  controlnet_aux's and timm's own classes, at the widths a file holds: the real file gives the real network
  (a test checks it matches controlnet_aux's module for module) and the tiny file, in the same format and key
  names, a tiny one, through the same loader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from controlnet_aux.midas.midas.blocks import Interpolate, _make_scratch
from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel, _make_fusion_block
from controlnet_aux.midas.midas.vit import _make_vit_b_rn50_backbone
from timm.layers import HybridEmbed, StdConv2dSame
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer

from models import default_device
from models.detectors import require_files

WEIGHTS_FILE = "dpt_hybrid-midas-501f0c75.pt"  # as named in lllyasviel/Annotators
# Not readable from the file (they shape no tensor): the real model's, which the tiny one keeps.
HEADS = 12
HOOKS = [0, 1, 8, 11]  # transformer blocks 8 and 11 feed the neck, so every network has at least 12
IMAGE_SIZE = 384  # the position embeddings' grid is 384 / 16 per side; forward_flex resizes it per image
PREFIX = "pretrained.model."
BACKBONE = PREFIX + "patch_embed.backbone."


@dataclass(frozen=True)
class Widths:
    """Everything about a DPT-Hybrid that a state dict records."""

    stem: int = 64
    layers: tuple[int, ...] = (3, 4, 9)
    channels: tuple[int, ...] = (256, 512, 1024)
    embed_dim: int = 768
    depth: int = 12
    mlp_hidden: int = 3072
    classes: int = 1000
    features: int = 256

    @classmethod
    def of(cls, state: dict[str, torch.Tensor]) -> "Widths":
        stages = sorted({int(m[1]) for key in state if (m := re.match(re.escape(BACKBONE) + r"stages\.(\d+)\.", key))})
        blocks = [{key.split(".")[7] for key in state if key.startswith(f"{BACKBONE}stages.{s}.blocks.")} for s in stages]
        return cls(
            stem=state[BACKBONE + "stem.conv.weight"].shape[0],
            layers=tuple(len(b) for b in blocks),
            channels=tuple(state[f"{BACKBONE}stages.{s}.blocks.0.conv3.weight"].shape[0] for s in stages),
            embed_dim=state[PREFIX + "cls_token"].shape[-1],
            depth=len({key.split(".")[3] for key in state if key.startswith(PREFIX + "blocks.")}),
            mlp_hidden=state[PREFIX + "blocks.0.mlp.fc1.weight"].shape[0],
            classes=state[PREFIX + "head.weight"].shape[0],
            features=state["scratch.layer1_rn.weight"].shape[0],
        )


class _DPTHybrid(DPTDepthModel):
    """controlnet_aux's DPTDepthModel (its forward, its hooks, its head) at the given widths."""

    def __init__(self, widths: Widths):
        torch.nn.Module.__init__(self)
        self.channels_last = False
        # timm's R50 stem and stages for vit_base_r50_s16_384: 'same' padding, weight-standardised convs.
        resnet = ResNetV2(
            layers=widths.layers, channels=widths.channels, stem_chs=widths.stem, num_classes=0, global_pool="",
            preact=False, stem_type="same", conv_layer=partial(StdConv2dSame, eps=1e-8),
        )
        vit = VisionTransformer(
            img_size=IMAGE_SIZE, patch_size=1, embed_dim=widths.embed_dim, depth=widths.depth, num_heads=HEADS,
            mlp_ratio=widths.mlp_hidden / widths.embed_dim, num_classes=widths.classes,
            embed_layer=partial(HybridEmbed, backbone=resnet),
        )
        vit_features = [widths.channels[0], widths.channels[1], widths.embed_dim, widths.embed_dim]
        self.pretrained = _make_vit_b_rn50_backbone(
            vit, features=vit_features, size=[IMAGE_SIZE, IMAGE_SIZE], hooks=HOOKS, vit_features=widths.embed_dim,
            use_readout="project",
        )
        self.scratch = _make_scratch(vit_features, widths.features, groups=1, expand=False)
        for index in range(1, 5):
            setattr(self.scratch, f"refinenet{index}", _make_fusion_block(widths.features, False))
        self.scratch.output_conv = _head(widths.features)


def _head(features: int) -> torch.nn.Sequential:
    """DPTDepthModel.__init__'s head, which it builds inline."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(features, features // 2, kernel_size=3, stride=1, padding=1),
        Interpolate(scale_factor=2, mode="bilinear", align_corners=True),
        torch.nn.Conv2d(features // 2, 32, kernel_size=3, stride=1, padding=1),
        torch.nn.ReLU(True),
        torch.nn.Conv2d(32, 1, kernel_size=1, stride=1, padding=0),
        torch.nn.ReLU(True),  # non_negative=True, as the annotator built it
        torch.nn.Identity(),
    )


def network(widths: Widths = Widths()) -> DPTDepthModel:
    return _DPTHybrid(widths).eval()


class MidasDepth:
    """MiDaS's relative inverse depth (larger = nearer) of an RGB image, at the image's own size.

    The conditions subclass it: each adds its `__call__` and shares loading and the tiny writer.
    """

    condition: ClassVar[str] = "depth"  # the `make weights COND=` a missing file's error names

    def __init__(self, model: torch.nn.Module):
        # Anything mapping a 1x3xHxW batch in [-1, 1] to 1xHxW depths; sides must be multiples of 32,
        # which the caller's detect-resolution images (multiples of 64) are.
        self.model = model.eval()

    @torch.inference_mode()
    def depth(self, image: np.ndarray) -> np.ndarray:
        parameter = next(self.model.parameters())
        # lllyasviel's annotator: x / 127.5 - 1 on the RGB pixels, no resize, no other normalisation.
        x = torch.from_numpy(np.array(image, dtype=np.float32)).to(parameter.device) / 127.5 - 1.0
        return self.model(x.permute(2, 0, 1)[None])[0].float().cpu().numpy()

    @classmethod
    def from_weights(cls, folder: Path | None):
        folder = require_files(folder, [WEIGHTS_FILE], cls.condition)
        state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        with torch.device("meta"):
            model = network(Widths.of(state))
        # fp32 even on CUDA, as lllyasviel ran it (normal differentiates neighbouring depths).
        model.load_state_dict(state, assign=True)
        return cls(model.to(default_device()))

    @classmethod
    def save_random(cls, folder: Path, seed: int = 0) -> None:
        """A tiny DPT-Hybrid in the real file's format: a bare state dict with the real key names."""
        torch.manual_seed(seed)
        # GroupNorm keeps 32 groups in the R50 stages, so their narrowest width is 32 per bottleneck.
        model = network(Widths(stem=32, layers=(1, 1, 1), channels=(128, 128, 128), embed_dim=24,
                               mlp_hidden=48, classes=10, features=16))
        with torch.no_grad():
            # A fresh head predicts near-constant depths, whose Sobel gradients vanish next to normal's
            # z = 2*pi and leave every normal flat. Scaling its last layer makes the tiny model's depth
            # vary across the image as a trained MiDaS's does, so tests can see maps and thresholds act.
            model.scratch.output_conv[4].weight.mul_(100.0)
            model.scratch.output_conv[4].bias.fill_(15.0)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), folder / WEIGHTS_FILE)
