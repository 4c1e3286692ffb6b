from typing import List, Optional

from cog import Input, Path

from cog_base import ControlNetPredictor
from models.detectors.seg import SegDetector


class Predictor(ControlNetPredictor):
    condition = "seg"
    detector_class = SegDetector
    map_interpolation = "nearest"  # the map must hold palette colours only
    extra_inputs = ("detect_resolution",)

    def predict(
        self,
        image: Path = Input(description="Input image"),
        prompt: str = Input(description="Prompt for the model"),
        num_samples: str = Input(description="Number of samples (higher values may OOM)", choices=["1", "4"], default="1"),
        image_resolution: str = Input(description="Resolution of image, short side (aspect kept, sides rounded to multiples of 64)", choices=["256", "512", "768"], default="512"),
        ddim_steps: int = Input(description="Steps", default=20, ge=1, le=100),
        scale: float = Input(description="Scale for classifier-free guidance", default=9.0, ge=0.1, le=30.0),
        seed: Optional[int] = Input(description="Seed; random when empty or -1. The seed used is printed in the logs", default=None, ge=-1, le=4294967295),
        eta: float = Input(description="DDIM eta: the amount of noise added at each denoising step", default=0.0, ge=0.0, le=1.0),
        a_prompt: str = Input(description="Additional text appended to the prompt", default="best quality, extremely detailed"),
        n_prompt: str = Input(description="Negative prompt", default="longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, worst quality, low quality"),
        detect_resolution: int = Input(description="Resolution at which the detector runs (short side)", default=512, ge=128, le=1024),
    ) -> List[Path]:
        return self.predict_with(locals())
