"""MiDaS depth turned into a normal map, as ControlNet 1.0's normal condition was trained on.

The depth comes from transformers' DPT-Hybrid (Intel/dpt-hybrid-midas, the MiDaS v3 DPT-Hybrid weights that
lllyasviel's annotator loaded from dpt_hybrid-midas-501f0c75.pt). One difference remains: his annotator ran
the network on the image at detect resolution, while transformers' hybrid DPT only accepts its 384x384
training size, so the depth is predicted at 384x384 and resized to the input before the Sobel filters.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from transformers import BitConfig, DPTConfig, DPTForDepthEstimation, DPTImageProcessor

from models.detectors import load_transformers

# Files of Intel/dpt-hybrid-midas on main; its weights are pickle-only there (the safetensors copy is an
# unmerged pull request). transformers reads them with torch.load(weights_only=True).
FILES = ("config.json", "preprocessor_config.json", "pytorch_model.bin")

# The z component before normalisation: lllyasviel's `a`. Larger values flatten every normal.
Z = np.pi * 2.0


def depth_to_normal(depth: np.ndarray, bg_threshold: float) -> np.ndarray:
    """lllyasviel's annotator/midas normal, returned with the channels flipped as the 1.0 model expects.

    `depth` is MiDaS's raw relative inverse depth (larger = nearer). Pixels whose min-max normalised depth is
    below `bg_threshold` (0-1) count as background and get the flat normal. His gradio_normal2image fed the
    ControlNet `detected_map[:, :, ::-1]`, so the map here is (z, y, x): flat = (255, 127, 127).
    """
    depth = np.asarray(depth, dtype=np.float32)
    span = depth.max() - depth.min()
    # A constant depth map would divide 0 by 0; it has no gradient anyway, so every normal is flat.
    normalized = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    # Gradients of the raw depth, not the normalised one: their size against Z sets how tilted normals look.
    x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    z = np.full_like(x, Z)
    background = normalized < bg_threshold
    x[background] = 0
    y[background] = 0
    normal = np.stack([x, y, z], axis=2)
    normal /= np.sum(normal**2.0, axis=2, keepdims=True) ** 0.5
    image = (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
    # cv2.resize, which the caller applies next, rejects the negative strides of a flipped view.
    return np.ascontiguousarray(image[:, :, ::-1])


class NormalDetector:
    def __init__(self, model: DPTForDepthEstimation, processor: DPTImageProcessor):
        self.model = model.eval()
        self.processor = processor

    @torch.inference_mode()
    def depth(self, image: np.ndarray) -> np.ndarray:
        """Raw predicted depth, resized (bicubic, like transformers' post-processing) to the input's size."""
        parameter = next(self.model.parameters())
        pixel_values = self.processor(images=image, return_tensors="pt").pixel_values
        outputs = self.model(pixel_values=pixel_values.to(parameter.device, parameter.dtype))
        depth = self.processor.post_process_depth_estimation(outputs, target_sizes=[image.shape[:2]])[0]
        return depth["predicted_depth"].float().cpu().numpy()

    def __call__(self, image: np.ndarray, bg_threshold: float = 0.0) -> np.ndarray:
        return depth_to_normal(self.depth(image), bg_threshold)

    @classmethod
    def from_weights(cls, folder: Path) -> "NormalDetector":
        # fp32 even on CUDA, as lllyasviel ran it: the Sobel filters differentiate neighbouring depths, and
        # fp16 rounds them to 11 significant bits, so its rounding steps would show up as stripes.
        return cls(*load_transformers(folder, DPTForDepthEstimation, DPTImageProcessor, FILES, "normal"))

    @classmethod
    def save_random(cls, folder: Path, seed: int = 0) -> None:
        """A tiny DPT-Hybrid (BiT stem + ViT) with the real repo's files, config keys and 384x384 preprocessing."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        # Three BiT stages like the real one (stride 16 = the ViT patch size); the first two feed the neck.
        backbone = BitConfig(
            layer_type="bottleneck", global_padding="same", embedding_dynamic_padding=True, embedding_size=8,
            hidden_sizes=[16, 32, 64], depths=[1, 1, 1], num_groups=4, out_features=["stage1", "stage2", "stage3"],
        )
        config = DPTConfig(
            is_hybrid=True, backbone_config=backbone, backbone_featmap_shape=[1, 64, 24, 24],
            image_size=384, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=37, backbone_out_indices=[0, 0, 0, 1], readout_type="project",
            neck_hidden_sizes=[16, 32, 32, 32], reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=16,
        )
        model = DPTForDepthEstimation(config)
        # A fresh head predicts depths near 1e-4, whose Sobel gradients vanish next to Z and leave every
        # normal flat. Scaling its last layer makes the tiny model's normals tilt, as a trained MiDaS's do
        # at object edges, so tests can see the background threshold act.
        with torch.no_grad():
            model.head.head[-2].weight.mul_(1e5)
        config.save_pretrained(folder)
        # transformers 5 only writes safetensors; the real download is a pickled state dict.
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        # transformers' conversion script saved the real file from DPTImageProcessor(size=384), i.e. these
        # defaults: 384x384 bicubic, mean = std = 0.5 (the x / 127.5 - 1 input lllyasviel's annotator used).
        DPTImageProcessor().save_pretrained(folder)
