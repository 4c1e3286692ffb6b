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

import functools
import importlib
import inspect
import os
import shutil
import tempfile
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cog import BasePredictor, Path

import weights
from cog_base.inputs import CHOICES, CONTROLS, JAGILLEY_INPUTS, MAX_UNITS, SHARED_CONTROLS, SHARED_HEAD, Inputs
from cog_base.request import SINGLE_UNIT_INPUTS, Asked, UnitAsk, asked, check, slot_inputs

# Serving never downloads: every weight comes from a local folder (see weights/).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

A_PROMPT = Inputs.a_prompt.default
N_PROMPT = Inputs.n_prompt.default
# A parameter may take another registry entry than its own name's: hed's `image` is optional
# because its clients may send `input_image` instead.
ALIASES = {"image": ("image_or_input_image",)}
# Inputs that carry the unit's image rather than a detector option.
IMAGE_INPUTS = ("input_image",)
# The input that picks the unit's ControlNet version (and with it the detector): not a detector option either.
VERSION_INPUT = "controlnet_version"
DEFAULT_VERSION = Inputs.controlnet_version.default


@dataclass(frozen=True)
class Version:
    """What another ControlNet version changes in an image's condition; None keeps the default version's.
    Its ControlNet is the manifest's `controlnet@<version>` component, its detector's weights
    `detector@<version>` where it has its own (else the default's detector folder).

    detector             "module:Class" of its own detector (None: the default version's, the same instance)
    detect_at_resolution, map_interpolation  as the class attributes of the same names
    options              the detector options it takes (None: all of the image's); a client who sets another
                         one to a non-default value is told that it does not apply
    fixed_options        options it always passes its detector (how 1.1 drew what the same network found)
    """

    detector: str | None = None
    detect_at_resolution: bool | None = None
    map_interpolation: str | None = None
    options: tuple[str, ...] | None = None
    fixed_options: dict = field(default_factory=dict)


class ExpectedFault(RuntimeError):
    """A server-side failure whose message is already written for the client (out of memory, NaN)."""

    log_prefix = "Server fault"  # the prediction's logs get this one line (cog_base.serving)


class UnexpectedError(RuntimeError):
    """Anything else: the client learns that it was unexpected, the server's log keeps the detail."""

    log_prefix = "Server error"


def _registry_name(default: Any) -> str | None:
    return next((name for name, value in vars(Inputs).items() if value is default), None)


def _default(entry) -> Any:
    return None if entry.is_required() else entry.default


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
                         palettes intact; "image": Lanczos up, area down, as the upload is resized
                         where the map is the upload itself)
    cog_weights          what COG_WEIGHTS replaces: "base" (a fine-tuned SD 1.5 checkpoint) or
                         "controlnet" (a trained ControlNet)
    versions             the other ControlNet versions the image serves (controlnet_version), each a
                         Version saying what it changes; the default version is the attributes above
    head_inputs, tail_inputs  the shared inputs before and after the image's own (JAGILLEY_INPUTS and
                         CONTROLS: a single-condition image carries its one unit's inputs among them)
    map_takes_mask       the detector takes the request's inpainting mask (mask_image) as its `mask`
                         option: its map is made from the image and the mask

    `extra_inputs` (the image's own inputs) and `fields` (every input's registry entry) are read from
    the predict() signature.
    """

    condition: ClassVar[str]
    detector: ClassVar[str]
    detect_at_resolution: ClassVar[bool] = True
    map_interpolation: ClassVar[str] = "bilinear"
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    fields: ClassVar[dict[str, Any]] = {}
    cog_weights: ClassVar[str] = "base"
    map_takes_mask: ClassVar[bool] = False
    versions: ClassVar[dict[str, Version]] = {}
    head_inputs: ClassVar[tuple[str, ...]] = JAGILLEY_INPUTS
    tail_inputs: ClassVar[tuple[str, ...]] = CONTROLS
    _used: tuple[tuple[str, str], ...] = ()  # (condition, version) of each unit of the request being served

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
        head, tail = names[: len(cls.head_inputs)], names[len(names) - len(cls.tail_inputs) :]
        if head != list(cls.head_inputs) or tail != list(cls.tail_inputs):
            raise TypeError(
                f"{cls.__qualname__}.predict() must take {list(cls.head_inputs)}, then its own inputs, then "
                f"{list(cls.tail_inputs)}; it takes {names}"
            )
        cls.extra_inputs = tuple(names[len(cls.head_inputs) : len(names) - len(cls.tail_inputs)])
        cls.fields = {p.name: p.default for p in params}

    @classmethod
    def detector_class(cls) -> type:
        module, _, name = cls.detector.partition(":")
        return getattr(importlib.import_module(module), name)

    @classmethod
    def condition_specs(cls) -> dict[str, type[ControlNetPredictor]]:
        """The conditions this image serves, each by the predictor class that declares it."""
        return {cls.condition: cls}

    @classmethod
    def detector_options(cls) -> tuple[str, ...]:
        return tuple(name for name in cls.extra_inputs if name not in (*IMAGE_INPUTS, VERSION_INPUT))

    @classmethod
    def version_options(cls, values: dict[str, Any], version: str) -> dict[str, Any]:
        """The detector options `version`'s detector takes, from the request's values (detect_resolution
        among them where the image has it)."""
        options = {name: values[name] for name in cls.detector_options()}
        if version not in cls.versions:
            return options
        declared = cls.versions[version]
        for name in [n for n in options if declared.options is not None and n not in (*declared.options, "detect_resolution")]:
            if options.pop(name) != cls.fields[name].default:
                raise ValueError(f"{name} does not apply to {VERSION_INPUT} {version} (its detector has no such "
                                 f"option): leave it at its default, or send {VERSION_INPUT} {DEFAULT_VERSION}")
        return {**options, **declared.fixed_options}

    # No `weights` parameter: given one, Cog 0.16.12 passes Path("weights") whenever a `weights` entry
    # sits in the working directory (our package always does) and reads a COG_WEIGHTS URL whole into
    # memory. COG_WEIGHTS is read here instead, and fetched to disk with bounds.
    def setup(self) -> None:
        start = time.perf_counter()
        from models import fast
        from models.assets import AssetCache, fetch_weights
        from models.pipeline import load_pipeline  # torch and diffusers: worker only
        from models.style import StyleAssets

        from cog_base.health import WorkerHealth

        from cog_base.serving import server_log

        # Its verdicts (and "restart the server") are the operator's: the server's log, not a client's logs.
        self.health = WorkerHealth(log=server_log)
        self.weights = weights.locate(self.condition)
        if self.weights.tiny:
            print(self.tiny_warning(), flush=True)
        self.assets = AssetCache(**asset_settings())
        # A combined image (multi) has no ControlNet of its own: each unit's loads on first use.
        folders = {"base_override": None, "controlnet_dir": self.weights.folders.get("controlnet")}
        custom = os.environ.get("COG_WEIGHTS", "").strip()
        if custom:
            key = {"base": "base_override", "controlnet": "controlnet_dir"}[self.cog_weights]
            folders[key] = fetch_weights(custom, self.assets)
            # The name, never a server path: setup logs reach clients through /health-check.
            print(f"{self.condition}: {self.cog_weights} from COG_WEIGHTS ({_display(custom)})", flush=True)
        pipe = load_pipeline(self.weights.base, folders["controlnet_dir"], base_override=folders["base_override"])
        # The exact options by default, the others opt-in (models/fast.py); an unknown name fails setup.
        fast_options = fast.apply(pipe, fast.options_from_env())
        self.styles = StyleAssets(pipe)
        self.runner = self._runner(pipe)
        self.runner.controlnets.prepare = fast.per_model(fast_options)  # ControlNets loaded on first use
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

    def _runner(self, pipe):
        """The pipeline's runner and the conditions its units use. A single-condition image loads its
        detector now (its first request waits for nothing); an image of several conditions loads each
        detector when an image first needs it, and each ControlNet on first use, at most
        CONTROLNET_MAX_LOADED of them kept."""
        from models.control import Condition, ControlNets, max_controlnets_from_env
        from models.pipeline import ControlNetRunner, load_controlnet, release_memory

        self.conditions = {}
        for name, spec in self.condition_specs().items():
            found, cls = self.weights.of(name), spec.detector_class()
            self.conditions[name] = Condition(
                name, (lambda cls=cls, folder=found.detector: cls.from_weights(folder)),
                spec.detect_at_resolution, spec.map_interpolation, getattr(cls, "map_problem", None),
                controlnet=None if found is self.weights else found.controlnet,  # None: the pipeline's own
            )
        self.versioned = self._versioned_conditions()
        store = ControlNets(lambda folder: load_controlnet(folder, str(pipe.device)), max_controlnets_from_env(),
                            release=release_memory)
        runner = ControlNetRunner(pipe, condition=self.conditions.get(self.condition), controlnets=store)
        if self.condition in self.conditions:
            runner.detector  # noqa: B018  loads it
        return runner

    def _versioned_conditions(self) -> dict[tuple[str, str], Any]:
        """(condition, version) -> Condition for each other ControlNet version an image declares; None where
        its weights lack that version's ControlNet. Its ControlNet loads on first use, through the same
        store (CONTROLNET_MAX_LOADED) as a combined image's: a 1.0 client's server never holds it, and
        setup takes no longer than before. Its own detector loads when first needed; else it shares the
        default version's detector (one instance)."""
        from models.control import Condition

        versioned = {}
        for name, spec in self.condition_specs().items():
            found, default = self.weights.of(name), self.conditions[name]
            for version, declared in spec.versions.items():
                controlnet = found.folders.get(f"controlnet{weights.VERSION_MARK}{version}")
                if controlnet is None:
                    versioned[(name, version)] = None
                    continue
                if declared.detector:
                    module, _, cls_name = declared.detector.partition(":")
                    cls = getattr(importlib.import_module(module), cls_name)
                    folder = found.folders.get(f"detector{weights.VERSION_MARK}{version}", found.detector)
                    load = lambda cls=cls, folder=folder: cls.from_weights(folder)  # noqa: E731
                    check = getattr(cls, "map_problem", None)
                else:
                    load, check = (lambda default=default: default.detector), default.map_check
                versioned[(name, version)] = Condition(
                    name, load,
                    spec.detect_at_resolution if declared.detect_at_resolution is None else declared.detect_at_resolution,
                    declared.map_interpolation or spec.map_interpolation, check, controlnet=controlnet,
                )
        return versioned

    def condition_of(self, ask: UnitAsk):
        """The Condition a unit uses: its condition at its ControlNet version."""
        if ask.version == DEFAULT_VERSION:
            return self.conditions[ask.condition]
        found = self.versioned.get((ask.condition, ask.version))
        if found is None:
            raise ValueError(
                f"{VERSION_INPUT} {ask.version} is not available on this server: its weights lack the {ask.condition} "
                f"ControlNet {ask.version} ({self._missing_version_fix(ask.condition, ask.version)}). Send "
                f"{VERSION_INPUT} {DEFAULT_VERSION}"
            )
        return found

    def _missing_version_fix(self, condition: str, version: str) -> str:
        """What the operator does to serve `version`: `make weights` fetches only a component pinned to a
        commit, and says it skipped the others."""
        name = weights.components(condition).get(f"controlnet{weights.VERSION_MARK}{version}")
        if name is None or weights.revision(name) is not None:
            return f"the operator runs `make weights COND={self.condition}`"
        repo = weights.MANIFEST["components"][name]["repo"]
        return (f"the operator pins a commit of {repo} as its revision in weights/manifest.json, then runs "
                f"`make weights COND={self.condition}`, which skips it while none is pinned")

    def warm_up_inputs(self, image: Path) -> dict[str, Any]:
        """The inputs of a warm-up request besides its size, for this image's signature."""
        return {"image": image}

    def _warm_up(self, fast) -> None:
        """Compile every shape in CONTROLNET_WARMUP now, so those requests never wait for compilation;
        any other shape compiles on its first request. Items are `WIDTHxHEIGHT:num_samples` (the
        generated size, multiples of 64, e.g. 704x512:1 for a 4:3 photo at image_resolution 512) or
        `SIZE:num_samples` for a square."""

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
                calls.append(dict(self.warm_up_inputs(_drawing(folder, width, height)), prompt="warm-up", width=width, height=height,
                                  num_samples=str(count), ddim_steps=2, seed=1))
            fast.warm_up(self.generate, calls)
            self._self_test_size = shapes[0][:2]  # a compiled shape: the self-test never waits for a compilation
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
        self._used = ()
        try:
            paths = self.generate(**{name: value for name, value in inputs.items() if name not in ("self", "__class__")})
        except (ValueError, ExpectedFault):
            raise  # the message says what to fix, in the client's terms
        except Exception as exc:
            if type(exc).__name__ == "CancelationException":
                raise
            # Each condition (and version) the request used is tried on its own: on multi one can be
            # broken while the others serve. A failure before the request was read tries the default.
            used = self._used or ((next(iter(self.condition_specs())), DEFAULT_VERSION),)
            self.health.after_unexpected_failure(
                exc, {_health_name(*key): functools.partial(self._self_test, *key) for key in used})
            # Its message may name server paths; the traceback stays in the server's log.
            raise UnexpectedError(
                f"unexpected server error ({type(exc).__name__}); it is logged on the server. Retry, and report it "
                "if it persists"
            ) from exc
        self.health.succeeded(_health_name(*key) for key in self._used)
        return paths

    def healthcheck(self) -> bool:
        """Cog 0.16.12 calls this (in the worker) on every /health-check: see cog_base/health.py."""
        return self.health.check()

    def _self_test(self, condition: str | None = None, version: str = DEFAULT_VERSION) -> None:
        """One step at 64x64 (or a compiled shape) on the warm-up drawing, with `condition` (default: the
        image's first) at ControlNet `version`, its logs kept out of the failed request's."""
        import contextlib
        import io

        width, height = getattr(self, "_self_test_size", (64, 64))
        folder = tempfile.mkdtemp(prefix="controlnet-self-test-")
        used = self._used
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                inputs = self.self_test_inputs(_drawing(folder, width, height), condition or next(iter(self.condition_specs())),
                                               version)
                self.generate(**inputs, prompt="self-test", width=width, height=height, ddim_steps=1, seed=1,
                              return_control_map=False)
        finally:
            self._used = used  # the failed request's, whatever the self-test asked
            shutil.rmtree(folder, ignore_errors=True)

    def self_test_inputs(self, image: Path, condition: str, version: str) -> dict[str, Any]:
        """A self-test's inputs for one condition at one ControlNet version."""
        return {**self.warm_up_inputs(image), **({VERSION_INPUT: version} if version != DEFAULT_VERSION else {})}

    # -- the request path: validate, plan the size, make the maps, sample, encode -------------------

    def generate(self, *args, **inputs) -> list[Path]:
        """predict()'s inputs as plain values (positional in the signature's order, or by name; the
        registry's defaults for the rest). Returns the control maps (unless return_control_map is
        off), then the samples, as files of output_format (PNG by default)."""
        from models.assets import AssetError
        from models.image import InputImageError
        from models.pipeline import NonFiniteOutputError

        request = self.validate(args, inputs)
        self._used = tuple(dict.fromkeys((unit.condition, unit.version) for unit in request.units))  # health's
        if self.weights.tiny:
            print(self.tiny_warning())
        print(f"Using seed: {request.seed}", flush=True)
        timings: dict[str, float] = {}
        size = None
        try:
            style = self._fetch_style(request, timings)
            images, size = self._plan(request, timings)
            edit = self._plan_edit(request, images, size, timings)
            units = self._control_maps(request, images, size.generate, timings, edit)
            maps = self._encode_maps(request, units)  # while the pipeline runs
            samples = [] if request.preprocess_only else self._sample(request, units, size.output, style, timings, edit)
        except (InputImageError, AssetError) as exc:
            if isinstance(exc, AssetError):
                self.assets.forget(request.lora_url, request.embedding_url)  # a failed file is not kept under its URL
            raise ValueError(str(exc)) from None
        except NonFiniteOutputError as exc:
            lora, embedding = request.lora_url, request.embedding_url
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
            at = f" at {size.generate[1]}x{size.generate[0]}" if size else ""
            raise ExpectedFault(
                f"out of GPU memory for {request.num_samples} sample(s){at}; ask for fewer samples or a lower resolution"
            ) from None
        return self._encode(request, maps, samples, timings)

    def validate(self, args: tuple, inputs: dict[str, Any]) -> Asked:
        """Every input against its registry entry, then the rules that tie inputs together."""
        names = list(self.fields)
        if len(args) > len(names):
            raise TypeError(f"generate() takes at most {len(names)} inputs by position, not {len(args)}")
        values = dict(zip(names, args))
        twice = sorted(set(values) & set(inputs))
        unknown = sorted(set(inputs) - set(names))
        if twice or unknown:
            raise TypeError(f"generate(): {'unknown' if unknown else 'repeated'} input(s) {unknown or twice}; "
                            f"{self.condition} takes {', '.join(names)}")
        values.update(inputs)
        for name, entry in self.fields.items():
            values[name] = check(name, values[name], entry, CHOICES.get(id(entry))) if name in values else _default(entry)
        return asked(values, self.units_asked(values))

    def units_asked(self, values: dict[str, Any]) -> tuple[UnitAsk, ...]:
        """A single-condition image's one unit, from the unit inputs among the shared ones."""
        image, input_image = values["image"], values.get("input_image")
        version = values.get(VERSION_INPUT, DEFAULT_VERSION)
        if (image is None) == (input_image is None):
            raise ValueError("send the image as exactly one of `image` or `input_image`" if image is not None
                             else "image is required: send it as `image` (a URL or data: URI)")
        return (UnitAsk(
            self.condition, image if image is not None else input_image, values["controlnet_conditioning_scale"],
            values["control_guidance_start"], values["control_guidance_end"], values["control_image_is_map"],
            self.version_options(values, version), SINGLE_UNIT_INPUTS, version=version,
        ),)

    def _fetch_style(self, request: Asked, timings: dict) -> tuple:
        """The LoRA and embedding asked for, as StyleAssets.applied() takes them (nothing to preprocess)."""
        start = time.perf_counter()
        wanted = not request.preprocess_only
        lora = self.assets.fetch(request.lora_url, "lora_url") if request.lora_url and wanted else None
        embedding = self.assets.fetch(request.embedding_url, "embedding_url") if request.embedding_url and wanted else None
        if embedding and request.embedding_token not in request.user_prompt:
            print(f"Note: the prompt does not use embedding_token {request.embedding_token!r}, so the embedding has no effect")
        if lora or embedding:
            timings["fetch assets"] = time.perf_counter() - start
        return lora, request.lora_url or None, request.lora_scale, embedding, request.embedding_token

    def _plan(self, request: Asked, timings: dict):
        """Each unit's image decoded, the sizes planned from the first unit's, and every image
        centre-cropped to that aspect (the first one only when an exact size asks for another)."""
        from models.image import InputImageError, apply_crop, load_rgb, plan_size

        start = time.perf_counter()
        decoded = []
        for unit in request.units:
            try:
                decoded.append(load_rgb(unit.image))
            except InputImageError as exc:
                name = unit.inputs["image"]
                raise InputImageError(str(exc) if name == "image" else f"{name}: {exc}") from None
        timings["decode input"] = time.perf_counter() - start
        size = plan_size(*decoded[0].shape[:2], request.image_resolution, request.width, request.height)
        (out_h, out_w), (gen_h, gen_w) = size.output, size.generate
        what = ("control map only" if request.preprocess_only
                else f"{request.num_samples} sample(s), {request.scheduler}, {request.steps} steps")
        print(
            f"Input {decoded[0].shape[1]}x{decoded[0].shape[0]} -> {gen_w}x{gen_h}"
            + (f", returned at {out_w}x{out_h}" if size.output != size.generate else "")
            + (" (centre-cropped to that aspect)" if size.crop else "")
            + f"; {what}",
            flush=True,
        )
        crops = [apply_crop(decoded[0], size)]
        for rgb in decoded[1:]:
            crops.append(apply_crop(rgb, plan_size(*rgb.shape[:2], request.image_resolution, out_w, out_h)))
        return crops, size

    def _plan_edit(self, request: Asked, images: list, size, timings: dict):
        """The edit's photo and mask decoded and sized by the request's size plan (models.image.plan_edit);
        None from noise. preprocess_only generates nothing: the edit inputs are ignored, but for a map made
        from the mask (map_takes_mask)."""
        from models.image import InputImageError, check_aspect, load_mask, load_rgb, plan_edit

        specs = self.condition_specs()
        map_mask = request.mask_image is not None and any(specs[u.condition].map_takes_mask for u in request.units)
        editing = request.init_image is not None or request.mask_image is not None
        if request.preprocess_only and editing:
            print("preprocess_only: no image is generated, so init_image, strength and mask_blur are ignored"
                  + ("" if map_mask else ", and mask_image"), flush=True)
        if request.mode == "txt2img" and not map_mask:
            return None
        start = time.perf_counter()
        source, name = request.edit_source
        try:
            photo = images[0] if source is request.units[0].image or request.preprocess_only else load_rgb(source)
        except InputImageError as exc:
            raise InputImageError(f"{name}: {exc}") from None
        # The bound `image` has (4:1): the photo and the mask are centre-cropped to the image's aspect, so
        # one more extreme would lose most of itself to the crop, and the edit would show little of it.
        check_aspect(*photo.shape[:2], name)
        try:
            mask = load_mask(request.mask_image) if request.mask_image is not None else None
            if mask is not None:
                check_aspect(*mask.shape[:2], "mask_image")
            plan = plan_edit(photo, size, images[0].shape[:2], mask, request.mask_blur)
        except InputImageError as exc:
            text = str(exc)
            raise InputImageError(text if text.startswith("mask_image") else f"mask_image: {text}") from None
        timings["decode edit"] = time.perf_counter() - start
        if request.mode != "txt2img":
            share = "" if plan.mask is None else f", {plan.mask.mean():.0%} masked, mask_blur {request.mask_blur}"
            print(f"{request.mode} of {name}, strength {request.strength}{share}", flush=True)
        return plan

    def _control_maps(self, request: Asked, images: list, size: tuple[int, int], timings: dict, edit=None) -> list:
        """Each unit's map at the sample size: its detector's, or its upload's when it is a map."""
        from models.control import ControlUnit, NotAMapError

        start = time.perf_counter()
        specs = self.condition_specs()
        units = []
        for ask, rgb in zip(request.units, images):
            options = dict(ask.options)
            if edit is not None and edit.mask is not None and specs[ask.condition].map_takes_mask:
                options["mask"] = edit.mask
            unit = ControlUnit(self.condition_of(ask), rgb, ask.strength, ask.start, ask.end, ask.is_map,
                               options.pop("detect_resolution", Inputs.detect_resolution.default), options)
            try:
                unit.make_map(size)
            except NotAMapError as exc:
                flag = ask.inputs["is_map"]
                raise ValueError(f"{flag} is on, but {exc}. Send a {ask.condition} map, or turn {flag} off to run "
                                 "the detector on a photo") from None
            units.append(unit)
        timings["detect"] = time.perf_counter() - start
        return units

    def _sample(self, request: Asked, units: list, output: tuple[int, int], style: tuple, timings: dict,
                edit=None) -> list:
        """The samples at the returned size; an inpaint's composited onto the photo (its unmasked pixels kept)."""
        import numpy as np
        from PIL import Image

        from models.pipeline import Request

        editing = edit is not None and request.mode != "txt2img"

        start = time.perf_counter()
        lora, embedding = style[0], style[3]
        with self.styles.applied(*style):
            if lora or embedding:
                timings["load LoRA/embedding"] = time.perf_counter() - start
            result = self.runner.generate(units, Request(
                prompt=request.prompt, negative_prompt=request.negative_prompt, num_samples=request.num_samples,
                steps=request.steps, guidance_scale=request.scale, eta=request.eta, seed=request.seed,
                scheduler=request.scheduler, guess_mode=request.guess_mode,
                init_image=edit.init if editing else None, mask=edit.mask if editing else None,
                strength=request.strength,
            ))
        timings.update(result.timings)
        samples = [_resize_exact(img, output[1], output[0]) for img in result.samples]
        if not editing or edit.feather is None:
            return samples
        return [Image.fromarray(edit.composite(np.asarray(img))) for img in samples]

    def _encode_maps(self, request: Asked, units: list) -> list:
        """The control maps' files, being written on the encoding pool (models/encode.py)."""
        from PIL import Image

        self._new_output_dir()
        if not request.return_control_map:
            return []
        return [self._save(ask.label, Image.fromarray(unit.map), request) for ask, unit in zip(request.units, units)]

    def _encode(self, request: Asked, maps: list, samples: list, timings: dict) -> list[Path]:
        start = time.perf_counter()
        pending = maps + [self._save(f"sample-{i}", img, request) for i, img in enumerate(samples, start=1)]
        paths = [Path(future.result()) for future in pending]
        timings["encode"] = time.perf_counter() - start
        print(
            "Timings: " + ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in timings.items())
            + f"; total {sum(timings.values()):.2f}s",
            flush=True,
        )
        return paths

    def _new_output_dir(self) -> None:
        # Cog reads the files after predict returns, so they live until the next prediction.
        if self._output_dir:
            shutil.rmtree(self._output_dir, ignore_errors=True)
            self._cleanup.detach()
        self._output_dir = tempfile.mkdtemp(prefix=f"controlnet-{self.condition}-")
        # The last prediction's files go with the process (or with this predictor), not left in /tmp.
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._output_dir, ignore_errors=True)
        self._output_tag = uuid.uuid4().hex[:8]

    def _save(self, name: str, img, request: Asked):
        """One output's file, in the format asked, as a Future of its path. Unique names because
        --upload-url PUTs them by basename."""
        from models import encode

        stem = os.path.join(self._output_dir, f"{self._output_tag}-{name}")
        return encode.submit(img, stem, request.output_format, request.output_quality)


class MultiControlNetPredictor(ControlNetPredictor):
    """An image that serves several conditions at once: up to MAX_UNITS units per request, each named
    `controlnet_<n>` (a condition or none) with its own image, strength, window and is-map flag. Each
    condition is declared by its own image's predictor; each unit's detector runs with its condition's
    default options. The maps of the active units come first, in unit order, then the samples."""

    head_inputs = SHARED_HEAD
    tail_inputs = SHARED_CONTROLS

    @classmethod
    @functools.cache  # per class: validation and every request's planning ask for it, the manifest never changes
    def condition_specs(cls) -> dict[str, type[ControlNetPredictor]]:
        return {name: importlib.import_module(f"predictors.{name}.predict").Predictor
                for name in weights.conditions_of(cls.condition)}

    def warm_up_inputs(self, image: Path) -> dict[str, Any]:
        return {"controlnet_1": next(iter(self.conditions)), "controlnet_1_image": image}

    def self_test_inputs(self, image: Path, condition: str, version: str) -> dict[str, Any]:
        return {"controlnet_1": condition, "controlnet_1_image": image}  # a unit runs its condition's default version

    def units_asked(self, values: dict[str, Any]) -> tuple[UnitAsk, ...]:
        specs = self.condition_specs()
        units = []
        for n in range(1, MAX_UNITS + 1):
            names = slot_inputs(n)
            condition, image = values[names["condition"]], values[names["image"]]
            if condition == "none":
                if image is not None:
                    raise ValueError(f"{names['image']} was sent but {names['condition']} is none: set "
                                     f"{names['condition']} to the condition of that image ({', '.join(specs)}), "
                                     "or leave the image out")
                continue
            if image is None:
                raise ValueError(f"{names['condition']} is {condition} but {names['image']} is missing: send "
                                 f"the image for that unit (a URL or data: URI), or set {names['condition']} to none")
            options = {name: getattr(Inputs, name).default for name in specs[condition].detector_options()}
            units.append(UnitAsk(condition, image, values[names["strength"]], values[names["start"]],
                                 values[names["end"]], values[names["is_map"]], options, names,
                                 label=f"control-{n}-{condition}"))
        if not units:
            raise ValueError(f"no control unit: set controlnet_1 to a condition ({', '.join(specs)}) and send "
                             "controlnet_1_image (controlnet_2 and controlnet_3 likewise)")
        return tuple(units)


def _health_name(condition: str, version: str) -> str:
    """How the health state names a condition at a ControlNet version."""
    return condition if version == DEFAULT_VERSION else f"{condition} ControlNet {version}"


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


def _drawing(folder: str, width: int, height: int) -> Path:
    """A white image with a black rectangle (every detector finds structure in it) and a transparent
    corner (the inpaint image's mask; the others composite it onto white)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((width // 4, height // 4, 3 * width // 4, 3 * height // 4), outline="black", width=max(1, width // 64))
    draw.rectangle((0, 0, width // 8, height // 8), fill=(0, 0, 0, 0))
    path = os.path.join(folder, f"{width}x{height}.png")
    canvas.save(path)
    return Path(path)


def _resize_exact(img, width: int, height: int):
    if img.size == (width, height):
        return img
    from PIL import Image

    return img.resize((width, height), Image.Resampling.LANCZOS)
