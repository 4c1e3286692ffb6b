"""Stable Diffusion 1.5 + one ControlNet, loaded from local folders only.

fp16 with torch SDPA attention on CUDA (diffusers' default attention processor in torch 2), fp32 on
CPU, DDIM so that `eta` means what it meant in ControlNet 1.0, and no safety checker, like the
originals (it blacks out images and costs seconds of start-up).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from models import default_device
from models.image import resize_map, resize_to_resolution, target_size


def _variant(folder: Path) -> str | None:
    """Use the fp16 files when the download holds them (half the bytes to read at start-up)."""
    return "fp16" if any(folder.glob("*.fp16.safetensors")) else None


def load_pipeline(base_dir: Path, controlnet_dir: Path, device: str | None = None) -> StableDiffusionControlNetPipeline:
    device = device or default_device()
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    base_dir, controlnet_dir = Path(base_dir), Path(controlnet_dir)

    def load(cls, folder: Path, **kwargs):
        return cls.from_pretrained(
            folder, torch_dtype=dtype, variant=_variant(folder), local_files_only=True, **kwargs
        )

    pipe = StableDiffusionControlNetPipeline(
        vae=load(AutoencoderKL, base_dir / "vae"),
        text_encoder=load(CLIPTextModel, base_dir / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(base_dir / "tokenizer", local_files_only=True),
        unet=load(UNet2DConditionModel, base_dir / "unet"),
        controlnet=load(ControlNetModel, controlnet_dir),
        # SD 1.5 ships a PNDM config; its betas, steps_offset=1 and set_alpha_to_one=False give
        # the same DDIM timesteps as ldm's sampler that ControlNet 1.0 used.
        scheduler=DDIMScheduler.from_pretrained(base_dir / "scheduler", local_files_only=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass
class Result:
    control_map: np.ndarray  # HxWx3 uint8, exactly what the ControlNet saw
    samples: list[Image.Image]
    seconds: float


class ControlNetRunner:
    """Image in, control map and samples out. What differs per condition is passed in, not branched on.

    detect_at_resolution: the detector runs on the input resized to `detect_resolution` and its map is
    resized to the sample size with `map_interpolation`; otherwise it runs on the image already at
    the sample size (canny, scribble).
    """

    def __init__(
        self,
        pipe: StableDiffusionControlNetPipeline,
        detector: Callable[..., np.ndarray],
        *,
        detect_at_resolution: bool,
        map_interpolation: str = "bilinear",
    ):
        self.pipe = pipe
        self.detector = detector
        self.detect_at_resolution = detect_at_resolution
        self.map_interpolation = map_interpolation

    def control_map(self, image: np.ndarray, image_resolution: int, detect_resolution: int, **options) -> np.ndarray:
        if not self.detect_at_resolution:
            return self.detector(resize_to_resolution(image, image_resolution), **options)
        height, width = target_size(*image.shape[:2], image_resolution)
        detected = self.detector(resize_to_resolution(image, detect_resolution), **options)
        return resize_map(detected, height, width, self.map_interpolation)

    @torch.inference_mode()
    def __call__(
        self,
        image: np.ndarray,
        *,
        prompt: str,
        negative_prompt: str,
        num_samples: int,
        image_resolution: int,
        steps: int,
        guidance_scale: float,
        eta: float,
        seed: int,
        detect_resolution: int = 512,
        **options,
    ) -> Result:
        start = time.perf_counter()
        control = self.control_map(image, image_resolution, detect_resolution, **options)
        height, width = control.shape[:2]
        # A CPU generator gives the same noise for a seed on any device.
        generator = torch.Generator(device="cpu").manual_seed(seed)
        samples = self.pipe(
            prompt=prompt,
            negative_prompt=negative_prompt,
            image=Image.fromarray(control),
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            eta=eta,
            num_images_per_prompt=num_samples,
            generator=generator,
            output_type="pil",
        ).images
        return Result(control, samples, time.perf_counter() - start)
