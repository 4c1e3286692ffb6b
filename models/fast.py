"""The fast path: exact speed-ups applied to an already loaded pipeline, each one switchable.

Off by default (`CONTROLNET_FAST` unset): none of these has GPU figures yet (docs/benchmarks.md).
`CONTROLNET_FAST=all`, or a comma list of OPTIONS, turns them on; `apply()` is what setup() calls.

    negcache       the negative prompt's embedding is computed once per distinct text (the default
                   n_prompt is the same on every request) instead of on every request
    vae_guard      a VAE decode that yields NaN/inf is redone in float32 and the VAE stays float32;
                   the switch is logged (fp16 SD VAEs can overflow)
    channels_last  UNet, ControlNet and VAE in channels_last (pays off with compile; can hurt eager)
    compile        torch.compile of the UNet, the ControlNet and the VAE decoder (mode from
                   CONTROLNET_COMPILE_MODE, default "max-autotune-no-cudagraphs" off CUDA and
                   "max-autotune" on CUDA, which adds CUDA graphs), static shapes: warm_up() then
                   compiles every served shape inside setup(); the Inductor cache lives beside the
                   weights (CONTROLNET_COMPILE_CACHE) so a restarted container reuses it

None of them changes the maths; tests/test_fast.py checks that the output for a seed matches the
plain path within a stated tolerance.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Iterable

import torch

OPTIONS = ("negcache", "vae_guard", "channels_last", "compile")


def options_from_env(value: str | None = None) -> tuple[str, ...]:
    value = os.environ.get("CONTROLNET_FAST", "") if value is None else value
    names = [name.strip() for name in value.split(",") if name.strip()]
    if names in (["all"], ["1"]):
        return OPTIONS
    if names in ([], ["0"], ["off"]):
        return ()
    unknown = [name for name in names if name not in OPTIONS]
    if unknown:
        raise ValueError(f"CONTROLNET_FAST: unknown option(s) {', '.join(unknown)}; known: all, {', '.join(OPTIONS)}")
    return tuple(name for name in OPTIONS if name in names)


def apply(pipe, options: Iterable[str], log: Callable[[str], None] = print) -> tuple[str, ...]:
    """Apply the named options to `pipe` in place; returns what was applied, in a fixed order."""
    options = tuple(name for name in OPTIONS if name in set(options))
    if "negcache" in options:
        cache_negative_prompt(pipe)
    if "vae_guard" in options:
        guard_vae(pipe, log)
    if "channels_last" in options:
        # An image of several conditions has no ControlNet until a request loads one: those stay as loaded.
        for model in (m for m in (pipe.unet, pipe.controlnet, pipe.vae) if m is not None):
            model.to(memory_format=torch.channels_last)
    if "compile" in options:
        compile_models(pipe)
    if options:
        log(f"fast path: {', '.join(options)}")
    return options


def cache_negative_prompt(pipe, max_entries: int = 16) -> None:
    """encode_prompt() with the negative half looked up per text. diffusers encodes the two halves in
    separate text-encoder calls and repeats a given negative embedding per sample itself, so this
    is the same computation done once."""
    original = pipe.encode_prompt

    @functools.lru_cache(maxsize=max_entries)
    def negative(text: str, device: str, dtype: torch.dtype) -> torch.Tensor:
        embeds, _ = original(text, torch.device(device), 1, False)
        return embeds.to(dtype)

    def encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None,
                      prompt_embeds=None, negative_prompt_embeds=None, lora_scale=None, clip_skip=None):
        if do_classifier_free_guidance and isinstance(negative_prompt, str) and negative_prompt_embeds is None \
                and lora_scale is None:
            negative_prompt_embeds = negative(negative_prompt, str(device), pipe.text_encoder.dtype)
            negative_prompt = None
        return original(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                        lora_scale=lora_scale, clip_skip=clip_skip)

    encode_prompt.cache = negative
    pipe.encode_prompt = encode_prompt


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


def compile_cache_dir(weights_root: Path | None = None) -> Path:
    """Inductor's on-disk cache: shipped beside the weights so a new container does not recompile."""
    import weights

    folder = Path(os.environ.get("CONTROLNET_COMPILE_CACHE") or Path(weights_root or weights.root()) / ".inductor-cache")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def compile_models(pipe, mode: str | None = None) -> None:
    # Set, not defaulted: Inductor's cache_dir() writes its default into this variable the first time
    # anything asks (an import may have), and it is read again at every compilation.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())
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
