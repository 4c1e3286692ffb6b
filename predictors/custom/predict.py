"""The controlnet-custom image: a ControlNet trained with `cog train` on your own pairs (predictors/custom/train.py)."""

import os
from typing import List, Optional

from cog import Path

from cog_base import ControlNetPredictor, Inputs


class Predictor(ControlNetPredictor):
    condition = "custom"
    detector = "models.detectors.upload:UploadAsMap"
    detect_at_resolution = False  # the upload is the map, resized to the sample size as training resized it
    map_interpolation = "image"  # an uploaded map too: control_image_is_map changes nothing
    cog_weights = "controlnet"  # COG_WEIGHTS: the tar `train()` returns (or a diffusers ControlNet folder)

    def setup(self) -> None:
        super().setup()
        print(self.untrained_notice() or "custom: serving the trained ControlNet from COG_WEIGHTS", flush=True)

    def untrained_notice(self) -> str:
        if os.environ.get("COG_WEIGHTS", "").strip():
            return ""
        return ("NOTE: no COG_WEIGHTS, so this serves an UNTRAINED ControlNet (initialised from the base UNet, zero "
                "convolutions): the samples are the base model's and the control image has no effect. Train one "
                "with `make train PAIRS=...` and serve it with `make serve COND=custom WEIGHTS=<tar>`.")

    def predict_with(self, inputs):
        if self.untrained_notice():
            print(self.untrained_notice(), flush=True)
        return super().predict_with(inputs)

    def predict(
        self,
        image: Path = Inputs.image,
        prompt: str = Inputs.prompt,
        num_samples: str = Inputs.num_samples,
        image_resolution: str = Inputs.image_resolution,
        ddim_steps: int = Inputs.ddim_steps,
        scale: float = Inputs.scale,
        seed: Optional[int] = Inputs.seed,
        eta: float = Inputs.eta,
        a_prompt: str = Inputs.a_prompt,
        n_prompt: str = Inputs.n_prompt,
        controlnet_conditioning_scale: float = Inputs.controlnet_conditioning_scale,
        guess_mode: bool = Inputs.guess_mode,
        control_guidance_start: float = Inputs.control_guidance_start,
        control_guidance_end: float = Inputs.control_guidance_end,
        scheduler: str = Inputs.scheduler,
        control_image_is_map: bool = Inputs.control_image_is_map,
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
        return self.predict_with(locals())
