"""The controlnet-multi image: up to three ControlNet units per request, each any of the conditions
(1.0: canny, depth, hed, hough, normal, pose, scribble, seg; 1.1: lineart, softedge, shuffle, tile, ip2p)
with its own image, strength and step window. Not inpaint: its map needs the request's mask (the upload's
alpha today, `mask_image` with the editing inputs), which no unit input carries.

The output is the control map of each active unit, in unit order (unless return_control_map is off),
then the samples. The first unit's image sets the size; the other units' images are centre-cropped to
its aspect. Each unit's detector runs with its condition's default options. The same condition may
be used twice (two images, one ControlNet in memory).
"""

from typing import List, Optional

from cog import Path

from cog_base import Inputs, MultiControlNetPredictor


class Predictor(MultiControlNetPredictor):
    condition = "multi"

    def predict(
        self,
        prompt: str = Inputs.prompt,
        num_samples: str = Inputs.num_samples,
        image_resolution: str = Inputs.image_resolution,
        ddim_steps: int = Inputs.ddim_steps,
        scale: float = Inputs.scale,
        seed: Optional[int] = Inputs.seed,
        eta: float = Inputs.eta,
        a_prompt: str = Inputs.a_prompt,
        n_prompt: str = Inputs.n_prompt,
        controlnet_1: str = Inputs.controlnet_1,
        controlnet_1_image: Optional[Path] = Inputs.controlnet_1_image,
        controlnet_1_conditioning_scale: float = Inputs.controlnet_1_conditioning_scale,
        controlnet_1_start: float = Inputs.controlnet_1_start,
        controlnet_1_end: float = Inputs.controlnet_1_end,
        controlnet_1_image_is_map: bool = Inputs.controlnet_1_image_is_map,
        controlnet_2: str = Inputs.controlnet_2,
        controlnet_2_image: Optional[Path] = Inputs.controlnet_2_image,
        controlnet_2_conditioning_scale: float = Inputs.controlnet_2_conditioning_scale,
        controlnet_2_start: float = Inputs.controlnet_2_start,
        controlnet_2_end: float = Inputs.controlnet_2_end,
        controlnet_2_image_is_map: bool = Inputs.controlnet_2_image_is_map,
        controlnet_3: str = Inputs.controlnet_3,
        controlnet_3_image: Optional[Path] = Inputs.controlnet_3_image,
        controlnet_3_conditioning_scale: float = Inputs.controlnet_3_conditioning_scale,
        controlnet_3_start: float = Inputs.controlnet_3_start,
        controlnet_3_end: float = Inputs.controlnet_3_end,
        controlnet_3_image_is_map: bool = Inputs.controlnet_3_image_is_map,
        guess_mode: bool = Inputs.guess_mode,
        scheduler: str = Inputs.scheduler,
        return_control_map: bool = Inputs.return_control_map,
        output_format: str = Inputs.output_format,
        output_quality: int = Inputs.output_quality,
        preprocess_only: bool = Inputs.preprocess_only,
        width: int = Inputs.width,
        height: int = Inputs.height,
        lora_url: str = Inputs.lora_url,
        lora_scale: float = Inputs.lora_scale,
        embedding_url: str = Inputs.embedding_url,
        embedding_token: str = Inputs.embedding_token,
        init_image: Optional[Path] = Inputs.init_image,
        mask_image: Optional[Path] = Inputs.mask_image,
        strength: float = Inputs.strength,
        mask_blur: int = Inputs.mask_blur,
    ) -> List[Path]:
        """Up to three ControlNet units in one request. Returns the control map of each active unit, in
        unit order (unless return_control_map is off), then the samples."""
        return self.predict_with(locals())
