"""The Cog face every condition shares, kept apart from the inference code (models/).

Each condition's predictor is a small subclass that declares its detector and how the detector is
run, and spells out a literal Cog signature whose every default is an entry of `Inputs` (Cog's
static schema parser needs literal `Input(...)` defaults; the registry holds them once). That
signature calls `generate()`, a plain method that tests call with plain values (calling a Cog
`predict()` directly passes FieldInfo objects as defaults): it validates the inputs into a request
(models/request.py), runs the request path (models/generate.py) into an output folder that lives
until the next prediction (Cog reads the files after predict returns), and turns its typed errors
into the client's messages.

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
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cog import BasePredictor, Path

import weights
from cog_base.inputs import CONTROLS, JAGILLEY_INPUTS, MAX_UNITS, SHARED_CONTROLS, SHARED_HEAD, Inputs, spec_of
from cog_base.runtime import remove_on_worker_stop
from models.request import Asked, UnitAsk, asked, check, single_image, single_unit, slot_units

# Serving never downloads: every weight comes from a local folder (see weights/).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

A_PROMPT = spec_of(Inputs.a_prompt).default
N_PROMPT = spec_of(Inputs.n_prompt).default
# A parameter may take another registry entry than its own name's: hed's `image` is optional
# because its clients may send `input_image` instead.
ALIASES = {"image": ("image_or_input_image",),
           # The zimage image's: the same names as here, with its own defaults and descriptions.
           "controlnet_conditioning_scale": ("union_conditioning_scale",), "width": ("union_width",),
           "height": ("union_height",)}
# Inputs that carry the unit's image rather than a detector option.
IMAGE_INPUTS = ("input_image",)
# The input that picks the unit's ControlNet version (and with it the detector): not a detector option either.
VERSION_INPUT = "controlnet_version"
DEFAULT_VERSION = spec_of(Inputs.controlnet_version).default


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

    log_prefix = "Server fault"  # the prediction's logs get this one line (cog_base/cog016/serving.py)


class UnexpectedError(RuntimeError):
    """Anything else: the client learns that it was unexpected, the server's log keeps the detail."""

    log_prefix = "Server error"


def _registry_name(default: Any) -> str | None:
    return next((name for name, value in vars(Inputs).items() if value is default), None)


class ControlNetPredictor(BasePredictor):
    """Shared setup and the Cog face of a request. Subclasses declare what differs per condition:

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
    steps_input, size_multiple, megapixels   the model family's: its steps input, its sides' multiple and
                         its default area (None: jagilley's image_resolution); see models.generate.Served

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
    steps_input: ClassVar[str] = "ddim_steps"
    size_multiple: ClassVar[int] = 64
    megapixels: ClassVar[float | None] = None

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
        from models.control import import_class

        return import_class(cls.detector)

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
            if options.pop(name) != spec_of(cls.fields[name]).default:
                raise ValueError(f"{name} does not apply to {VERSION_INPUT} {version} (its detector has no such "
                                 f"option): leave it at its default, or send {VERSION_INPUT} {DEFAULT_VERSION}")
        return {**options, **declared.fixed_options}

    # No `weights` parameter: given one, Cog 0.16.12 passes Path("weights") whenever a `weights` entry
    # sits in the working directory (our package always does) and reads a COG_WEIGHTS URL whole into
    # memory. COG_WEIGHTS is read here instead, and fetched to disk with bounds.
    def setup(self) -> None:
        start = time.perf_counter()
        from models.assets import AssetCache

        from cog_base.health import WorkerHealth
        from cog_base.runtime import server_log

        # Its verdicts (and "restart the server") are the operator's: the server's log, not a client's logs.
        self.health = WorkerHealth(log=server_log)
        self.weights = weights.locate(self.condition)
        if self.weights.tiny:
            print(self.tiny_warning(), flush=True)
        self.assets = AssetCache(**asset_settings())
        custom = os.environ.get("COG_WEIGHTS", "").strip()
        # Before load(): a compiling load warms up through generate(), which writes outputs.
        self._output_dir: str | None = None
        remove_on_worker_stop(lambda: [self._output_dir] if self._output_dir else [])
        device = self.load(custom)
        # Component names, not paths: setup logs reach clients through /health-check.
        served = ", ".join(
            f"{role}: {'COG_WEIGHTS' if custom and role == self.cog_weights else folder.name}"
            for role, folder in self.weights.folders.items()
        )
        print(
            f"{self.condition}: ready on {device} in {time.perf_counter() - start:.1f}s "
            f"({'tiny' if self.weights.tiny else 'real'} weights: {served})",
            flush=True,
        )

    def load(self, custom: str) -> str:
        """The model family's part of setup: its pipeline, runner and style assets (`custom`: COG_WEIGHTS, or
        empty). Returns the device it runs on."""
        from models import fast
        from models.assets import fetch_weights
        from models.pipeline import load_pipeline  # torch and diffusers: worker only
        from models.style import StyleAssets

        # A combined image (multi) has no ControlNet of its own: each unit's loads on first use.
        folders = {"base_override": None, "controlnet_dir": self.weights.folders.get("controlnet")}
        if custom:
            key = {"base": "base_override", "controlnet": "controlnet_dir"}[self.cog_weights]
            folders[key] = fetch_weights(custom, self.assets)
            # The name, never a server path: setup logs reach clients through /health-check.
            print(f"{self.condition}: {self.cog_weights} from COG_WEIGHTS ({_display(custom)})", flush=True)
        pipe = load_pipeline(self.weights.base, folders["controlnet_dir"], base_override=folders["base_override"])
        # The exact options by default, the others opt-in (models/fast.py); an unknown name fails setup.
        fast_options = fast.apply(pipe, fast.options_from_env(), cache_root=weights.root())
        self.styles = StyleAssets(pipe)
        self.runner = self._runner(pipe)
        self.runner.controlnets.prepare = fast.per_model(fast_options)  # ControlNets loaded on first use
        if "compile" in fast_options:
            self._warm_up(fast)
        return pipe.device

    def _runner(self, pipe):
        """The pipeline's runner and the conditions its units use. A single-condition image loads its
        detector now (its first request waits for nothing); an image of several conditions loads each
        detector when an image first needs it, and each ControlNet on first use, at most
        CONTROLNET_MAX_LOADED of them kept. Another ControlNet version's ControlNet loads on first use
        too, through the same store: a 1.0 client's server never holds it, and setup takes no longer."""
        from models.control import ControlNets, declared_conditions, max_controlnets_from_env
        from models.pipeline import ControlNetRunner, load_controlnet, release_memory

        specs = self.condition_specs()
        self.conditions, self.versioned = declared_conditions(
            specs, {name: self.weights.of(name) for name in specs}, self.weights, weights.VERSION_MARK)
        store = ControlNets(lambda folder: load_controlnet(folder, str(pipe.device)), max_controlnets_from_env(),
                            release=release_memory)
        runner = ControlNetRunner(pipe, condition=self.conditions.get(self.condition), controlnets=store)
        if self.condition in self.conditions:
            runner.detector  # noqa: B018  loads it
        return runner

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
                self.generate(**inputs, prompt="self-test", width=width, height=height, seed=1,
                              return_control_map=False, **{self.steps_input: 1})
        finally:
            self._used = used  # the failed request's, whatever the self-test asked
            shutil.rmtree(folder, ignore_errors=True)

    def self_test_inputs(self, image: Path, condition: str, version: str) -> dict[str, Any]:
        """A self-test's inputs for one condition at one ControlNet version."""
        return {**self.warm_up_inputs(image), **({VERSION_INPUT: version} if version != DEFAULT_VERSION else {})}

    # -- a request: validate, run the request path (models/generate.py), say what went wrong ---------

    def generate(self, *args, **inputs) -> list[Path]:
        """predict()'s inputs as plain values (positional in the signature's order, or by name; the
        registry's defaults for the rest). Returns the control maps (unless return_control_map is
        off), then the samples, as files of output_format (PNG by default)."""
        from models.generate import RequestError, ServerFault, Served
        from models.generate import generate as run

        request = self.validate(args, inputs)
        self._used = tuple(dict.fromkeys((unit.condition, unit.version) for unit in request.units))  # health's
        if self.weights.tiny:
            print(self.tiny_warning())
        specs = self.condition_specs()
        served = Served(self.condition, self.runner, self.styles, self.assets, self.conditions, self.versioned,
                        frozenset(name for name, spec in specs.items() if spec.map_takes_mask),
                        default_version=DEFAULT_VERSION, detect_resolution=spec_of(Inputs.detect_resolution).default,
                        missing_version_fix={key: self._missing_version_fix(*key)
                                             for key, found in self.versioned.items() if found is None},
                        size_multiple=self.size_multiple, megapixels=self.megapixels)
        try:
            return [Path(file) for file in run(request, served, self._new_output_dir())]
        except RequestError as exc:
            raise ValueError(str(exc)) from None
        except ServerFault as exc:
            raise ExpectedFault(str(exc)) from None

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
            values[name] = check(name, values[name], spec_of(entry)) if name in values else spec_of(entry).default
        return asked(self.request_values(values), self.units_asked(values))

    def request_values(self, values: dict[str, Any]) -> dict[str, Any]:
        """The checked values as the shared request (models.request.asked) reads them: another model family
        names some of them otherwise."""
        return values

    def units_asked(self, values: dict[str, Any]) -> tuple[UnitAsk, ...]:
        """A single-condition image's one unit, from the unit inputs among the shared ones."""
        image = single_image(values)
        version = values.get(VERSION_INPUT, DEFAULT_VERSION)
        return single_unit(values, self.condition, image, self.version_options(values, version), version)

    def _new_output_dir(self) -> str:
        # Cog reads the files after predict returns, so they live until the next prediction.
        if self._output_dir:
            shutil.rmtree(self._output_dir, ignore_errors=True)
            self._cleanup.detach()
        self._output_dir = tempfile.mkdtemp(prefix=f"controlnet-{self.condition}-")
        # The last prediction's files go with the process (or with this predictor), not left in /tmp.
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._output_dir, ignore_errors=True)
        return self._output_dir


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
        options = {name: {option: spec_of(getattr(Inputs, option)).default for option in cond.detector_options()}
                   for name, cond in self.condition_specs().items()}
        return slot_units(values, MAX_UNITS, options)


def _health_name(condition: str, version: str) -> str:
    """How the health state names a condition at a ControlNet version."""
    return condition if version == DEFAULT_VERSION else f"{condition} ControlNet {version}"


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
