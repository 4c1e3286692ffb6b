"""A request's LoRA and textual-inversion embedding on the one loaded pipeline, and nothing after it.

diffusers' loaders do the work (PEFT backend for LoRAs, kohya's key format converted by diffusers).
Only one LoRA is ever loaded: it stays while consecutive requests use the same one (loading costs
time) and is unloaded before another is loaded or a request without one runs, which restores the
base weights bit for bit. Embeddings are added for one request and removed after it. Files are read
with safetensors only: a pickle from a URL could run code on the server.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError
from safetensors.torch import load_file

from models import critical
from models.assets import AssetError

ADAPTER = "request"


def _read(path: Path, what: str) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AssetError(f"{what} is not a .safetensors file ({type(exc).__name__}); send a .safetensors file") from None


class StyleAssets:
    def __init__(self, pipe, log: Callable[[str], None] = print):
        self.pipe = pipe
        self.log = log
        self.lora_key: str | None = None

    def _unload_lora(self) -> None:
        if self.lora_key is not None:
            self.pipe.unload_lora_weights()
            self.lora_key = None

    def _load_lora(self, path: Path, key: str) -> None:
        state = _read(path, "lora_url")
        try:
            self.pipe.load_lora_weights(state, adapter_name=ADAPTER)
        except Exception as exc:  # diffusers/PEFT raise several types for a LoRA that does not fit
            self.pipe.unload_lora_weights()  # drop whatever part of it was attached
            first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise AssetError(
                f"lora_url is not a LoRA for Stable Diffusion 1.5 ({first_line}); send an SD 1.5 LoRA "
                "(diffusers/PEFT or kohya format; SDXL and SD 2 LoRAs do not fit)"
            ) from None
        if not self.pipe.get_list_adapters():
            raise AssetError("lora_url holds no LoRA weights this model can use; send an SD 1.5 LoRA")
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
                state = _read(embedding, "embedding_url")
                added = True  # a load that fails half-way may already have added the token
                try:
                    with critical.section():
                        self.pipe.load_textual_inversion(state, token=token)
                except ValueError as exc:
                    raise AssetError(
                        f"embedding_url: {str(exc).strip().splitlines()[0][:200]}. Use a token that is not a "
                        "word the model knows, e.g. <my-style>"
                    ) from None
            yield
        finally:
            if added:
                with critical.section(), contextlib.suppress(ValueError):  # nothing was added after all
                    self.pipe.unload_textual_inversion()
