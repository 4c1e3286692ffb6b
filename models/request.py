"""A request, validated once from the registry's own bounds and choices into one plain object.

Cog checks the same bounds over HTTP (422); this check is for every other caller of `generate()`
(tests, the warm-up, the benchmark) and for the rules that tie inputs together, which Cog's schema
cannot say. The later steps (models/generate.py) take an `Asked` and trust it. Imports only the
standard library: the Cog face (cog_base) reads the registry into InputSpecs and the values into
units, and hands them here.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class InputSpec:
    """What the registry says of one input: its default (None where required or empty), its ge/le
    bounds and its choices (cog_base.inputs.read reads them from Cog's Input)."""

    default: Any = None
    low: Any = None
    high: Any = None
    choices: tuple[str, ...] | None = None


def check(name: str, value: Any, spec: InputSpec) -> Any:
    """`value` against its input's spec: its choices, or its bounds. A choice comes back as the string
    the schema lists; an optional input left empty passes."""
    if spec.choices is not None:
        if str(value) not in spec.choices:
            raise ValueError(f"{name} must be one of {', '.join(spec.choices)}, not {value!r}")
        return str(value)
    low, high = spec.low, spec.high
    if low is None and high is None or (value is None and spec.default is None):
        return value
    try:
        inside = value is not None and (low is None or value >= low) and (high is None or value <= high)
    except TypeError:
        inside = False
    if not inside:
        raise ValueError(f"{name} must be between {low} and {high}, not {value!r}")
    return value


@dataclass(frozen=True)
class UnitAsk:
    """One unit of control as asked. `image` is the upload (a path), `options` the detector's own
    options (detect_resolution among them), `inputs` the client's names for the unit's fields (for
    messages), `label` the name of its map's output file, `version` its ControlNet's version."""

    condition: str
    image: Any
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    is_map: bool = False
    options: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    label: str = "control"
    version: str = "1.0"  # the ControlNet version (controlnet_version)


# How a single-condition image names its one unit's fields.
SINGLE_UNIT_INPUTS = dict(image="image", strength="controlnet_conditioning_scale", start="control_guidance_start",
                          end="control_guidance_end", is_map="control_image_is_map")


def slot_inputs(n: int) -> dict:
    """How the multi image names unit n's fields."""
    return dict(condition=f"controlnet_{n}", image=f"controlnet_{n}_image",
                strength=f"controlnet_{n}_conditioning_scale", start=f"controlnet_{n}_start", end=f"controlnet_{n}_end",
                is_map=f"controlnet_{n}_image_is_map")


@dataclass(frozen=True)
class Asked:
    """A validated request: the units, then everything the pipeline and the encoder need."""

    units: tuple[UnitAsk, ...]
    prompt: str  # as the model reads it: the prompt, then a_prompt
    user_prompt: str
    negative_prompt: str
    num_samples: int
    image_resolution: int
    steps: int
    scale: float
    seed: int
    eta: float
    scheduler: str
    guess_mode: bool
    return_control_map: bool
    preprocess_only: bool
    width: int
    height: int
    lora_url: str
    lora_scale: float
    embedding_url: str
    embedding_token: str
    output_format: str = "png"
    output_quality: int = 80
    # Editing (img2img / inpainting): the uploads as sent; mode() says which one the request asks for.
    init_image: Any = None
    mask_image: Any = None
    strength: float = 0.8
    mask_blur: int = 4

    @property
    def mode(self) -> str:
        """txt2img (from noise), img2img (from init_image) or inpaint (a mask; its photo is init_image, or
        the first unit's image). preprocess_only generates nothing, so it edits nothing."""
        if self.preprocess_only or (self.init_image is None and self.mask_image is None):
            return "txt2img"
        return "inpaint" if self.mask_image is not None else "img2img"

    @property
    def edit_source(self) -> Any:
        """The photo an edit starts from, and its input's name."""
        if self.init_image is not None:
            return self.init_image, "init_image"
        return self.units[0].image, self.units[0].inputs["image"]


def _edit_rules(values: dict[str, Any]) -> None:
    """Editing's rules beyond single bounds (diffusers would say them in its own terms, or not at all)."""
    editing = values["init_image"] is not None or values["mask_image"] is not None
    if not editing or values["preprocess_only"]:
        return
    strength, steps = values["strength"], values["ddim_steps"]
    # diffusers runs int(steps * strength) of the steps, and none is an error deep in the pipeline.
    if int(steps * strength) < 1:
        raise ValueError(
            f"strength {strength} of ddim_steps {steps} runs no denoising step: raise strength (above 0) or "
            f"ddim_steps so that strength x ddim_steps is at least 1"
        )


def asked(values: dict[str, Any], units: tuple[UnitAsk, ...]) -> Asked:
    """The shared inputs' rules beyond single bounds (each value already passed `check`)."""
    for unit in units:
        if unit.start >= unit.end:
            raise ValueError(
                f"{unit.inputs['start']} ({unit.start}) must be below {unit.inputs['end']} ({unit.end})"
            )
    if values["preprocess_only"] and not values["return_control_map"]:
        raise ValueError("preprocess_only returns only the control map: leave return_control_map on")
    prompt = values["prompt"]
    if not prompt or not str(prompt).strip():
        raise ValueError("prompt must not be empty")
    token = (values["embedding_token"] or "").strip()
    if bool(values["embedding_url"]) != bool(token):
        raise ValueError("embedding_url and embedding_token go together: send both, or neither")
    if token and (any(c.isspace() for c in token) or token.lower() in ("<|startoftext|>", "<|endoftext|>")):
        raise ValueError(f"embedding_token must be one word without spaces, e.g. <my-style>, not {token!r}")
    _edit_rules(values)
    seed = values["seed"]
    # The originals drew a random seed for any falsy seed (`if not seed`), and -1 meant random in the
    # ControlNet demos.
    if not seed or seed < 0:
        seed = secrets.randbelow(MAX_SEED) + 1
    a_prompt = values["a_prompt"]
    return Asked(
        units=units, prompt=f"{prompt}, {a_prompt}" if a_prompt else prompt, user_prompt=prompt,
        negative_prompt=values["n_prompt"], num_samples=int(values["num_samples"]),
        image_resolution=int(values["image_resolution"]), steps=values["ddim_steps"], scale=values["scale"], seed=seed,
        eta=values["eta"], scheduler=values["scheduler"], guess_mode=values["guess_mode"],
        return_control_map=values["return_control_map"], preprocess_only=values["preprocess_only"],
        width=values["width"], height=values["height"], lora_url=values["lora_url"], lora_scale=values["lora_scale"],
        embedding_url=values["embedding_url"], embedding_token=token,
        output_format=values["output_format"], output_quality=values["output_quality"],
        init_image=values["init_image"], mask_image=values["mask_image"], strength=values["strength"],
        mask_blur=values["mask_blur"],
    )


def single_image(values: dict[str, Any]) -> Any:
    """A single-condition image's one upload: `image`, or `input_image` where the image takes it."""
    image, input_image = values["image"], values.get("input_image")
    if (image is None) == (input_image is None):
        raise ValueError("send the image as exactly one of `image` or `input_image`" if image is not None
                         else "image is required: send it as `image` (a URL or data: URI)")
    return image if image is not None else input_image


def single_unit(values: dict[str, Any], condition: str, image: Any, options: dict, version: str) -> tuple[UnitAsk, ...]:
    """A single-condition image's one unit, from the unit inputs among the shared ones (`options`: its
    detector's, for `version`)."""
    return (UnitAsk(
        condition, image, values["controlnet_conditioning_scale"],
        values["control_guidance_start"], values["control_guidance_end"], values["control_image_is_map"],
        options, SINGLE_UNIT_INPUTS, version=version,
    ),)


def slot_units(values: dict[str, Any], slots: int, options_of: dict[str, dict]) -> tuple[UnitAsk, ...]:
    """The multi image's units, from its `slots` numbered slots; `options_of[condition]` is the detector
    options a unit of that condition runs with (its defaults)."""
    units = []
    for n in range(1, slots + 1):
        names = slot_inputs(n)
        condition, image = values[names["condition"]], values[names["image"]]
        if condition == "none":
            if image is not None:
                raise ValueError(f"{names['image']} was sent but {names['condition']} is none: set "
                                 f"{names['condition']} to the condition of that image ({', '.join(options_of)}), "
                                 "or leave the image out")
            continue
        if image is None:
            raise ValueError(f"{names['condition']} is {condition} but {names['image']} is missing: send "
                             f"the image for that unit (a URL or data: URI), or set {names['condition']} to none")
        units.append(UnitAsk(condition, image, values[names["strength"]], values[names["start"]],
                             values[names["end"]], values[names["is_map"]], dict(options_of[condition]), names,
                             label=f"control-{n}-{condition}"))
    if not units:
        raise ValueError(f"no control unit: set controlnet_1 to a condition ({', '.join(options_of)}) and send "
                         "controlnet_1_image (controlnet_2 and controlnet_3 likewise)")
    return tuple(units)
