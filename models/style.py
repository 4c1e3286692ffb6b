"""A request's LoRA and textual-inversion embedding on the one loaded pipeline, and nothing after it.

diffusers' loaders do the work (PEFT backend for LoRAs, kohya's key format converted by diffusers).
Only one LoRA is ever loaded: it stays while consecutive requests use the same one (loading costs
time) and is unloaded before another is loaded or a request without one runs, which restores the
base weights bit for bit. Embeddings are added for one request and removed after it. Files are read
with safetensors only: a pickle from a URL could run code on the server.

A client's file is checked before the model takes it: its values are finite and of a sane size (a NaN
LoRA made every sample NaN), an embedding is one tensor of vectors as wide as the text encoder's,
and there are at most MAX_EMBEDDING_VECTORS of them. Every refusal says what to send instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from models import critical
from models.assets import AssetError

ADAPTER = "request"
# Trained LoRA and embedding values stay within a few units (a kohya alpha is at most the rank, a few
# hundred); anything this large is a damaged file that would turn every sample into NaN.
MAX_ABS = 1e4
# Each vector is one token of the prompt, and CLIP reads 75 (77 less start and end): more could never
# all be used. Textual-inversion embeddings have 1 to a few dozen; 5,000 kept the server busy 2 minutes.
MAX_EMBEDDING_VECTORS = 75
SD15_WIDTH = 768
KNOWN_WIDTHS = {1024: "SD 2", 1280: "SDXL (its second text encoder)"}


def max_embedding_vectors() -> int:
    return int(os.environ.get("CONTROLNET_EMBEDDING_MAX_VECTORS", MAX_EMBEDDING_VECTORS))


def _key(key: str) -> str:
    return repr(key[:80])


def check_values(state: dict, what: str, kind: str) -> None:
    """Every floating tensor finite and below MAX_ABS, or AssetError naming the tensor."""
    for key, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if not torch.isfinite(tensor).all():
            raise AssetError(f"{what} holds non-finite values (NaN or infinity) in {_key(key)}: the file is damaged "
                             f"or was saved from a diverged training; send another {kind}")
        largest = float(tensor.abs().max())
        if largest > MAX_ABS:
            raise AssetError(f"{what} holds values up to {largest:.3g} in {_key(key)}, where a trained {kind}'s stay "
                             f"far below {MAX_ABS:g}: the file is damaged or not a {kind}; send another one")


def embedding_vectors(state: dict, width: int) -> torch.Tensor:
    """The embedding's n x width vectors, or AssetError saying what an SD 1.5 embedding looks like."""
    expected = f"one tensor of n x {width} values" + (f" (SD 1.5 embeddings are {SD15_WIDTH} wide)" if width != SD15_WIDTH else "")
    if len(state) == 1:
        (key, tensor), = state.items()
    elif "emb_params" in state:
        key, tensor = "emb_params", state["emb_params"]
    else:
        keys = sorted(state)
        sdxl = ": an SDXL embedding" if {"clip_l", "clip_g"} <= set(keys) else ""
        raise AssetError(f"embedding_url holds {len(keys)} tensors ({', '.join(_key(k) for k in keys[:5])}{sdxl}); "
                         f"a textual-inversion embedding for SD 1.5 is {expected}")
    if not tensor.is_floating_point():
        raise AssetError(f"embedding_url's tensor {_key(key)} holds {str(tensor.dtype).replace('torch.', '')} values; "
                         f"an embedding is {expected} in floating point")
    if tensor.ndim == 1:
        tensor = tensor[None]
    if tensor.ndim != 2:
        shape = " x ".join(str(n) for n in tensor.shape)
        raise AssetError(f"embedding_url's tensor is {tensor.ndim}-dimensional ({shape}); an embedding is {expected}")
    count, got = tensor.shape
    if got != width:
        known = f" ({KNOWN_WIDTHS[got]} embeddings are {got} wide)" if got in KNOWN_WIDTHS else ""
        raise AssetError(f"embedding_url's vectors are {got} wide{known}; this model's text encoder takes vectors "
                         f"{width} wide" + (f" (SD 1.5 embeddings are {SD15_WIDTH} wide)" if width != SD15_WIDTH else "")
                         + ": send an SD 1.5 embedding")
    limit = max_embedding_vectors()
    if not 1 <= count <= limit:
        raise AssetError(f"embedding_url holds {count} vectors; send 1 to {limit} (each vector takes one of the "
                         "prompt's 75 tokens; textual-inversion embeddings have 1 to a few dozen)")
    check_values({key: tensor}, "embedding_url", "embedding")
    return tensor


def _read(path: Path, what: str) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AssetError(f"{what} is not a .safetensors file ({type(exc).__name__}); send a .safetensors file") from None


# How the LoRA messages name a model family: the model, and which LoRAs fit it.
SD15_LORAS = ("Stable Diffusion 1.5", "an SD 1.5 LoRA (diffusers/PEFT or kohya format; SDXL and SD 2 LoRAs do not fit)")


class StyleAssets:
    def __init__(self, pipe, log: Callable[[str], None] = print, family: tuple[str, str] = SD15_LORAS):
        self.pipe = pipe
        self.log = log
        self.lora_key: str | None = None
        self.model, self.fitting_lora = family

    def _unload_lora(self) -> None:
        if self.lora_key is not None:
            self.pipe.unload_lora_weights()
            self.lora_key = None

    def _load_lora(self, path: Path, key: str) -> None:
        state = _read(path, "lora_url")
        check_values(state, "lora_url", "LoRA")
        try:
            self.pipe.load_lora_weights(state, adapter_name=ADAPTER)
        except Exception as exc:  # diffusers/PEFT raise several types for a LoRA that does not fit
            self.pipe.unload_lora_weights()  # drop whatever part of it was attached
            first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise AssetError(f"lora_url is not a LoRA for {self.model} ({first_line}); send {self.fitting_lora}") from None
        if not self.pipe.get_list_adapters():
            # diffusers loads nothing from keys it does not know (another family's LoRA) and only warns.
            raise AssetError(f"lora_url holds no LoRA weights this model can use: it is not a LoRA for {self.model}; "
                             f"send {self.fitting_lora}")
        self.lora_key = key

    @contextlib.contextmanager
    def applied(
        self,
        lora: Path | None = None,
        lora_key: str | None = None,
        lora_scale: float = 1.0,
        embedding: Path | None = None,
        token: str = "",
    ):
        """The pipeline with these assets for the length of the block (none: the base pipeline)."""
        if lora_key != self.lora_key:
            with critical.section():  # a cancel waits: half a LoRA, or one not recorded, would stay loaded
                self._unload_lora()
                if lora is not None:
                    self._load_lora(lora, lora_key)
        if lora is not None:
            self.pipe.set_adapters([ADAPTER], [lora_scale])
        added = False
        try:
            if embedding is not None:
                self._add_embedding(_read(embedding, "embedding_url"), token)
                added = True
            yield
        finally:
            if added:
                with critical.section(), contextlib.suppress(ValueError):  # nothing was added after all
                    self.pipe.unload_textual_inversion()

    def _add_embedding(self, state: dict, token: str) -> None:
        vectors = embedding_vectors(state, self.pipe.text_encoder.get_input_embeddings().weight.shape[-1])
        vocabulary = self.pipe.tokenizer.get_vocab()
        # diffusers names a multi-vector embedding's tokens token, token_1, token_2, ...
        taken = [t for t in [token] + [f"{token}_{i}" for i in range(1, len(vectors))] if t in vocabulary]
        if taken:
            raise AssetError(f"embedding_token {token!r} is a word the model already knows ({taken[0]!r}); "
                             "use a token that is not a word the model knows, e.g. <my-style>")
        try:
            with critical.section(), _plain_resizing(self.pipe.text_encoder):
                self.pipe.load_textual_inversion({"emb_params": vectors}, token=token)
        except Exception as exc:  # diffusers raises several types; its messages may print the tensors
            if type(exc).__name__ == "CancelationException":  # Cog's cancel, not a fault of the file
                raise
            with contextlib.suppress(ValueError):  # drop whatever part of it was added
                self.pipe.unload_textual_inversion()
            raise AssetError(f"embedding_url could not be added to the model ({type(exc).__name__}); send an SD 1.5 "
                             "textual-inversion embedding") from None


@contextlib.contextmanager
def _plain_resizing(text_encoder):
    """diffusers grows the token table with transformers' default `mean_resizing`, which draws the new
    rows from a multivariate normal fitted to the whole 49408 x 768 table (seconds of CPU, and a log
    notice on every request) and then overwrites each new row with the embedding's vector: the same
    table, without the draw."""
    resize = text_encoder.resize_token_embeddings
    text_encoder.resize_token_embeddings = functools.partial(resize, mean_resizing=False)
    try:
        yield
    finally:
        del text_encoder.resize_token_embeddings  # the class's method again
