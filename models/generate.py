"""One request on the loaded pipeline, in the order it runs (as diffusers' pipeline `__call__` keeps
its steps in the model library):

1. assets          the LoRA and embedding asked for, from the request-asset cache
2. decode + size   each unit's image decoded, the sizes planned from the first, the others cropped
3. edit plan       the photo and mask of an img2img / inpaint request, sized by the plan
4. control maps    each unit's map at the sample size (its detector's, or its upload)
5. sample          the pipeline's samples at the returned size, an inpaint's composited
6. encode          the maps and samples as files in the folder given

`generate()` takes a validated request (models.request.Asked), what the image has loaded (`Served`,
plain data: no call back into the caller) and an output folder, and returns the files. A failure
the client can fix raises RequestError, a server-side one whose message is written for the client
ServerFault; anything else is unexpected. No Cog here: cog_base/predictor.py is the Cog face.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from models.request import Asked, UnitAsk


class RequestError(ValueError):
    """The request cannot be served as sent; the message says what to fix, in the client's terms."""


class ServerFault(RuntimeError):
    """A server-side failure whose message is already written for the client (out of memory, NaN)."""


@dataclass(frozen=True)
class Served:
    """What one image has loaded, as the request path uses it.

    name         the image's condition (messages name `make weights COND=<name>`)
    runner       models.pipeline.ControlNetRunner over the loaded pipeline
    styles       models.style.StyleAssets (LoRA / embedding loading)
    assets       models.assets.AssetCache (request assets by URL)
    conditions   condition -> models.control.Condition at the default ControlNet version
    versioned    (condition, version) -> Condition for the other versions; None where the weights lack it
    takes_mask   the conditions whose detector takes the request's inpainting mask (their map is made
                 from the image and the mask)
    default_version, detect_resolution   the registry's defaults of controlnet_version and
                 detect_resolution (a unit whose options lack it runs its detector at this one)
    missing_version_fix  (condition, version) -> what the operator does to serve a version whose weights
                 are missing (make weights fetches only a pinned component)
    size_multiple, megapixels   the model family's sizes: sides in multiples of `size_multiple`; without an
                 exact width/height, `megapixels` at the upload's aspect (None: jagilley's image_resolution)
    """

    name: str
    runner: Any
    styles: Any
    assets: Any
    conditions: dict = field(default_factory=dict)
    versioned: dict = field(default_factory=dict)
    takes_mask: frozenset = frozenset()
    default_version: str = "1.0"
    detect_resolution: int = 512
    missing_version_fix: dict = field(default_factory=dict)
    size_multiple: int = 64
    megapixels: float | None = None


def generate(request: Asked, served: Served, folder: str) -> list[str]:
    """The request's files in `folder`: the control maps (unless return_control_map is off), then the
    samples, in output_format."""
    from models.assets import AssetError
    from models.image import InputImageError
    from models.pipeline import NonFiniteOutputError

    print(f"Using seed: {request.seed}", flush=True)
    timings: dict[str, float] = {}
    size = None
    try:
        style = fetch_assets(request, served, timings)
        images, size = decode_and_plan(request, served, timings)
        edit = plan_edit(request, images, size, served.takes_mask, timings)
        units = control_maps(request, images, size.generate, served, timings, edit)
        maps = encode_maps(request, units, folder)  # while the pipeline runs
        samples = [] if request.preprocess_only else sample(request, units, size.output, style, served, timings, edit)
    except (InputImageError, AssetError) as exc:
        if isinstance(exc, AssetError):
            served.assets.forget(request.lora_url, request.embedding_url)  # a failed file is not kept under its URL
        raise RequestError(str(exc)) from None
    except NonFiniteOutputError as exc:
        raise non_finite(request, exc) from None
    except Exception as exc:
        if type(exc).__name__ != "OutOfMemoryError":
            raise
        import torch

        torch.cuda.empty_cache()  # leave the server usable for the next, smaller request
        at = f" at {size.generate[1]}x{size.generate[0]}" if size else ""
        raise ServerFault(
            f"out of GPU memory for {request.num_samples} sample(s){at}; ask for fewer samples or a lower resolution"
        ) from None
    return encode(request, maps, samples, timings)


# -- 1. assets --------------------------------------------------------------------------------------

def fetch_assets(request: Asked, served: Served, timings: dict) -> tuple:
    """The LoRA and embedding asked for, as StyleAssets.applied() takes them (nothing to preprocess)."""
    start = time.perf_counter()
    wanted = not request.preprocess_only
    lora = served.assets.fetch(request.lora_url, "lora_url") if request.lora_url and wanted else None
    embedding = (served.assets.fetch(request.embedding_url, "embedding_url")
                 if request.embedding_url and wanted else None)
    if embedding and request.embedding_token not in request.user_prompt:
        print(f"Note: the prompt does not use embedding_token {request.embedding_token!r}, so the embedding has no effect")
    if lora or embedding:
        timings["fetch assets"] = time.perf_counter() - start
    return lora, request.lora_url or None, request.lora_scale, embedding, request.embedding_token


# -- 2. decode + size plan --------------------------------------------------------------------------

def decode_and_plan(request: Asked, served: Served, timings: dict):
    """Each unit's image decoded, the sizes planned from the first unit's, and every image
    centre-cropped to that aspect (the first one only when an exact size asks for another)."""
    from models.image import InputImageError, apply_crop, load_rgb, plan_area, plan_size

    start = time.perf_counter()
    decoded = []
    for unit in request.units:
        try:
            decoded.append(load_rgb(unit.image))
        except InputImageError as exc:
            name = unit.inputs["image"]
            raise RequestError(str(exc) if name == "image" else f"{name}: {exc}") from None
    timings["decode input"] = time.perf_counter() - start
    if served.megapixels is None:
        size = plan_size(*decoded[0].shape[:2], request.image_resolution, request.width, request.height)
    else:
        size = plan_area(*decoded[0].shape[:2], served.megapixels, request.width, request.height, served.size_multiple)
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


# -- 3. edit plan -----------------------------------------------------------------------------------

def plan_edit(request: Asked, images: list, size, takes_mask: frozenset, timings: dict):
    """The edit's photo and mask decoded and sized by the request's size plan (models.image.plan_edit);
    None from noise. preprocess_only generates nothing: the edit inputs are ignored, but for a map made
    from the mask (a condition in `takes_mask`)."""
    from models.image import InputImageError, check_aspect, load_mask, load_rgb
    from models.image import plan_edit as sized_edit

    map_mask = request.mask_image is not None and any(u.condition in takes_mask for u in request.units)
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
        raise RequestError(f"{name}: {exc}") from None
    # The bound `image` has (4:1): the photo and the mask are centre-cropped to the image's aspect, so
    # one more extreme would lose most of itself to the crop, and the edit would show little of it.
    check_aspect(*photo.shape[:2], name)
    try:
        mask = load_mask(request.mask_image) if request.mask_image is not None else None
        if mask is not None:
            check_aspect(*mask.shape[:2], "mask_image")
        plan = sized_edit(photo, size, images[0].shape[:2], mask, request.mask_blur)
    except InputImageError as exc:
        text = str(exc)
        raise RequestError(text if text.startswith("mask_image") else f"mask_image: {text}") from None
    timings["decode edit"] = time.perf_counter() - start
    if request.mode != "txt2img":
        share = "" if plan.mask is None else f", {plan.mask.mean():.0%} masked, mask_blur {request.mask_blur}"
        print(f"{request.mode} of {name}, strength {request.strength}{share}", flush=True)
    return plan


# -- 4. control maps --------------------------------------------------------------------------------

def condition_of(ask: UnitAsk, served: Served):
    """The Condition a unit uses: its condition at its ControlNet version."""
    if ask.version == served.default_version:
        return served.conditions[ask.condition]
    found = served.versioned.get((ask.condition, ask.version))
    if found is None:
        raise RequestError(
            f"controlnet_version {ask.version} is not available on this server: its weights lack the "
            f"{ask.condition} ControlNet {ask.version} ("
            + served.missing_version_fix.get((ask.condition, ask.version), f"the operator runs `make weights COND={served.name}`")
            + "). Send "
            f"controlnet_version {served.default_version}"
        )
    return found


def control_maps(request: Asked, images: list, size: tuple[int, int], served: Served, timings: dict,
                 edit=None) -> list:
    """Each unit's map at the sample size: its detector's, or its upload's when it is a map."""
    from models.control import ControlUnit, NotAMapError

    start = time.perf_counter()
    units = []
    for ask, rgb in zip(request.units, images):
        options = dict(ask.options)
        if edit is not None and edit.mask is not None and ask.condition in served.takes_mask:
            options["mask"] = edit.mask
        unit = ControlUnit(condition_of(ask, served), rgb, ask.strength, ask.start, ask.end, ask.is_map,
                           options.pop("detect_resolution", served.detect_resolution), options)
        try:
            unit.make_map(size)
        except NotAMapError as exc:
            flag = ask.inputs["is_map"]
            raise RequestError(f"{flag} is on, but {exc}. Send a {ask.condition} map, or turn {flag} off to run "
                               "the detector on a photo") from None
        units.append(unit)
    timings["detect"] = time.perf_counter() - start
    return units


# -- 5. sample + composite --------------------------------------------------------------------------

def sample(request: Asked, units: list, output: tuple[int, int], style: tuple, served: Served, timings: dict,
           edit=None) -> list:
    """The samples at the returned size; an inpaint's composited onto the photo (its unmasked pixels kept)."""
    import numpy as np
    from PIL import Image

    from models.pipeline import Request

    editing = edit is not None and request.mode != "txt2img"
    start = time.perf_counter()
    lora, embedding = style[0], style[3]
    with served.styles.applied(*style):
        if lora or embedding:
            timings["load LoRA/embedding"] = time.perf_counter() - start
        result = served.runner.generate(units, Request(
            prompt=request.prompt, negative_prompt=request.negative_prompt, num_samples=request.num_samples,
            steps=request.steps, guidance_scale=request.scale, eta=request.eta, seed=request.seed,
            scheduler=request.scheduler, guess_mode=request.guess_mode,
            init_image=edit.init if editing else None, mask=edit.mask if editing else None,
            strength=request.strength,
        ))
    timings.update(result.timings)
    samples = [resize_exact(img, output[1], output[0]) for img in result.samples]
    if not editing or edit.feather is None:
        return samples
    return [Image.fromarray(edit.composite(np.asarray(img))) for img in samples]


def non_finite(request: Asked, exc) -> Exception:
    """What to tell the client when the model produced NaN/inf: a request's LoRA or embedding is the
    likely cause (checked files can still be too strong for this model), else the server's fault."""
    lora, embedding = request.lora_url, request.embedding_url
    if not (lora or embedding):
        return ServerFault(str(exc))
    used = " and ".join(name for name, given in (("lora_url", lora), ("embedding_url", embedding)) if given)
    return RequestError(
        f"the model produced non-finite values (NaN/inf) with this request's {used}, the likely cause: "
        + ("try a lower lora_scale, or another file" if lora else "send another embedding")
    )


def resize_exact(img, width: int, height: int):
    if img.size == (width, height):
        return img
    from PIL import Image

    return img.resize((width, height), Image.Resampling.LANCZOS)


# -- 6. encode --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Output:
    """Where a request's files go: unique names, because Cog's --upload-url PUTs them by basename."""

    folder: str
    tag: str

    def save(self, name: str, img, request: Asked):
        """One output's file, in the format asked, as a Future of its path (models/encode.py's pool)."""
        from models import encode

        return encode.submit(img, os.path.join(self.folder, f"{self.tag}-{name}"), request.output_format,
                             request.output_quality)


def encode_maps(request: Asked, units: list, folder: str) -> tuple[_Output, list]:
    """The control maps' files, being written on the encoding pool while the pipeline runs."""
    from PIL import Image

    out = _Output(folder, uuid.uuid4().hex[:8])
    if not request.return_control_map:
        return out, []
    return out, [out.save(ask.label, Image.fromarray(unit.map), request) for ask, unit in zip(request.units, units)]


def encode(request: Asked, maps: tuple[_Output, list], samples: list, timings: dict) -> list[str]:
    start = time.perf_counter()
    out, pending = maps
    pending = pending + [out.save(f"sample-{i}", img, request) for i, img in enumerate(samples, start=1)]
    paths = [future.result() for future in pending]
    timings["encode"] = time.perf_counter() - start
    print(
        "Timings: " + ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in timings.items())
        + f"; total {sum(timings.values()):.2f}s",
        flush=True,
    )
    return paths
