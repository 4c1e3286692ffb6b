"""ADE20K semantic segmentation coloured with the ADE20K palette (ControlNet 1.0's seg condition).

lllyasviel's annotator ran UniFormer through mmseg; this uses transformers' UperNet + ConvNeXt-small, as the
diffusers `sd-controlnet-seg` model card does. Both predict the same 150 ADE20K classes, and the ControlNet
only ever sees their colours, so the palette is what must match.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import ConvNextConfig, SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

from models.detectors import load_transformers
from models.image import palette_map_problem

# Files of openmmlab/upernet-convnext-small on main. Its weights are pickle-only there (the safetensors copy
# is an unmerged pull request); transformers reads them with torch.load(weights_only=True).
FILES = ("config.json", "preprocessor_config.json", "pytorch_model.bin")

# mmseg's ADE20KDataset palette, RGB, indexed by class id (0 = wall). lllyasviel's annotator painted its
# maps with it, so the ControlNet was trained on these exact colours. Road (6) and skyscraper (48) share
# (140, 140, 140) in the original too: 149 distinct colours for 150 classes.
ADE20K_PALETTE = np.array([
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
], dtype=np.uint8)


class SegDetector:
    def __init__(self, model: UperNetForSemanticSegmentation, processor: SegformerImageProcessor):
        # The auxiliary head only feeds a training loss, yet it runs (and upsamples 150 channels to the
        # input size) on every call unless removed.
        model.auxiliary_head = None
        self.model = model.eval()
        self.processor = processor

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        parameter = next(self.model.parameters())
        pixel_values = self.processor(images=image, return_tensors="pt").pixel_values
        outputs = self.model(pixel_values=pixel_values.to(parameter.device, parameter.dtype))
        # Logits are upsampled to the input size before the argmax, so class borders stay smooth.
        labels = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])[0]
        return ADE20K_PALETTE[labels.cpu().numpy()]

    @staticmethod
    def map_problem(control_map: np.ndarray) -> str | None:
        return palette_map_problem(control_map, ADE20K_PALETTE)

    @classmethod
    def from_weights(cls, folder: Path) -> "SegDetector":
        # fp32 even on CUDA: the network is small next to SD, and half precision can flip the argmax
        # where two classes are close, which changes colours the ControlNet relies on.
        return cls(*load_transformers(folder, UperNetForSemanticSegmentation, SegformerImageProcessor, FILES, "seg"))

    @classmethod
    def save_random(cls, folder: Path, seed: int = 0) -> None:
        """A tiny UperNet + ConvNeXt with the real repo's files, config keys and 512x512 preprocessing."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        backbone = ConvNextConfig(
            hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]
        )
        config = UperNetConfig(
            backbone_config=backbone, num_labels=len(ADE20K_PALETTE), hidden_size=16,
            auxiliary_in_channels=24, auxiliary_channels=8,
        )
        model = UperNetForSemanticSegmentation(config)
        config.save_pretrained(folder)
        # transformers 5 only writes safetensors; the real download is a pickled state dict.
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        # The real preprocessor_config.json holds SegformerImageProcessor's defaults (512x512, ImageNet
        # mean/std); this writes the same keys.
        SegformerImageProcessor().save_pretrained(folder)
