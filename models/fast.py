"""The fast path: speed-ups applied to an already loaded pipeline, each one switchable.

The exact ones are on by default (`CONTROLNET_FAST` unset): they leave every output bit-identical
(tests/test_parity.py, tests/test_fast.py) and only stop work that gave the same result each time.
`CONTROLNET_FAST=off` turns everything off; a comma list of OPTIONS adds those to the exact ones;
`all` turns on every option. `apply()` is what setup() calls; `prepare_model()` is what a ControlNet
loaded later (an image of several conditions) goes through.

Exact, on by default:
    device_once    the pipeline's device is looked up once: diffusers' `pipe.device` and
                   `_execution_device` walk every submodule of every component (offload hooks) at
                   each call, and the answer never changes after setup
    negcache       the negative prompt's embedding is computed once per distinct text (the default
                   n_prompt is the same on every request), only while the text encoder and tokenizer
                   are the base ones (a LoRA or a textual-inversion embedding bypasses it)
    cond_once      each ControlNet embeds the control image once per request instead of once per step
                   (every step, both guidance halves included, reads the same image tensor)
    attn_direct    attention layers call their processor without diffusers' inspect.signature on every
                   call (it only filters the keyword arguments: the names are computed once per
                   processor function instead)
Not exact, or not measured on a GPU yet (opt-in):
    vae_guard      a VAE decode that yields NaN/inf is redone in float32 and the VAE stays float32;
                   the switch is logged (fp16 SD VAEs can overflow)
    channels_last  UNet, ControlNet and VAE in channels_last (pays off with compile; can hurt eager)
    compile        torch.compile of the UNet, the ControlNet and the VAE decoder (mode from
                   CONTROLNET_COMPILE_MODE, default "max-autotune-no-cudagraphs" off CUDA and
                   "max-autotune" on CUDA, which adds CUDA graphs), static shapes: warm_up() then
                   compiles every served shape inside setup(); the Inductor cache lives beside the
                   weights (CONTROLNET_COMPILE_CACHE) so a restarted container reuses it

tests/test_fast.py checks that the exact options give bit-identical samples (and that each is
active), and that the others match the plain path within a stated tolerance.
"""

from __future__ import annotations

import functools
import inspect
import os
import types
import weakref
from pathlib import Path
from typing import Callable, Iterable

import torch

EXACT = ("device_once", "negcache", "cond_once", "attn_direct")
OPTIONS = EXACT + ("vae_guard", "channels_last", "compile")
# What a model loaded after setup (a ControlNet on first use) gets of the options.
PER_MODEL = ("cond_once", "attn_direct", "channels_last")


def options_from_env(value: str | None = None) -> tuple[str, ...]:
    value = os.environ.get("CONTROLNET_FAST", "") if value is None else value
    names = [name.strip() for name in value.split(",") if name.strip()]
    if names in (["all"], ["1"]):
        return OPTIONS
    if names in (["0"], ["off"]):
        return ()
    unknown = [name for name in names if name not in OPTIONS]
    if unknown:
        raise ValueError(f"CONTROLNET_FAST: unknown option(s) {', '.join(unknown)}; known: all, off, {', '.join(OPTIONS)}")
    return tuple(name for name in OPTIONS if name in EXACT or name in names)


def apply(pipe, options: Iterable[str], log: Callable[[str], None] = print, cache_root: Path | None = None) -> tuple[str, ...]:
    """Apply the named options to `pipe` in place; returns what was applied, in a fixed order. Options
    already applied to this pipeline are skipped (applying twice would wrap twice). `cache_root`: the
    weights' folder, beside which compile keeps its cache (compile_cache_dir)."""
    done = getattr(pipe, "_fast_applied", ())
    wanted = tuple(name for name in OPTIONS if name in set(options))
    options = tuple(name for name in wanted if name not in done)
    if "device_once" in options:
        device_once(pipe)
    if "negcache" in options:
        cache_negative_prompt(pipe)
    if "vae_guard" in options:
        guard_vae(pipe, log)
    # An image of several conditions has no ControlNet until a request loads one: prepare_model() then.
    # cond_once not under compile: its Python-side cache would break the ControlNet's graph in two.
    prepare = per_model(name for name in wanted if name in options or name == "compile")
    for model in (m for m in (pipe.unet, pipe.controlnet, pipe.vae) if m is not None):
        prepare(model)
    if "compile" in options:
        compile_models(pipe, cache_root=cache_root)
    pipe._fast_applied = done + options
    if options:
        log(f"fast path: {', '.join(options)}")
    return wanted


def prepare_model(model, options: Iterable[str]):
    """The per-model options on one model (the pipeline's, or a ControlNet loaded on first use)."""
    options = set(options)
    if "cond_once" in options and hasattr(model, "controlnet_cond_embedding"):
        embed_control_once(model.controlnet_cond_embedding)
    if "attn_direct" in options:
        call_attention_directly(model)
    if "channels_last" in options:
        model.to(memory_format=torch.channels_last)
    return model


def per_model(options: Iterable[str]) -> Callable:
    """model -> model with the per-model options of `options`: for models loaded after setup (an image of
    several conditions loads each ControlNet on first use; models/control.py ControlNets.prepare)."""
    options = tuple(options)
    chosen = [name for name in options if name in PER_MODEL and not (name == "cond_once" and "compile" in options)]
    return lambda model: prepare_model(model, chosen)


# -- device_once ------------------------------------------------------------------------------------

@functools.cache
def _fixed_device_class(cls: type) -> type:
    """`cls` with `device` and `_execution_device` read from the instance, refreshed by `to()`."""

    def to(self, *args, **kwargs):
        _forget_device(self)  # diffusers' to() reads self.device itself: the walk, while it moves
        out = cls.to(self, *args, **kwargs)
        _remember_device(self, cls)
        return out

    def remembered(name: str, walk: property) -> property:
        return property(lambda self: self.__dict__[name] if name in self.__dict__ else walk.fget(self))

    return type(cls.__name__, (cls,), {
        "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
        "device": remembered("_fixed_device", cls.device),
        "_execution_device": remembered("_fixed_execution_device", cls._execution_device),
        "to": to,
    })


def _forget_device(pipe) -> None:
    pipe.__dict__.pop("_fixed_device", None)
    pipe.__dict__.pop("_fixed_execution_device", None)


def _remember_device(pipe, cls: type) -> None:
    _forget_device(pipe)
    device, execution = cls.device.fget(pipe), cls._execution_device.fget(pipe)
    pipe._fixed_device, pipe._fixed_execution_device = device, execution


def device_once(pipe) -> None:
    """Exact: both properties are computed by diffusers' own code, once, and again after any `to()`.
    Between those nothing moves a component here: no offloading, and a ControlNet loaded later is put
    on `pipe.device` before it joins (ControlNets; swapped in per request, never moved)."""
    cls = type(pipe)
    if getattr(cls, "_fast_device_base", None) is None:
        fixed = _fixed_device_class(cls)
        fixed._fast_device_base = cls
        pipe.__class__ = fixed
    _remember_device(pipe, pipe._fast_device_base)


# -- negcache ---------------------------------------------------------------------------------------

def _text_state(pipe) -> tuple:
    """What changes the negative prompt's embedding besides its text: the tokenizer's size (a
    textual-inversion embedding adds tokens), the input embedding's shape, a LoRA on the text encoder."""
    encoder = pipe.text_encoder
    return (len(pipe.tokenizer), tuple(encoder.get_input_embeddings().weight.shape),
            bool(getattr(encoder, "peft_config", None)), encoder.dtype)


def cache_negative_prompt(pipe, max_entries: int = 16) -> None:
    """encode_prompt() with the negative half looked up per text. diffusers encodes the two halves in
    separate text-encoder calls and repeats a given negative embedding per sample itself, so this
    is the same computation done once. Exact only while the text encoder and tokenizer are those the
    cache was filled with: the cache is used only in the base state captured here (no LoRA on the
    text encoder, no added tokens), and any other state encodes afresh, as diffusers would."""
    original = pipe.encode_prompt
    base = _text_state(pipe)

    @functools.lru_cache(maxsize=max_entries)
    def negative(text: str, device: str, dtype: torch.dtype) -> torch.Tensor:
        embeds, _ = original(text, torch.device(device), 1, False)
        return embeds.to(dtype)

    def encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None,
                      prompt_embeds=None, negative_prompt_embeds=None, lora_scale=None, clip_skip=None):
        if do_classifier_free_guidance and isinstance(negative_prompt, str) and negative_prompt_embeds is None \
                and lora_scale is None and clip_skip is None and _text_state(pipe) == base:
            negative_prompt_embeds = negative(negative_prompt, str(device), pipe.text_encoder.dtype)
            negative_prompt = None
        return original(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                        lora_scale=lora_scale, clip_skip=clip_skip)

    encode_prompt.cache = negative
    pipe.encode_prompt = encode_prompt


# -- cond_once --------------------------------------------------------------------------------------

def embed_control_once(embedding: torch.nn.Module, slots: int = 4) -> None:
    """The ControlNet's conditioning embedding (a small CNN over the control image) computed once per
    image tensor. Exact: diffusers prepares the image once per request (both guidance halves
    concatenated) and hands that same tensor, never written to, to every step, so each step's
    embedding was the same computation on the same values with the same weights. Keyed on the tensor
    object (a weak reference, checked with its storage and shape); an entry goes with its tensor, at the
    end of the request. A few slots: one ControlNet may read two units' images in one request.
    Not under autograd (training): there the output would carry one step's graph into the next."""
    if getattr(embedding, "_fast_cond_once", False):
        return
    forward = embedding.forward
    entries: dict[int, tuple] = {}

    def once(conditioning):
        if torch.is_grad_enabled():
            return forward(conditioning)
        key = id(conditioning)
        hit = entries.get(key)
        if hit is not None:
            ref, ptr, shape, out = hit
            if ref() is conditioning and ptr == conditioning.data_ptr() and shape == conditioning.shape:
                embedding.hits += 1
                return out
        out = forward(conditioning)
        embedding.computed += 1
        if len(entries) >= slots:
            entries.pop(next(iter(entries)))
        entries[key] = (weakref.ref(conditioning, lambda _, key=key: entries.pop(key, None)),
                        conditioning.data_ptr(), conditioning.shape, out)
        return out

    embedding.computed, embedding.hits = 0, 0
    embedding.forward = once
    embedding._fast_cond_once = True


# -- attn_direct ------------------------------------------------------------------------------------

_PROCESSOR_PARAMETERS: dict = {}  # processor __call__ function -> the parameter names diffusers computes


def _direct_forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **cross_attention_kwargs):
    if cross_attention_kwargs:  # the VAE's attention gets temb
        call = self.processor.__call__
        function = getattr(call, "__func__", None)
        if function is None or call.__self__ is not self.processor:  # not a plain method: diffusers' own way
            return type(self).forward(self, hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
        names = _PROCESSOR_PARAMETERS.get(function)
        if names is None:
            names = _PROCESSOR_PARAMETERS[function] = frozenset(inspect.signature(call).parameters)
        if not names.issuperset(cross_attention_kwargs):  # some to drop, with diffusers' warning
            return type(self).forward(self, hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
    return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, **cross_attention_kwargs)


def call_attention_directly(model: torch.nn.Module) -> int:
    """Every diffusers Attention in `model` skips the inspect.signature its forward runs on every call.
    Exact: diffusers' forward computes the processor's parameter names only to drop the
    cross_attention_kwargs the processor does not take (with a warning), then makes this very call.
    The names of a bound method's signature depend on its function alone, so they are computed once per
    processor function (by inspect.signature, as diffusers does); when every kwarg is among them (or
    there is none, what the UNet and ControlNet pass) the filtered dict is the dict itself, and any
    other case goes to diffusers' forward. Installed as a bound method per module (a copy of the module
    rebinds it), reading `self.processor` at each call (set_attn_processor still works)."""
    from diffusers.models.attention_processor import Attention

    count = 0
    for module in model.modules():
        if isinstance(module, Attention) and not isinstance(module.__dict__.get("forward"), types.MethodType):
            module.forward = types.MethodType(_direct_forward, module)
            count += 1
    return count


# -- opt-in ----------------------------------------------------------------------------------------

def guard_vae(pipe, log: Callable[[str], None] = print, fallback: torch.dtype = torch.float32) -> None:
    """Redo a non-finite VAE decode in `fallback` precision and keep the VAE there from then on.
    The check costs one device sync per decode, which the PIL conversion right after needs anyway."""
    vae = pipe.vae
    decode = vae.decode

    def guarded(latents, *args, **kwargs):
        out = decode(latents.to(vae.dtype), *args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        if bool(torch.isfinite(sample).all()) or vae.dtype == fallback:
            return out
        log(f"WARNING: VAE decode in {vae.dtype} gave NaN/inf; switching the VAE to {fallback} for this and "
            "every later request")
        vae.to(fallback)
        out = decode(latents.to(fallback), *args, **kwargs)
        # The pipeline post-processes in the dtype it decoded in; give back what it expects.
        if isinstance(out, tuple):
            return (out[0].to(latents.dtype), *out[1:])
        out.sample = out.sample.to(latents.dtype)
        return out

    vae.decode = guarded


def compile_cache_dir(weights_root: Path | None) -> Path | None:
    """Inductor's on-disk cache: shipped beside the weights so a new container does not recompile
    (CONTROLNET_COMPILE_CACHE overrides; None: neither given, Inductor's own default)."""
    given = os.environ.get("CONTROLNET_COMPILE_CACHE") or (weights_root and Path(weights_root) / ".inductor-cache")
    if not given:
        return None
    folder = Path(given)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def compile_models(pipe, mode: str | None = None, cache_root: Path | None = None) -> None:
    # Set, not defaulted: Inductor's cache_dir() writes its default into this variable the first time
    # anything asks (an import may have), and it is read again at every compilation.
    cache = compile_cache_dir(cache_root)
    if cache is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    on_cuda = pipe.device.type == "cuda"
    mode = mode or os.environ.get("CONTROLNET_COMPILE_MODE") or ("max-autotune" if on_cuda else "max-autotune-no-cudagraphs")
    # CONTROLNET_COMPILE_BACKEND (default inductor) exists for the GPU benchmark's CPU rehearsal (make
    # gpu-rehearsal): "aot_eager" captures the same graphs without Inductor's C++ builds, which take many
    # minutes on 2 cores; it needs mode "default".
    backend = os.environ.get("CONTROLNET_COMPILE_BACKEND") or "inductor"
    # dynamic=False: one graph per served shape, warmed in setup(); a new shape recompiles (logged by torch).
    pipe.unet = torch.compile(pipe.unet, mode=mode, dynamic=False, backend=backend)
    if pipe.controlnet is not None:
        pipe.controlnet = torch.compile(pipe.controlnet, mode=mode, dynamic=False, backend=backend)
    pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=mode, dynamic=False, backend=backend)


def warm_up(generate: Callable[..., object], shapes: Iterable[dict], runs: int = 2) -> None:
    """Call generate(**shape) `runs` times per served shape (resolution x aspect x num_samples), so that
    compilation and autotuning happen in setup(), not in the first requests."""
    for shape in shapes:
        for _ in range(runs):
            generate(**shape)
