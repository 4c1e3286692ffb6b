"""The controlnet-zimage image: Z-Image-Turbo (Tongyi-MAI, 6B, distilled to 8 steps) with alibaba-pai's Fun
ControlNet Union 2.1, one ControlNet for every condition. `condition` picks the detector that makes the map
from the image (each the project's own for that condition); `control_image_is_map` sends a map as it is.
`mask_image` inpaints the image (white regenerates, black keeps, the kept pixels exactly). What differs from
the SD 1.5 images is declared in cog_base/zimage.py.
"""

from typing import List, Optional

from cog import Path

from cog_base import Inputs
from cog_base.zimage import ZImagePredictor


class Predictor(ZImagePredictor):
    condition = "zimage"

    def predict(
        self,
        image: Path = Inputs.image,
        prompt: str = Inputs.prompt,
        condition: str = Inputs.condition,
        num_samples: str = Inputs.num_samples,
        num_inference_steps: int = Inputs.num_inference_steps,
        guidance_scale: float = Inputs.guidance_scale,
        negative_prompt: str = Inputs.negative_prompt,
        seed: Optional[int] = Inputs.seed,
        controlnet_conditioning_scale: float = Inputs.union_conditioning_scale,
        control_guidance_start: float = Inputs.control_guidance_start,
        control_guidance_end: float = Inputs.control_guidance_end,
        control_image_is_map: bool = Inputs.control_image_is_map,
        return_control_map: bool = Inputs.return_control_map,
        output_format: str = Inputs.output_format,
        output_quality: int = Inputs.output_quality,
        preprocess_only: bool = Inputs.preprocess_only,
        width: int = Inputs.union_width,
        height: int = Inputs.union_height,
        lora_url: str = Inputs.lora_url,
        lora_scale: float = Inputs.lora_scale,
        mask_image: Optional[Path] = Inputs.mask_image,
        mask_blur: int = Inputs.mask_blur,
    ) -> List[Path]:
        return self.predict_with(locals())
