"""The public API every condition shares, kept apart from the inference code.

Each condition's predictor is a small subclass that declares its detector and how the detector is
run, and spells out a literal Cog signature whose every default is an entry of `Inputs` (Cog's
static schema parser needs literal `Input(...)` defaults; the registry holds them once). That
signature calls `generate()`, a plain method that tests call with plain values (calling a Cog
`predict()` directly passes FieldInfo objects as defaults).

Inputs, defaults and semantics follow the jagilley/controlnet-* models so their clients switch
without changes; the seed actually used is printed in the logs, which they never did.

This module is imported by Cog's HTTP process only to read the schema, so it imports nothing heavy
at module level: torch, diffusers and the detectors load in setup(), in the worker.
"""

from __future__ import annotations

import importlib
import inspect
import os
import secrets
import shutil
import tempfile
import time
import uuid
import weakref
from typing import Any, ClassVar

from cog import BasePredictor, Path

import weights
from cog_base.inputs import CONTROLS, JAGILLEY_INPUTS, Inputs

# Serving never downloads: every weight comes from a local folder (see weights/).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

A_PROMPT = Inputs.a_prompt.default
N_PROMPT = Inputs.n_prompt.default
NUM_SAMPLES = tuple(Inputs.num_samples.json_schema_extra["enum"])
IMAGE_RESOLUTIONS = tuple(Inputs.image_resolution.json_schema_extra["enum"])
SCHEDULER_NAMES = tuple(Inputs.scheduler.json_schema_extra["enum"])
MAX_SEED = 2**32 - 1
# A parameter may take another registry entry than its own name's: hed's `image` is optional
# because its clients may send `input_image` instead.
ALIASES = {"image": ("image_or_input_image",)}


class ExpectedFault(RuntimeError):
    """A server-side failure whose message is already written for the client (out of memory, NaN)."""


class UnexpectedError(RuntimeError):
    """Anything else: the client learns that it was unexpected, the server's log keeps the detail."""


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if str(value) not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return str(value)


def _in_range(name: str, value, low, high):
    if value is None or not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value!r}")
    return value


def _registry_name(default: Any) -> str | None:
    return next((name for name, value in vars(Inputs).items() if value is default), None)


class ControlNetPredictor(BasePredictor):
    """Shared setup and generation. Subclasses declare what differs per condition:

    condition            the condition's one name (weights manifest, folder, image name)
    detector             "module:Class" of a class with `from_weights(folder_or_None)` returning
                         `detector(rgb, **options) -> map`; optionally `map_problem(map) -> str | None`
                         to check an uploaded map (control_image_is_map)
    detect_at_resolution run the detector at `detect_resolution` (then resize the map to the
                         sample size with `map_interpolation`), or on the image already at the
                         sample size when False
    map_interpolation    how a map is resized to the sample size ("nearest" keeps binary maps and
                         palettes intact)
    cog_weights          what COG_WEIGHTS replaces: "base" (a fine-tuned SD 1.5 checkpoint) or
                         "controlnet" (a trained ControlNet)

    `extra_inputs` (the condition's own inputs) is read from the predict() signature.
    """

    condition: ClassVar[str]
    detector: ClassVar[str]
    detect_at_resolution: ClassVar[bool] = True
    map_interpolation: ClassVar[str] = "bilinear"
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    cog_weights: ClassVar[str] = "base"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "predict" not in cls.__dict__:
            return
        # The literal Cog signature must take every input from the registry, in the shared order.
        params = list(inspect.signature(cls.predict).parameters.values())[1:]
        names = [p.name for p in params]
        for param in params:
            source = _registry_name(param.default)
            if source != param.name and source not in ALIASES.get(param.name, ()):
                raise TypeError(
                    f"{cls.__qualname__}.predict(): {param.name} must default to Inputs.{param.name}"
                    + (f", not Inputs.{source}" if source else " (define every Input in cog_base.inputs.Inputs)")
                )
        head, tail = names[: len(JAGILLEY_INPUTS)], names[len(names) - len(CONTROLS) :]
        if head != list(JAGILLEY_INPUTS) or tail != list(CONTROLS):
            raise TypeError(
                f"{cls.__qualname__}.predict() must take {list(JAGILLEY_INPUTS)}, then its own inputs, then "
                f"{list(CONTROLS)}; it takes {names}"
            )
        cls.extra_inputs = tuple(names[len(JAGILLEY_INPUTS) : len(names) - len(CONTROLS)])

    @classmethod
    def detector_class(cls) -> type:
        module, _, name = cls.detector.partition(":")
        return getattr(importlib.import_module(module), name)

    # No `weights` parameter: given one, Cog 0.16.12 passes Path("weights") whenever a `weights` entry
    # sits in the working directory (our package always does) and reads a COG_WEIGHTS URL whole into
    # memory. COG_WEIGHTS is read here instead, and fetched to disk with bounds.
    def setup(self) -> None:
        start = time.perf_counter()
        from models import fast
        from models.assets import AssetCache, fetch_weights
        from models.pipeline import ControlNetRunner, load_pipeline  # torch and diffusers: worker only
        from models.style import StyleAssets

        self.weights = weights.locate(self.condition)
        if self.weights.tiny:
            print(self.tiny_warning(), flush=True)
        self.assets = AssetCache(**asset_settings())
        folders = {"base_override": None, "controlnet_dir": self.weights.controlnet}
        custom = os.environ.get("COG_WEIGHTS", "").strip()
        if custom:
            key = {"base": "base_override", "controlnet": "controlnet_dir"}[self.cog_weights]
            folders[key] = fetch_weights(custom, self.assets)
            # The name, never a server path: setup logs reach clients through /health-check.
            print(f"{self.condition}: {self.cog_weights} from COG_WEIGHTS ({_display(custom)})", flush=True)
        pipe = load_pipeline(self.weights.base, folders["controlnet_dir"], base_override=folders["base_override"])
        # Opt-in until GPU figures say which options win (docs/benchmarks.md); an unknown name fails setup.
        fast_options = fast.apply(pipe, fast.options_from_env())
        self.styles = StyleAssets(pipe)
        self.runner = ControlNetRunner(
            pipe,
            self.detector_class().from_weights(self.weights.detector),
            detect_at_resolution=self.detect_at_resolution,
            map_interpolation=self.map_interpolation,
        )
        self._output_dir: str | None = None
        remove_on_worker_stop(lambda: [self._output_dir] if self._output_dir else [])
        if "compile" in fast_options:
            self._warm_up(fast)
        # Component names, not paths: setup logs reach clients through /health-check.
        served = ", ".join(
            f"{role}: {'COG_WEIGHTS' if custom and role == self.cog_weights else folder.name}"
            for role, folder in self.weights.folders.items()
        )
        print(
            f"{self.condition}: ready on {pipe.device} in {time.perf_counter() - start:.1f}s "
            f"({'tiny' if self.weights.tiny else 'real'} weights: {served})",
            flush=True,
        )

    def _warm_up(self, fast) -> None:
        """Compile every shape in CONTROLNET_WARMUP now, so those requests never wait for compilation;
        any other shape compiles on its first request. Items are `WIDTHxHEIGHT:num_samples` (the
        generated size, multiples of 64, e.g. 704x512:1 for a 4:3 photo at image_resolution 512) or
        `SIZE:num_samples` for a square."""
        from PIL import Image, ImageDraw

        spec = os.environ.get("CONTROLNET_WARMUP", "512:1")
        shapes = []
        for item in (part.strip() for part in spec.split(",") if part.strip()):
            try:
                size, count = item.split(":")
                width, height = (int(v) for v in (size.split("x") if "x" in size else (size, size)))
                shapes.append((width, height, int(count)))
            except ValueError:
                raise ValueError(
                    f"CONTROLNET_WARMUP: expected WIDTHxHEIGHT:num_samples or SIZE:num_samples items such as "
                    f"704x512:1,512:4, got {item!r}"
                ) from None
        folder = tempfile.mkdtemp(prefix="controlnet-warm-up-")
        try:
            start = time.perf_counter()
            calls = []
            for width, height, count in shapes:
                canvas = Image.new("RGB", (width, height), "white")
                ImageDraw.Draw(canvas).rectangle((width // 4, height // 4, 3 * width // 4, 3 * height // 4),
                                                 outline="black", width=8)
                path = os.path.join(folder, f"{width}x{height}.png")
                canvas.save(path)
                calls.append(dict(image=Path(path), prompt="warm-up", width=width, height=height,
                                  num_samples=str(count), ddim_steps=2, seed=1))
            fast.warm_up(self.generate, calls)
            print(f"{self.condition}: compiled for {spec} in {time.perf_counter() - start:.1f}s", flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def tiny_warning(self) -> str:
        return (
            "WARNING: serving TINY RANDOM-WEIGHT models: images are noise, for testing only. "
            f"Get the real weights with `make weights COND={self.condition}`."
        )

    def predict_with(self, inputs: dict[str, Any]) -> list[Path]:
        """What each subclass's predict() calls with its locals()."""
        try:
            return self.generate(**{name: value for name, value in inputs.items() if name not in ("self", "__class__")})
        except (ValueError, ExpectedFault):
            raise  # the message says what to fix, in the client's terms
        except Exception as exc:
            if type(exc).__name__ == "CancelationException":
                raise
            # Its message may name server paths; the traceback stays in the server's log.
            raise UnexpectedError(
                f"unexpected server error ({type(exc).__name__}); it is logged on the server. Retry, and report it "
                "if it persists"
            ) from exc

    def generate(
        self,
        image=None,
        prompt: str = "",
        num_samples: int | str = "1",
        image_resolution: int | str = "512",
        ddim_steps: int = 20,
        scale: float = 9.0,
        seed: int | None = None,
        eta: float = 0.0,
        a_prompt: str = A_PROMPT,
        n_prompt: str = N_PROMPT,
        detect_resolution: int = 512,
        input_image=None,
        controlnet_conditioning_scale: float = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        scheduler: str = "DDIM",
        control_image_is_map: bool = False,
        return_control_map: bool = True,
        preprocess_only: bool = False,
        width: int = 0,
        height: int = 0,
        lora_url: str = "",
        lora_scale: float = 1.0,
        embedding_url: str = "",
        embedding_token: str = "",
        **detector_options,
    ) -> list[Path]:
        """The control map first (unless return_control_map is off), then the samples, as PNG files."""
        from models.assets import AssetError
        from models.image import InputImageError, apply_crop, load_rgb, plan_size
        from models.pipeline import NonFiniteOutputError, Request

        if (image is None) == (input_image is None):
            raise ValueError("send the image as exactly one of `image` or `input_image`" if image is not None
                             else "image is required: send it as `image` (a URL or data: URI)")
        image = image if image is not None else input_image
        num_samples = int(_choice("num_samples", num_samples, NUM_SAMPLES))
        image_resolution = int(_choice("image_resolution", image_resolution, IMAGE_RESOLUTIONS))
        scheduler = _choice("scheduler", scheduler, SCHEDULER_NAMES)
        _in_range("ddim_steps", ddim_steps, 1, 100)
        _in_range("scale", scale, 0.1, 30.0)
        _in_range("eta", eta, 0.0, 1.0)
        _in_range("detect_resolution", detect_resolution, 128, 1024)
        _in_range("controlnet_conditioning_scale", controlnet_conditioning_scale, 0.0, 2.0)
        _in_range("control_guidance_start", control_guidance_start, 0.0, 1.0)
        _in_range("control_guidance_end", control_guidance_end, 0.0, 1.0)
        if control_guidance_start >= control_guidance_end:
            raise ValueError(
                f"control_guidance_start ({control_guidance_start}) must be below control_guidance_end "
                f"({control_guidance_end})"
            )
        _in_range("width", width, 0, 2048)
        _in_range("height", height, 0, 2048)
        if preprocess_only and not return_control_map:
            raise ValueError("preprocess_only returns only the control map: leave return_control_map on")
        # The originals drew a random seed for any falsy seed (`if not seed`), and -1 meant random
        # in the ControlNet demos.
        if not seed or seed < 0:
            seed = secrets.randbelow(MAX_SEED) + 1
        _in_range("seed", seed, 0, MAX_SEED)
        if not prompt or not str(prompt).strip():
            raise ValueError("prompt must not be empty")
        _in_range("lora_scale", lora_scale, 0.0, 2.0)
        embedding_token = (embedding_token or "").strip()
        if bool(embedding_url) != bool(embedding_token):
            raise ValueError("embedding_url and embedding_token go together: send both, or neither")
        if embedding_token and (any(c.isspace() for c in embedding_token) or embedding_token.lower() in ("<|startoftext|>", "<|endoftext|>")):
            raise ValueError(f"embedding_token must be one word without spaces, e.g. <my-style>, not {embedding_token!r}")

        if self.weights.tiny:
            print(self.tiny_warning())
        print(f"Using seed: {seed}", flush=True)
        timings: dict[str, float] = {}
        try:
            start = time.perf_counter()
            lora = self.assets.fetch(lora_url, "lora_url") if lora_url and not preprocess_only else None
            embedding = self.assets.fetch(embedding_url, "embedding_url") if embedding_url and not preprocess_only else None
            if embedding and embedding_token not in prompt:
                print(f"Note: the prompt does not use embedding_token {embedding_token!r}, so the embedding has no effect")
            if lora or embedding:
                timings["fetch assets"] = time.perf_counter() - start
            start = time.perf_counter()
            rgb = load_rgb(image)
            timings["decode input"] = time.perf_counter() - start
            plan = plan_size(*rgb.shape[:2], image_resolution, width, height)
            out_h, out_w = plan.output
            gen_h, gen_w = plan.generate
            what = "control map only" if preprocess_only else f"{num_samples} sample(s), {scheduler}, {ddim_steps} steps"
            print(
                f"Input {rgb.shape[1]}x{rgb.shape[0]} -> {gen_w}x{gen_h}"
                + (f", returned at {out_w}x{out_h}" if plan.output != plan.generate else "")
                + (" (centre-cropped to that aspect)" if plan.crop else "")
                + f"; {what}",
                flush=True,
            )
            rgb = apply_crop(rgb, plan)
            start = time.perf_counter()
            control = self._control_map(rgb, plan.generate, control_image_is_map, detect_resolution, detector_options)
            timings["detect"] = time.perf_counter() - start
            samples = []
            if not preprocess_only:
                request = Request(
                    prompt=f"{prompt}, {a_prompt}" if a_prompt else prompt,
                    negative_prompt=n_prompt,
                    num_samples=num_samples,
                    steps=ddim_steps,
                    guidance_scale=scale,
                    eta=eta,
                    seed=seed,
                    scheduler=scheduler,
                    conditioning_scale=controlnet_conditioning_scale,
                    guess_mode=guess_mode,
                    guidance_start=control_guidance_start,
                    guidance_end=control_guidance_end,
                )
                start = time.perf_counter()
                with self.styles.applied(lora, lora_url or None, lora_scale, embedding, embedding_token):
                    if lora or embedding:
                        timings["load LoRA/embedding"] = time.perf_counter() - start
                    result = self.runner.generate(control, request)
                timings.update(result.timings)
                samples = [_resize_exact(img, out_w, out_h) for img in result.samples]
        except (InputImageError, AssetError) as exc:
            if isinstance(exc, AssetError):
                self.assets.forget(lora_url, embedding_url)  # a file that failed is not kept under its URL
            raise ValueError(str(exc)) from None
        except NonFiniteOutputError as exc:
            if lora or embedding:  # checked files can still be too strong for this model
                used = " and ".join(name for name, given in (("lora_url", lora), ("embedding_url", embedding)) if given)
                raise ValueError(
                    f"the model produced non-finite values (NaN/inf) with this request's {used}, the likely cause: "
                    "try a lower lora_scale, or another file" if lora else
                    f"the model produced non-finite values (NaN/inf) with this request's {used}, the likely cause: "
                    "send another embedding"
                ) from None
            raise ExpectedFault(str(exc)) from None
        except Exception as exc:
            if type(exc).__name__ != "OutOfMemoryError":
                raise
            import torch

            torch.cuda.empty_cache()  # leave the server usable for the next, smaller request
            raise ExpectedFault(
                f"out of GPU memory for {num_samples} sample(s) at {gen_w}x{gen_h}; "
                "ask for fewer samples or a lower resolution"
            ) from None
        from PIL import Image

        start = time.perf_counter()
        images = ([Image.fromarray(control)] if return_control_map else []) + samples
        paths = self._save(images, with_map=return_control_map)
        timings["PNG encode"] = time.perf_counter() - start
        print(
            "Timings: " + ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in timings.items())
            + f"; total {sum(timings.values()):.2f}s",
            flush=True,
        )
        return paths

    def _control_map(self, rgb, size, is_map: bool, detect_resolution: int, options: dict):
        if not is_map:
            return self.runner.control_map(rgb, size, detect_resolution, **options)
        check = getattr(self.runner.detector, "map_problem", None)
        problem = check(rgb) if check else None
        if problem:
            raise ValueError(
                f"control_image_is_map is on, but {problem}. Send a {self.condition} map, or turn "
                "control_image_is_map off to run the detector on a photo"
            )
        return self.runner.fit_map(rgb, size)

    def _save(self, images, with_map: bool = True) -> list[Path]:
        # Cog reads the files after predict returns, so they live until the next prediction;
        # unique names because --upload-url PUTs them by basename.
        if self._output_dir:
            shutil.rmtree(self._output_dir, ignore_errors=True)
            self._cleanup.detach()
        self._output_dir = tempfile.mkdtemp(prefix=f"controlnet-{self.condition}-")
        # The last prediction's files go with the process (or with this predictor), not left in /tmp.
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._output_dir, ignore_errors=True)
        tag = uuid.uuid4().hex[:8]
        names = (["control"] if with_map else []) + [f"sample-{i}" for i in range(1, len(images) + 1)]
        paths = []
        for name, img in zip(names, images):
            path = Path(self._output_dir) / f"{tag}-{name}.png"
            img.save(path)
            paths.append(path)
        return paths


def remove_on_worker_stop(folders) -> None:
    """Cog stops its prediction worker with SIGTERM, and a multiprocessing child skips atexit: remove
    the folders `folders()` names first. Only in such a worker; a test process keeps its own signal
    handling."""
    import multiprocessing
    import signal

    if multiprocessing.parent_process() is None:
        return

    def handler(signum, frame):
        for folder in folders():
            shutil.rmtree(folder, ignore_errors=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def asset_settings() -> dict:
    """The request-asset cache's place and bounds; the environment overrides each."""
    env = os.environ.get
    return dict(
        root=env("CONTROLNET_ASSET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "controlnet-cog", "assets"),
        max_bytes=int(float(env("CONTROLNET_ASSET_CACHE_MB", "4096")) * 2**20),
        max_file_bytes=int(float(env("CONTROLNET_ASSET_MAX_MB", "1024")) * 2**20),
        timeout_s=float(env("CONTROLNET_ASSET_TIMEOUT_S", "120")),
    )


def _display(source: str) -> str:
    """What the logs may say about a weights source: its last path segment (a local path's folders
    and a URL's query, which may hold a token, stay out)."""
    if source.startswith("data:"):
        return "a data: URI"
    return source.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "?"


def _resize_exact(img, width: int, height: int):
    if img.size == (width, height):
        return img
    from PIL import Image

    return img.resize((width, height), Image.Resampling.LANCZOS)
