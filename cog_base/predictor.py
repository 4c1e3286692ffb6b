"""The public API every condition shares, kept apart from the inference code.

Each condition's predictor is a small subclass that declares its detector and how the detector is
run, and spells out a literal Cog signature (Cog's static schema parser needs literal `Input(...)`
defaults). That signature calls `generate()`, a plain method that tests call with plain values
(calling a Cog `predict()` directly passes FieldInfo objects as defaults).

Inputs, defaults and semantics follow the jagilley/controlnet-* models so their clients switch
without changes; the seed actually used is printed in the logs, which they never did.
"""

from __future__ import annotations

import os

# Serving never downloads: every weight comes from a local folder (see weights/).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import inspect
import secrets
import shutil
import tempfile
import time
import uuid
from typing import Any, ClassVar

import torch
from cog import BasePredictor, Path
from PIL import Image

import weights
from models.image import InputImageError, load_rgb
from models.pipeline import ControlNetRunner, load_pipeline

A_PROMPT = "best quality, extremely detailed"
N_PROMPT = (
    "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, "
    "cropped, worst quality, low quality"
)
# Every condition's predict() starts with these, in this order; then its `extra_inputs`.
SHARED_INPUTS = (
    "image", "prompt", "num_samples", "image_resolution", "ddim_steps", "scale", "seed", "eta", "a_prompt", "n_prompt",
)
NUM_SAMPLES = ("1", "4")
IMAGE_RESOLUTIONS = ("256", "512", "768")
MAX_SEED = 2**32 - 1


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> int:
    if str(value) not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return int(value)


def _in_range(name: str, value, low, high):
    if value is None or not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value!r}")
    return value


class ControlNetPredictor(BasePredictor):
    """Shared setup and generation. Subclasses declare what differs per condition:

    condition            the condition's one name (weights manifest, folder, image name)
    detector_class       has `from_weights(folder_or_None)` returning `detector(rgb, **options) -> map`
    detect_at_resolution run the detector at `detect_resolution` (then resize the map to the
                         sample size with `map_interpolation`), or on the image already at the
                         sample size when False
    extra_inputs         the inputs its predict() takes after SHARED_INPUTS, in order
    """

    condition: ClassVar[str]
    detector_class: ClassVar[type]
    detect_at_resolution: ClassVar[bool] = True
    map_interpolation: ClassVar[str] = "bilinear"
    extra_inputs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The literal Cog signature and the declaration must not drift apart.
        if "predict" in cls.__dict__:
            params = list(inspect.signature(cls.predict).parameters)[1:]
            expected = [*SHARED_INPUTS, *cls.extra_inputs]
            if params != expected:
                raise TypeError(f"{cls.__qualname__}.predict() must take {expected}, in order; it takes {params}")

    def setup(self) -> None:
        start = time.perf_counter()
        self.weights = weights.locate(self.condition)
        if self.weights.tiny:
            print(self.tiny_warning(), flush=True)
        pipe = load_pipeline(self.weights.base, self.weights.controlnet)
        detector = self.detector_class.from_weights(self.weights.detector)
        self.runner = ControlNetRunner(
            pipe,
            detector,
            detect_at_resolution=self.detect_at_resolution,
            map_interpolation=self.map_interpolation,
        )
        self._output_dir: str | None = None
        print(
            f"{self.condition}: ready on {pipe.device} in {time.perf_counter() - start:.1f}s "
            f"with weights from {self.weights.base.parent}",
            flush=True,
        )

    def tiny_warning(self) -> str:
        return (
            "WARNING: serving TINY RANDOM-WEIGHT models: images are noise, for testing only. "
            f"Get the real weights with `make weights COND={self.condition}`."
        )

    def predict_with(self, inputs: dict[str, Any]) -> list[Path]:
        """What each subclass's predict() calls with its locals()."""
        return self.generate(**{name: value for name, value in inputs.items() if name not in ("self", "__class__")})

    def generate(
        self,
        image,
        prompt: str,
        num_samples: int | str = 1,
        image_resolution: int | str = 512,
        ddim_steps: int = 20,
        scale: float = 9.0,
        seed: int | None = None,
        eta: float = 0.0,
        a_prompt: str = A_PROMPT,
        n_prompt: str = N_PROMPT,
        detect_resolution: int = 512,
        **detector_options,
    ) -> list[Path]:
        """Control map first, then the samples, as PNG files."""
        num_samples = _choice("num_samples", num_samples, NUM_SAMPLES)
        image_resolution = _choice("image_resolution", image_resolution, IMAGE_RESOLUTIONS)
        _in_range("ddim_steps", ddim_steps, 1, 100)
        _in_range("scale", scale, 0.1, 30.0)
        _in_range("eta", eta, 0.0, 1.0)
        _in_range("detect_resolution", detect_resolution, 128, 1024)
        if seed is None or seed < 0:  # -1 meant "random" in the ControlNet demos
            seed = secrets.randbelow(MAX_SEED + 1)
        _in_range("seed", seed, 0, MAX_SEED)
        if not prompt or not str(prompt).strip():
            raise ValueError("prompt must not be empty")

        if self.weights.tiny:
            print(self.tiny_warning())
        print(f"Using seed: {seed}", flush=True)
        try:
            rgb = load_rgb(image)
            result = self.runner(
                rgb,
                prompt=f"{prompt}, {a_prompt}" if a_prompt else prompt,
                negative_prompt=n_prompt,
                num_samples=num_samples,
                image_resolution=image_resolution,
                steps=ddim_steps,
                guidance_scale=scale,
                eta=eta,
                seed=seed,
                detect_resolution=detect_resolution,
                **detector_options,
            )
        except InputImageError as exc:
            raise ValueError(str(exc)) from None
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()  # leave the server usable for the next, smaller request
            raise RuntimeError(
                f"out of GPU memory for {num_samples} sample(s) at image_resolution {image_resolution}; "
                "ask for fewer samples or a lower resolution"
            ) from None
        height, width = result.control_map.shape[:2]
        print(f"Generated {num_samples} sample(s) at {width}x{height} in {result.seconds:.2f}s", flush=True)
        return self._save([Image.fromarray(result.control_map), *result.samples])

    def _save(self, images: list[Image.Image]) -> list[Path]:
        # Cog reads the files after predict returns, so they live until the next prediction;
        # unique names because --upload-url PUTs them by basename.
        if self._output_dir:
            shutil.rmtree(self._output_dir, ignore_errors=True)
        self._output_dir = tempfile.mkdtemp(prefix=f"controlnet-{self.condition}-")
        tag = uuid.uuid4().hex[:8]
        names = ["control"] + [f"sample-{i}" for i in range(1, len(images))]
        paths = []
        for name, img in zip(names, images):
            path = Path(self._output_dir) / f"{tag}-{name}.png"
            img.save(path)
            paths.append(path)
        return paths
