"""Z-Image-Turbo with alibaba-pai's Fun ControlNet Union 2.1: loading it from the real layout, and the
control window diffusers' pipeline lacks.

The base is a diffusers folder (Tongyi-MAI/Z-Image-Turbo); the ControlNet is the single original-format
`.safetensors` file alibaba-pai publishes, converted by diffusers' `from_single_file`. Offline, that
converter needs the architecture as `config=` (it would fetch it from a Hub repo), and a given config
skips its own detection of the file's version: a 2.0 file would then load silently without its
refiner, a "lite" file fail deep in torch. So the version is detected here first, from the file's keys,
with diffusers' own rule (reading two tensors, not 6.7 GB).

The control window (`control_guidance_start`/`_end`, as on the SD 1.5 images) is not in diffusers'
Z-Image ControlNet pipeline: its ControlNet is called once per step with the step's latents, so the
window wraps that call and returns no hints outside it, which is what scale 0 gives, bit for bit, at
none of the ControlNet's cost (see ../shared notes: zimage.md). Imports torch and diffusers: worker only.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from pathlib import Path

# The architecture of Z-Image-Turbo-Fun-Controlnet-Union-2.1-2602-8steps.safetensors: 15 control blocks on
# the base's even layers, two control refiner blocks, 33 input channels (control latents, the inpaint mask,
# masked-image latents). Instantiated, it has exactly the file's 295 tensors and 3,356,225,792 parameters
# (tests/test_zimage.py checks both on the meta device). Written here, not fetched: the converter's config
# repo is on the Hub, which serving never reaches.
CONTROLNET_21_CONFIG = {
    "_class_name": "ZImageControlNetModel",
    "control_layers_places": list(range(0, 29, 2)),
    "control_refiner_layers_places": [0, 1],
    "control_in_dim": 33,
    "add_control_noise_refiner": "control_noise_refiner",
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "dim": 3840,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
}
CONTROLNET_VERSION = "z-image-turbo-controlnet-2.1"  # diffusers' name for the file's version
# Output sides: the VAE downsamples by 8 and the transformer patches 2x2 latents.
SIZE_MULTIPLE = 16


class ZImageWeightsError(RuntimeError):
    """The weights on disk are not the Z-Image-Turbo ControlNet Union 2.1 the image serves."""


class _LazyCheckpoint(Mapping):
    """A safetensors file's tensors by name, each read when asked for: diffusers' detection looks at two."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys


def controlnet_version(path: Path) -> str | None:
    """diffusers' name for the model in a single file (`z-image-turbo-controlnet-2.1`, `-2.0`, ...), by
    diffusers' own rule; None for a file it does not know."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        checkpoint = _LazyCheckpoint(path)
    except Exception as exc:  # safetensors' own errors are of several types; the message says which
        raise ZImageWeightsError(f"{path.name} is not a readable .safetensors file ({exc})") from None
    kind = infer_diffusers_model_type(checkpoint)
    return kind if kind.startswith("z-image-turbo-controlnet") else None


def write_controlnet_config(folder: Path) -> Path:
    """The converter's `config=` folder for the 2.1 file (a config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONTROLNET_21_CONFIG, indent=1) + "\n")
    return folder


def load_controlnet(path: Path, config_folder: Path, dtype=None):
    """The ControlNet Union 2.1 from its original single file, converted by diffusers. Refuses any other
    file by name (a 2.0 or v1 file, a lite file, another model's)."""
    from diffusers import ZImageControlNetModel

    found = controlnet_version(path)
    if found != CONTROLNET_VERSION:
        raise ZImageWeightsError(
            f"{path.name} is {found or 'not a Z-Image-Turbo ControlNet'}, not the Fun ControlNet Union 2.1 this image "
            "serves: fetch the pinned file with `make weights COND=zimage`"
        )
    kwargs = {"config": str(config_folder)}
    if dtype is not None:
        kwargs["dtype"] = dtype  # diffusers 0.42 deprecates torch_dtype
    return ZImageControlNetModel.from_single_file(str(path), **kwargs)


def load_pipeline(base: Path, controlnet, device: str = "cpu", dtype=None):
    """ZImageControlNetPipeline over the base folder with `controlnet` bound to its transformer (the
    ControlNet shares the transformer's embedders and refiners: it is not standalone)."""
    from diffusers import ZImageControlNetPipeline

    kwargs = {"controlnet": controlnet}
    if dtype is not None:
        kwargs["dtype"] = dtype
    pipe = ZImageControlNetPipeline.from_pretrained(str(base), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def inpaint_pipeline(pipe):
    """The inpainting pipeline over the same modules (no second copy of any weight)."""
    from diffusers import ZImageControlNetInpaintPipeline

    inpaint = ZImageControlNetInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    return inpaint


def kept_steps(steps: int, start: float, end: float) -> list[bool]:
    """Which steps the ControlNet acts in: the rule diffusers applies to SD's ControlNets (a step is dropped
    when it begins before `start` or ends after `end`, as fractions of the steps), so a window means the
    same on both families."""
    return [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]


@contextlib.contextmanager
def control_window(pipe, start: float, end: float):
    """The ControlNet acts only in the steps of [start, end] during a call of `pipe` inside this block.
    The full window leaves the pipeline untouched (bit-identical to diffusers'); outside the window the
    ControlNet is not run and gives no hints, as scale 0 gives none."""
    if start <= 0.0 and end >= 1.0:
        yield
        return
    controlnet = pipe.controlnet
    run = controlnet.forward

    def windowed(*args, **kwargs):
        # The scheduler's step index is None until its first step: step 0.
        steps = len(pipe.scheduler.timesteps)
        index = pipe.scheduler.step_index or 0
        if not kept_steps(steps, start, end)[index]:
            return {}
        return run(*args, **kwargs)

    controlnet.forward = windowed
    try:
        yield
    finally:
        del controlnet.forward  # the instance attribute: the class's forward again


def plan_size(height: int, width: int, megapixels: float = 1.0, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(height, width) of about `megapixels` with the upload's aspect, each side a multiple of `multiple`
    (the model's own: diffusers' pipeline would otherwise generate 1024x1024 whatever the upload)."""
    if height < 1 or width < 1:
        raise ValueError(f"an image of {width}x{height} pixels has no aspect")
    area = megapixels * 1024 * 1024
    scale = math.sqrt(area / (height * width))
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


class ZImageRunner:
    """Control units in, samples out, on a loaded ZImageControlNetPipeline: the SD 1.5 runner's interface
    (`generate(units, request)` with models.pipeline's Request and Result), so the request path is the same
    for both families. One unit (the Union ControlNet reads one map, whatever its condition); inpainting
    when the request has a mask (its photo and mask at the sample size); guidance above 0 turns on
    classifier-free guidance and with it the negative prompt."""

    def __init__(self, pipe, log=print):
        self.pipe = pipe
        self.log = log
        self._inpaint = None

    def pipeline_for(self, mode: str):
        if mode == "txt2img":
            return self.pipe
        if mode != "inpaint":
            raise ValueError(f"{mode} is not served with Z-Image-Turbo: send mask_image to inpaint, or no edit input")
        if self._inpaint is None:
            self._inpaint = inpaint_pipeline(self.pipe)
        return self._inpaint

    def generate(self, units, request):
        import time

        import numpy as np
        import torch
        from PIL import Image

        from models.pipeline import Result, check_finite, progress_callback

        unit, timings = units[0], {}
        pipe = self.pipeline_for(request.mode)
        height, width = unit.map.shape[:2]
        inputs = dict(
            prompt=request.prompt, height=height, width=width, num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale, control_image=Image.fromarray(unit.map[..., :3]),
            controlnet_conditioning_scale=unit.strength, num_images_per_prompt=request.num_samples,
            negative_prompt=request.negative_prompt if request.guidance_scale > 0 and request.negative_prompt else None,
            # A CPU generator gives the same noise for a seed on any device.
            generator=torch.Generator(device="cpu").manual_seed(request.seed),
            callback_on_step_end=progress_callback(self.log), output_type="np",
        )
        if request.mode == "inpaint":
            inputs.update(image=Image.fromarray(request.init_image),
                          mask_image=Image.fromarray(np.where(request.mask, np.uint8(255), np.uint8(0))))
        start = time.perf_counter()
        with torch.inference_mode(), control_window(pipe, unit.start, unit.end):
            pixels = pipe(**inputs).images
        check_finite(torch.from_numpy(np.asarray(pixels)), "denoising and decoding")
        timings["denoise + decode"] = time.perf_counter() - start
        return Result([Image.fromarray((np.clip(p, 0, 1) * 255).round().astype(np.uint8)) for p in pixels], timings)
