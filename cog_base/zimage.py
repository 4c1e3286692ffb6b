"""The Z-Image-Turbo family's Cog face: one declaration of what differs from the SD 1.5 images.

Its pipeline (models/zimage.py: Z-Image-Turbo with the Fun ControlNet Union 2.1, one ControlNet that
reads every condition's map), its weights (the manifest's `families`), its defaults (8 steps, guidance 0,
strength 0.75, about a megapixel in multiples of 16) and which inputs apply (cog_base.inputs.ZIMAGE_HEAD /
ZIMAGE_TAIL). The request path is the SD 1.5 images' own (models/generate.py); each condition's map is
made by the detector its SD 1.5 image declares (predictors/<condition>/predict.py), at its default options.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import weights
from cog_base.inputs import ZIMAGE_HEAD, ZIMAGE_TAIL, Inputs, spec_of
from cog_base.predictor import DEFAULT_VERSION, ControlNetPredictor
from models.request import single_image, single_unit

# What the shared request (models.request.asked) reads under the SD 1.5 names: this family's own inputs...
RENAMED = {"ddim_steps": "num_inference_steps", "scale": "guidance_scale", "n_prompt": "negative_prompt"}
# ...and what it fixes: no added prompt, no SD sampler options, no textual inversion, no img2img; its inpainting
# regenerates the whole masked area (the pipeline starts from noise).
FIXED = dict(a_prompt="", image_resolution="512", eta=0.0, scheduler="FlowMatch Euler", guess_mode=False,
             embedding_url="", embedding_token="", init_image=None, strength=1.0)
LORAS = ("Z-Image-Turbo", "a Z-Image-Turbo LoRA (diffusers/PEFT, kohya or ComfyUI format; SD 1.5, SDXL and Flux "
         "LoRAs do not fit)")


class ZImagePredictor(ControlNetPredictor):
    head_inputs = ZIMAGE_HEAD
    tail_inputs = ZIMAGE_TAIL
    steps_input = "num_inference_steps"
    size_multiple = 16
    megapixels = 1.0
    cog_weights = None  # serves the pinned models only

    @classmethod
    @functools.cache  # per class: validation and every request's planning ask for it, the manifest never changes
    def condition_specs(cls) -> dict[str, type[ControlNetPredictor]]:
        return {name: importlib.import_module(f"predictors.{name}.predict").Predictor
                for name in weights.conditions_of(cls.condition)}

    def load(self, custom: str) -> str:
        import torch

        from models import zimage
        from models.control import Condition
        from models.style import StyleAssets

        if custom:
            raise RuntimeError("COG_WEIGHTS is not served by the zimage image: it serves the pinned Z-Image-Turbo and "
                               "its ControlNet only (unset COG_WEIGHTS)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the weights' own; CPU has no fast bf16
        (file,) = weights.MANIFEST["components"][weights.components(self.condition)["controlnet"]]["files"]
        controlnet = zimage.load_controlnet(self.weights.controlnet / file, self.weights.controlnet, dtype)
        pipe = zimage.load_pipeline(self.weights.base, controlnet, device, dtype)
        self.styles = StyleAssets(pipe, family=LORAS)
        self.runner = zimage.ZImageRunner(pipe)
        self.conditions = {}
        for name, spec in self.condition_specs().items():
            cls, folder = spec.detector_class(), self.weights.of(name).detector
            self.conditions[name] = Condition(name, (lambda cls=cls, folder=folder: cls.from_weights(folder)),
                                              spec.detect_at_resolution, spec.map_interpolation,
                                              getattr(cls, "map_problem", None))
        self.versioned = {}
        return device

    def units_asked(self, values: dict[str, Any]) -> tuple:
        condition = values["condition"]
        spec = self.condition_specs()[condition]
        options = {name: spec_of(getattr(Inputs, name)).default for name in spec.detector_options()}
        return single_unit(values, condition, single_image(values), options, DEFAULT_VERSION)

    def request_values(self, values: dict[str, Any]) -> dict[str, Any]:
        if values["negative_prompt"] and not values["guidance_scale"]:
            print("Note: negative_prompt has no effect at guidance_scale 0 (the turbo model's setting); raise "
                  "guidance_scale to use it", flush=True)
        return {**values, **{ours: values[theirs] for ours, theirs in RENAMED.items()}, **FIXED}

    def self_test_inputs(self, image, condition: str, version: str) -> dict[str, Any]:
        return {"image": image, "condition": condition}

    def tiny_warning(self) -> str:
        return (
            "WARNING: serving TINY RANDOM-WEIGHT models: images are noise, for testing only. "
            f"Get the real weights with `make weights COND={self.condition}` (about 27 GB)."
        )

