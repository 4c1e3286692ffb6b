"""Stable Diffusion 1.5 + its ControlNets (one per unit of control), loaded from local folders only.

fp16 with torch SDPA attention on CUDA (diffusers' default attention processor in torch 2), fp32 on
CPU, DDIM so that `eta` means what it meant in ControlNet 1.0, and no safety checker, like the
originals (it blacks out images and costs seconds of start-up).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch
import diffusers
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from transformers import CLIPTextModel, CLIPTokenizer

from models import default_device, quiet
from models.control import Condition, ControlNets, ControlUnit


def _variant(folder: Path) -> str | None:
    """Use the fp16 files when the download holds them (half the bytes to read at start-up)."""
    return "fp16" if any(folder.glob("*.fp16.safetensors")) else None


def _safetensors(folder: Path) -> bool | None:
    """False for a folder holding .bin weights only (ControlNet 1.1 tile's download): diffusers then reads
    them (torch.load with weights_only) without first logging an error about a missing .safetensors."""
    return None if any(folder.glob("*.safetensors")) else False


class BaseWeightsError(ValueError):
    """A fine-tuned base that cannot be used; the message says what to provide."""


def _base_components(base_dir: Path, override: Path | None, dtype, load) -> dict:
    """SD 1.5's UNet, VAE and text encoder: the stock ones, or those of a fine-tuned checkpoint.

    A fine-tuned diffusers folder may omit what it did not change (its tokenizer, say); a single-file
    checkpoint is converted by diffusers with the stock folder's configs, so nothing is fetched."""
    stock = {
        "unet": lambda: load(UNet2DConditionModel, base_dir / "unet"),
        "vae": lambda: load(AutoencoderKL, base_dir / "vae"),
        "text_encoder": lambda: load(CLIPTextModel, base_dir / "text_encoder"),
    }
    if override is None:
        return {name: make() for name, make in stock.items()}
    if override.is_dir():
        if not (override / "unet" / "config.json").is_file():
            raise BaseWeightsError(
                "the fine-tuned base folder has no unet/config.json; send a diffusers folder (unet/, vae/, "
                "text_encoder/) or a single-file SD 1.5 .safetensors checkpoint"
            )
        classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
        return {
            name: load(classes[name], override / name) if (override / name / "config.json").is_file() else make()
            for name, make in stock.items()
        }
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    try:
        with safe_open(str(override), "pt") as f:
            keys = list(f.keys())
    except Exception:
        raise BaseWeightsError(
            "the fine-tuned base is not a .safetensors file; send a single-file SD 1.5 .safetensors checkpoint "
            "or a diffusers folder (pickled .ckpt files are refused: they can run code)"
        ) from None
    # Many fine-tunes are shared without a VAE (they use SD 1.5's): the stock one then, as a folder
    # without vae/ gets.
    kept = {} if any(k.startswith("first_stage_model.") for k in keys) else {"vae": stock["vae"]()}
    try:
        single = StableDiffusionPipeline.from_single_file(
            str(override), config=str(base_dir), local_files_only=True, torch_dtype=dtype,
            safety_checker=None, requires_safety_checker=False, **kept,
        )
    except Exception as exc:
        raise BaseWeightsError(
            f"the fine-tuned base could not be read as an SD 1.5 checkpoint ({type(exc).__name__}); "
            "send an SD 1.5 (not SDXL / SD 2) .safetensors checkpoint"
        ) from None
    # diffusers leaves on the meta device what it could not fill from the file (an SD 2 OpenCLIP text
    # encoder, say, is half-mapped onto SD 1.5's CLIP without an error); .to(device) would then fail
    # with "Cannot copy out of meta tensor".
    components = {"unet": single.unet, "vae": single.vae, "text_encoder": single.text_encoder}
    incomplete = [
        name for name, module in components.items()
        if any(t.is_meta for t in (*module.parameters(), *module.buffers()))
    ]
    if incomplete:
        raise BaseWeightsError(
            f"the fine-tuned base could not be read as an SD 1.5 checkpoint (no {', '.join(incomplete)} weights "
            "for SD 1.5 in it); send an SD 1.5 (not SDXL / SD 2) .safetensors checkpoint"
        )
    return components


def _tokenizer_dir(base_dir: Path, override: Path | None) -> Path:
    """A fine-tuned folder's own tokenizer when it has one (DreamBooth runs may add tokens)."""
    if override is not None and (Path(override) / "tokenizer" / "vocab.json").is_file():
        return Path(override) / "tokenizer"
    return base_dir / "tokenizer"


def _dtype(device: str):
    return torch.float16 if device.startswith("cuda") else torch.float32


def _load(cls, folder: Path, dtype, **kwargs):
    return cls.from_pretrained(folder, torch_dtype=dtype, variant=_variant(folder), local_files_only=True, **kwargs)


def load_controlnet(folder: Path, device: str, to_device: bool = True) -> ControlNetModel:
    """A ControlNet for a pipeline already on `device` (loaded after it: on first use)."""
    folder = Path(folder)
    net = _load(ControlNetModel, folder, _dtype(device), use_safetensors=_safetensors(folder))
    return net.to(device) if to_device else net


def release_memory() -> None:
    """Return the memory of dropped models to the device (CUDA keeps freed blocks cached otherwise)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_pipeline(
    base_dir: Path, controlnet_dir: Path | None, device: str | None = None, base_override: Path | None = None
) -> StableDiffusionControlNetPipeline:
    """controlnet_dir None: no ControlNet yet (each request's units bring theirs, see ControlNetRunner)."""
    device = device or default_device()
    dtype = _dtype(device)
    base_dir = Path(base_dir)
    quiet.no_weight_loading_bar()

    def load(cls, folder: Path, **kwargs):
        return _load(cls, folder, dtype, **kwargs)

    base = _base_components(base_dir, Path(base_override) if base_override else None, dtype, load)
    pipe = StableDiffusionControlNetPipeline(
        **base,
        tokenizer=CLIPTokenizer.from_pretrained(_tokenizer_dir(base_dir, base_override), local_files_only=True),
        controlnet=load_controlnet(controlnet_dir, device, to_device=False) if controlnet_dir else None,
        # SD 1.5 ships a PNDM config; its betas, steps_offset=1 and set_alpha_to_one=False give
        # the same DDIM timesteps as ldm's sampler that ControlNet 1.0 used.
        scheduler=DDIMScheduler.from_pretrained(base_dir / "scheduler", local_files_only=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# Name -> (diffusers class, config overrides). Every scheduler is built from SD 1.5's own schedule
# (betas, steps_offset), so DDIM stays ControlNet 1.0's sampler and the others sample the same model.
SCHEDULERS = {
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
}
# Long runs print a progress line at most this often (plus the first and the last step).
PROGRESS_EVERY_S = 1.0


def progress_callback(log):
    """A `callback_on_step_end` that logs the step, the time elapsed and the rate: on the first and the
    last step and at most every PROGRESS_EVERY_S between (long runs show progress, short ones stay quiet)."""
    start = time.perf_counter()
    last = [-math.inf]

    def on_step_end(pipe, i, t, kwargs):
        now = time.perf_counter()
        total = getattr(pipe, "_num_timesteps", None) or i + 1
        step = i + 1
        if step == 1 or step == total or now - last[0] >= PROGRESS_EVERY_S:
            elapsed = now - start
            log(f"step {step}/{total}  {elapsed:.1f}s elapsed  {step / elapsed:.2f} it/s")
            last[0] = now
        return {}

    return on_step_end


class NonFiniteOutputError(RuntimeError):
    """The model produced NaN/inf: a numerical fault, reported instead of returning a black image."""


@dataclass
class Request:
    """One generation, in the pipeline's terms; defaults are ControlNet 1.0's."""

    prompt: str
    negative_prompt: str = ""
    num_samples: int = 1
    steps: int = 20
    guidance_scale: float = 9.0
    eta: float = 0.0
    seed: int = 0
    scheduler: str = "DDIM"
    conditioning_scale: float = 1.0
    guess_mode: bool = False
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    # Editing: the photo to start from (RGB at the sample size; None: from noise), the pixels to
    # regenerate (bool at the sample size; None: all of them), and how much of the photo is regenerated.
    init_image: np.ndarray | None = None
    mask: np.ndarray | None = None
    strength: float = 0.8

    @property
    def mode(self) -> str:
        return "txt2img" if self.init_image is None else "img2img" if self.mask is None else "inpaint"


@dataclass
class Result:
    samples: list[Image.Image]
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds


# The editing pipelines, built around the loaded pipeline's own modules (EDIT_MODULES): one set of weights.
EDIT_PIPELINES = {
    "img2img": StableDiffusionControlNetImg2ImgPipeline, "inpaint": StableDiffusionControlNetInpaintPipeline,
}
EDIT_MODULES = ("vae", "text_encoder", "tokenizer", "unet", "controlnet", "scheduler")


class EditRefusedError(ValueError):
    """An editing pipeline refused the request; the message is in the client's terms."""


def _client_terms(mode: str, message: str) -> str:
    """diffusers' editing pipelines check `control_image` but call it `image` in every message (diffusers
    #14057), and their own `image` is our init_image: say which is which."""
    message = message.replace("`image`", "the control map").replace("image batch size", "control map batch size")
    return f"{mode} could not run this request ({message}); check the control image, init_image and mask_image"


class ControlNetRunner:
    """Control units in, samples out, on one loaded pipeline.

    Built for one condition (a `condition`, or its `detector`, `detect_at_resolution` and
    `map_interpolation`), whose map the pipeline's own ControlNet reads; `generate()` also takes a list
    of ControlUnits, each with its own condition, whose ControlNets come from `controlnets` (loaded on
    first use, bounded).
    """

    def __init__(
        self,
        pipe: StableDiffusionControlNetPipeline,
        detector: Callable[..., np.ndarray] | None = None,
        *,
        detect_at_resolution: bool = True,
        map_interpolation: str = "bilinear",
        log: Callable[[str], None] = print,
        condition: Condition | None = None,
        controlnets: ControlNets | None = None,
    ):
        self.pipe = pipe
        self.condition = condition or Condition(
            "", (lambda: detector), detect_at_resolution, map_interpolation, getattr(detector, "map_problem", None)
        )
        self.controlnets = controlnets
        self.log = log
        # Kept apart from the pipeline's scheduler: each request gets a fresh instance built from it.
        self.scheduler_config = dict(pipe.scheduler.config)
        self._edit_pipes: dict[str, object] = {}

    @property
    def detector(self):
        return self.condition.detector

    def control_map(self, image: np.ndarray, size: tuple[int, int], detect_resolution: int, **options) -> np.ndarray:
        """The map at `size` (height, width), computed the way this condition computes it."""
        return self.condition.detect(image, size, detect_resolution, **options)

    def fit_map(self, control_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return self.condition.fit_map(control_map, size)

    def make_scheduler(self, name: str):
        """A fresh scheduler per request: multistep samplers keep per-run state that must not leak into
        the next request, and building one from the stored config costs well under a millisecond."""
        if name not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not {name!r}")
        class_name, overrides = SCHEDULERS[name]
        return getattr(diffusers, class_name).from_config(self.scheduler_config, **overrides)

    def token_count(self, text: str) -> int:
        # verbose=False: transformers would otherwise log its own over-length notice for this count.
        return len(self.pipe.tokenizer(text, truncation=False, verbose=False).input_ids)

    def _warn_if_truncated(self, name: str, text: str) -> None:
        limit = self.pipe.tokenizer.model_max_length
        count = self.token_count(text)
        if count > limit:
            self.log(
                f"WARNING: the {name} is {count} tokens; the text encoder reads {limit} (with start and end "
                f"tokens), so the last {count - limit} are ignored. Shorten it to keep them."
            )

    def _controls(self, control: np.ndarray | Sequence[ControlUnit], request: Request) -> dict:
        """The pipeline's ControlNet arguments for the units (one unit: a ControlNetModel and scalars, as a
        single-ControlNet pipeline takes them; several: a MultiControlNetModel and lists in unit order).
        A unit that acts in no step would run at scale 0 every step: it is left out (unless all are)."""
        if isinstance(control, np.ndarray):  # a bare map: the request's strength and window
            control = [ControlUnit(self.condition, map=control, strength=request.conditioning_scale,
                                   start=request.guidance_start, end=request.guidance_end)]
        units = [u for u in control if u.acts_within(request.steps)] or list(control[:1])
        own = [u.condition.controlnet is None for u in units]
        loaded = iter(self.controlnets.get([u.condition.controlnet for u in units if u.condition.controlnet])
                      if not all(own) else [])
        nets = [self.pipe.controlnet if mine else next(loaded) for mine in own]
        size = dict(height=units[0].map.shape[0], width=units[0].map.shape[1])  # every map is at the sample size
        if len(units) == 1:
            unit = units[0]
            return dict(controlnet=nets[0], image=control_image(unit.map), controlnet_conditioning_scale=unit.strength,
                        control_guidance_start=unit.start, control_guidance_end=unit.end, **size)
        # Pooling nets (1.1 shuffle) last: MultiControlNetModel adds each net's mid residual in place into the
        # first one's, which fails when the first is pooled (1x1), and the pipeline reads guess mode from the
        # first net alone. Summing in another order changes nothing else.
        pooled = [pools(net) for net in nets]
        order = [i for i in range(len(units)) if not pooled[i]] + [i for i in range(len(units)) if pooled[i]]
        units, cfg = [units[i] for i in order], request.guidance_scale > 1.0
        nets = [PromptedSideOnly(nets[i], cfg) if pooled[i] else nets[i] for i in order]
        return dict(
            **size, controlnet=MultiControlNetModel(nets), image=[control_image(u.map) for u in units],
            controlnet_conditioning_scale=[u.strength for u in units],
            control_guidance_start=[u.start for u in units], control_guidance_end=[u.end for u in units],
        )

    def pipeline_for(self, mode: str):
        """The pipeline of a mode: the loaded one for txt2img; for img2img and inpaint, diffusers' pipeline of
        that mode around the loaded pipeline's modules, built on first use and given the loaded pipeline's
        current modules each time (its own are replaced by compiled or patched ones after loading). Not
        `from_pipe`: it refuses a pipeline without a ControlNet of its own (the multi image's) and moves
        modules to its dtype."""
        if mode == "txt2img":
            return self.pipe
        modules = {name: getattr(self.pipe, name) for name in EDIT_MODULES}
        edit = self._edit_pipes.get(mode)
        if edit is None:
            edit = EDIT_PIPELINES[mode](**modules, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
            edit.set_progress_bar_config(disable=True)
            self._edit_pipes[mode] = edit
        for name, module in modules.items():
            if getattr(edit, name) is not module:
                setattr(edit, name, module)
        return edit

    def _edit_inputs(self, request: Request) -> dict:
        """The editing pipeline's own inputs. The maps go in as `control_image` there."""
        if request.mode == "txt2img":
            return {}
        # diffusers runs int(steps x strength) steps, and with none fails deep inside (an empty batch).
        if int(request.steps * request.strength) < 1:
            raise EditRefusedError(f"{request.mode}: strength x ddim_steps runs no denoising step; raise strength "
                                   "or ddim_steps")
        inputs = dict(image=Image.fromarray(request.init_image), strength=request.strength)
        if request.mask is not None:
            inputs["mask_image"] = Image.fromarray(np.where(request.mask, np.uint8(255), np.uint8(0)))
        return inputs

    @torch.inference_mode()
    def generate(self, control: np.ndarray | Sequence[ControlUnit], request: Request) -> Result:
        """`control`: the units (maps made, at the sample size), or one map for the pipeline's own ControlNet."""
        timings, mode = {}, request.mode
        pipe = self.pipeline_for(mode)
        # Always our units' strengths: the editing pipelines' own defaults (0.8, 0.5) never apply.
        controls = self._controls(control, request)
        edit = self._edit_inputs(request)
        if edit:
            controls["control_image"] = controls.pop("image")
        cfg = request.guidance_scale > 1.0

        start = time.perf_counter()
        self._warn_if_truncated("prompt", request.prompt)
        if cfg:
            self._warn_if_truncated("negative prompt", request.negative_prompt)
        # Encoded here rather than inside the pipeline so the stage can be timed; the pipeline repeats
        # the embeddings per sample exactly as it would have.
        prompt_embeds, negative_embeds = self.pipe.encode_prompt(
            request.prompt, pipe.device, 1, cfg, negative_prompt=request.negative_prompt
        )
        timings["encode prompt"] = time.perf_counter() - start

        # A CPU generator gives the same noise for a seed on any device.
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        start = time.perf_counter()
        scheduler, pipe.scheduler = pipe.scheduler, self.make_scheduler(request.scheduler)
        controlnet, pipe.controlnet = pipe.controlnet, controls.pop("controlnet")
        try:
            latents = pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                eta=request.eta,
                num_images_per_prompt=request.num_samples,
                generator=generator,
                guess_mode=request.guess_mode,
                callback_on_step_end=progress_callback(self.log),
                output_type="latent",
                **controls,
                **edit,
            ).images
        except (ValueError, TypeError) as exc:
            if not edit:
                raise
            raise EditRefusedError(_client_terms(mode, str(exc))) from None
        finally:
            pipe.scheduler, pipe.controlnet = scheduler, controlnet
        check_finite(latents, "denoising")
        timings["denoise"] = time.perf_counter() - start

        start = time.perf_counter()
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        check_finite(decoded, "VAE decoding")
        samples = pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True] * len(decoded))
        timings["VAE decode"] = time.perf_counter() - start
        return Result(samples, timings)


def pools(net) -> bool:
    """A ControlNet that pools its conditioning to one value per channel (ControlNet 1.1 shuffle)."""
    return bool(getattr(net.config, "global_pool_conditions", False))


class PromptedSideOnly(torch.nn.Module):
    """A pooling ControlNet among several: its residuals reach only the prompted half of the classifier-free
    guidance batch, as 1.1 shuffle was trained ("put only on the conditional side of cfg"; the webui
    extension masks such a unit the same way). Alone, diffusers does that by forcing guess mode for the
    whole request; among several that would also weaken every other unit (guess mode's residual scales), so
    the other units keep acting on both halves. With guidance on and guess mode off the batch is
    [unprompted, prompted] (the pipeline's order); otherwise it holds the prompted half only."""

    def __init__(self, net, cfg: bool):
        super().__init__()
        self.net, self.cfg = net, cfg
        self.config = SimpleNamespace(global_pool_conditions=False)  # what the pipeline reads of nets[0]

    def forward(self, sample, *args, guess_mode: bool = False, **kwargs):
        down, mid = self.net(sample, *args, guess_mode=guess_mode, **kwargs)[:2]
        if self.cfg and not guess_mode:
            half = sample.shape[0] // 2

            def prompted(residual):
                return torch.cat([torch.zeros_like(residual[:half]), residual[half:]])

            down, mid = [prompted(r) for r in down], prompted(mid)
        return down, mid


def control_image(control: np.ndarray):
    """What the pipeline gets for a map: an RGB map as an image (diffusers scales it to 0-1). An RGBA map
    marks masked pixels with alpha 0, which ControlNet 1.1's inpaint model was trained to see as -1; no
    image holds that value, so such a map goes in as the 0-1 tensor itself."""
    if control.shape[2] == 3:
        return Image.fromarray(control)
    pixels = torch.from_numpy(np.ascontiguousarray(control[..., :3])).float() / 255.0
    pixels[torch.from_numpy(control[..., 3] == 0)] = -1.0
    return pixels.permute(2, 0, 1)[None]


def check_finite(tensor: torch.Tensor, stage: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteOutputError(
            f"the model produced non-finite values (NaN/inf) during {stage}; this is a numerical fault of "
            "the server, not of your input: try another seed or scheduler"
        )
