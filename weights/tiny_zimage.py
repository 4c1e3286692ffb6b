"""Tiny random-weight Z-Image-Turbo and Fun ControlNet Union 2.1, in the real layout.

The base is a diffusers folder (model_index.json naming the real classes, each component in its own
folder); the ControlNet is one original-format `.safetensors` file with the real file's keys, so
diffusers' version detection and `from_single_file` conversion run on it as on the real one. The
geometry keeps what the serving code depends on: 30 transformer layers, so the ControlNet's 15 hint
places (0, 2, ..., 28) land on real layers; 33 control channels; a VAE that downsamples by 8 with 16
latent channels; a Qwen3 text encoder behind a byte-level tokenizer with a chat template (the pipeline
formats every prompt through it). 512 px is 1,024 tokens, a second or two a step on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.zimage import CONTROLNET_21_CONFIG

SEED = 0
DIM = 32
HEADS = 2
TEXT_DIM = 16
CONTROLNET_FILE = "Z-Image-Turbo-Fun-Controlnet-Union-2.1-2602-8steps.safetensors"
# The real tokenizer's template, reduced to what the pipeline sends: one user message, the generation
# prompt, and the thinking switch it passes.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def _fill(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter and buffer drawn again: diffusers starts the pad tokens with torch.empty (NaN
    possible) and the ControlNet's projections at zero (its hints would all be 0, and a zero refiner
    projection reads as a 2.0 file)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)


def write_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer without merges (every byte a token), as Qwen2's files lay it out."""
    from weights.tiny import _bytes_to_unicode

    tokens = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    added = {str(len(tokens) + i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                    "normalized": False, "single_word": False} for i, t in enumerate(SPECIAL)}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "model_max_length": 512, "chat_template": CHAT_TEMPLATE,
        "errors": "replace", "clean_up_tokenization_spaces": False,
    }, indent=1))
    return len(tokens) + len(SPECIAL)


def _own_rng(write):
    """Module constructors draw from torch's global generator: writing these must leave it as it was, or
    the tiny weights written after them (the untrained ControlNet's unseeded embedding) would change."""
    import functools

    @functools.wraps(write)
    def wrapped(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return write(*args, **kwargs)

    return wrapped


@_own_rng
def write_base(folder: Path, name: str = "z-image-turbo") -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    generator = torch.Generator().manual_seed(SEED)
    vocab = write_tokenizer(folder / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=vocab, hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
    ))
    transformer = ZImageTransformer2DModel(
        dim=DIM, n_layers=30, n_refiner_layers=2, n_heads=HEADS, n_kv_heads=HEADS, cap_feat_dim=TEXT_DIM,
        axes_dims=[8, 4, 4], axes_lens=[256, 128, 128],
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    for module in (text_encoder, transformer, vae):
        _fill(module, generator)
    ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, transformer=transformer,
    ).save_pretrained(str(folder))


@_own_rng
def write_controlnet(folder: Path, name: str = "z-image-turbo-fun-controlnet-union-2.1") -> Path:
    """The ControlNet as the original single file: its state dict under the original key names (which
    are diffusers' for this model: the converter renames nothing for 2.1)."""
    from diffusers import ZImageControlNetModel
    from safetensors.torch import save_file

    config = {k: v for k, v in CONTROLNET_21_CONFIG.items() if not k.startswith("_")}
    controlnet = ZImageControlNetModel(**dict(config, dim=DIM, n_heads=HEADS, n_kv_heads=HEADS))
    _fill(controlnet, torch.Generator().manual_seed(SEED + 1))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONTROLNET_FILE
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(path))
    # The converter's config for the tiny architecture (the real one comes from models.zimage).
    (folder / "config.json").write_text(json.dumps(dict(CONTROLNET_21_CONFIG, dim=DIM, n_heads=HEADS, n_kv_heads=HEADS),
                                                   indent=1) + "\n")
    return path
