"""The controlnet-pose image. ControlNet 1.0's pose: OpenPose body keypoints drawn on black."""

from typing import List, Optional

from cog import Path

from cog_base import ControlNetPredictor, Inputs, Version


class Predictor(ControlNetPredictor):
    condition = "pose"
    detector = "models.detectors.pose:PoseDetector"
    map_interpolation = "nearest"  # as 1.0 resized it: the skeleton keeps its exact palette colours
    # 1.1's demo drew the body its own way (limbs dimmed, under the joints) and resized the map bilinearly.
    versions = {"1.1": Version(map_interpolation="bilinear", fixed_options={"drawing": "1.1"})}

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
        detect_resolution: int = Inputs.detect_resolution,
        pose_hands_face: bool = Inputs.pose_hands_face,
        controlnet_version: str = Inputs.controlnet_version,
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
