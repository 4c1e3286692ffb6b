"""`python -m weights.tiny`: tiny random-weight models in the real weights' folder layout, offline.

They exercise the real loading and generation code in seconds on a CPU. Their images are noise.
The shapes keep what matters to the serving code: a VAE that downsamples by 8 (so sample sizes
are multiples of 64 as with SD 1.5), a ControlNet whose conditioning embedding matches, a CLIP
text encoder with 77 positions and a byte-level BPE tokenizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from pathlib import Path

import torch

import models  # noqa: F401  first: its third-party noise filters (models/quiet.py)
import weights

SEED = 0
TEXT_DIM = 32
BLOCKS = (32, 32, 64)
DOWN = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
UP = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
# Same schedule values as SD 1.5's scheduler_config.json.
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
)


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable-character table (every byte gets a visible symbol)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)]


# The words tiny-weight prompts are made of (README, quickstart, tests, the default a_prompt and
# n_prompt, common prompt words). Each becomes one token, as in CLIP's 49k-word BPE, so a normal
# prompt stays under the 77 positions; other words fall back to pieces and single characters.
WORDS = """
a an the and or of in on at to with without by for from as is it its this that over under near
cozy cottage house home building room street city town village garden road bridge tower castle
red orange yellow green blue purple pink brown black white grey gray golden silver dark bright
roof door window wall walls floor lawn tree trees sky sun cloud clouds water river lake sea
mountain mountains forest field flower flowers grass stone wood wooden glass brick
man woman person people girl boy child dog cat bird horse face hand hands portrait
photo photograph photorealistic realistic painting drawing sketch illustration render art style
hour light lighting night day morning evening sunset sunrise shadow shadows
best quality high low extremely highly very detailed detail details sharp focus masterpiece
longbody lowres bad anatomy missing fingers extra digit fewer digits cropped worst blurry
ugly deformed text watermark jpeg artifacts simple background
beautiful old new small large big tall modern ancient little
cinematic dramatic soft warm cold
""".split()


def _bpe_merges(words: list[str], end: str = "</w>") -> list[tuple[str, str]]:
    """Learn merges until every word is one symbol: encoding applies them in the same order, so each
    training word comes out as one token."""
    symbols = {w: [*w[:-1], w[-1] + end] for w in dict.fromkeys(words)}
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for parts in symbols.values():
            for pair in zip(parts, parts[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # ties: alphabetical, deterministic
        merges.append(best)
        for word, parts in symbols.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            symbols[word] = merged


def write_tokenizer(folder: Path) -> int:
    """vocab.json + merges.txt + configs, like openai/clip-vit-large-patch14's; returns the vocab size."""
    chars = _bytes_to_unicode()
    merges = _bpe_merges(WORDS)
    # Every merge result must be in the vocab (transformers 5 checks).
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    tokens = list(dict.fromkeys(tokens + ["<|startoftext|>", "<|endoftext|>"]))  # two merges may spell one token
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": 77, "do_lower_case": True, "add_prefix_space": False,
         "errors": "replace", "tokenizer_class": "CLIPTokenizer"}, indent=1))
    return len(tokens)


def write_base(folder: Path, name: str) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = write_tokenizer(folder / "tokenizer")
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        block_out_channels=BLOCKS, layers_per_block=1, sample_size=64, in_channels=4, out_channels=4,
        down_block_types=DOWN, up_block_types=UP, cross_attention_dim=TEXT_DIM, norm_num_groups=8,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
        layers_per_block=1, sample_size=64,
    )
    # eos_token_id=2 mimics SD 1.5's legacy config (pooled output taken at the argmax token id).
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=vocab, max_position_embeddings=77, projection_dim=TEXT_DIM,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, unet=unet,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    # The real base is downloaded as the fp16 variant: save the same file names and dtype.
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    # SD 1.5's PNDM config also carries clip_sample=false, which PNDM ignores but DDIM (whose
    # default is true) reads when built from it.
    config_path = folder / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "clip_sample": False}, indent=2))
    shutil.rmtree(folder / "tokenizer")
    write_tokenizer(folder / "tokenizer")  # keep the four files the real repo has, nothing more


def write_controlnet(folder: Path, name: str) -> None:
    from diffusers import ControlNetModel

    spec = weights.MANIFEST["components"][name]
    # Another version's tiny ControlNet gets its own weights, so tests see which version ran (the default
    # versions' keep SEED + 1: the parity fixture's outputs were made with them).
    other_version = any(weights.version_of(role) and component == name
                        for roles in weights.MANIFEST["conditions"].values() for role, component in roles.items())
    torch.manual_seed(SEED + 1 + (zlib.crc32(name.encode()) if other_version else 0))
    controlnet = ControlNetModel(
        block_out_channels=BLOCKS, layers_per_block=1, in_channels=4, down_block_types=DOWN,
        cross_attention_dim=TEXT_DIM, norm_num_groups=8, attention_head_dim=8,
        # three stride-2 convolutions: pixels -> latents, /8 like the VAE
        conditioning_embedding_out_channels=(8, 16, 16, 32),
        **spec.get("tiny_config", {}),
    )
    # A new ControlNet starts with zero convolutions, which makes it a no-op, and its default init
    # shrinks the control image to nothing by the end of the conditioning path. Trained ones do
    # neither, and tests must be able to see the control map change the samples.
    with torch.no_grad():
        for conv in controlnet.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight)
                conv.bias.zero_()
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 1.0)
    # The real download's file names and dtype (1.0's fp32 safetensors, 1.1's fp16 variant, tile's .bin),
    # so the loader reads the same layout it will serve.
    files = spec["files"]
    if "diffusion_pytorch_model.fp16.safetensors" in files:
        controlnet.to(torch.float16).save_pretrained(folder, variant="fp16")
    else:
        controlnet.save_pretrained(folder, safe_serialization="diffusion_pytorch_model.bin" not in files)


def write_untrained_controlnet(folder: Path, name: str) -> None:
    """The custom condition's ControlNet before training: from the tiny base's UNet, zero convolutions
    kept, so that serving it reproduces the base model exactly (unlike the randomised ones above)."""
    from models.train import write_untrained_controlnet as write

    base = weights.MANIFEST["components"][name]["from_unet"]
    write(folder.parent / base, folder)


def write_detector(folder: Path, name: str) -> None:
    """The detector class that loads a component also writes its random version, in the same layout."""
    import importlib

    module, _, cls = weights.MANIFEST["components"][name]["random"].partition(":")
    getattr(importlib.import_module(module), cls).save_random(folder, seed=SEED + 2)


WRITERS = {"base": write_base, "controlnet": write_controlnet, "detector": write_detector}


def writer(name: str, role: str):
    """How a component's tiny version is written: the function its manifest entry names (another model
    family's), a derived ControlNet's, or its role's (another ControlNet version's role as its default's)."""
    spec = weights.MANIFEST["components"][name]
    if "tiny" in spec:
        import importlib

        module, _, function = spec["tiny"].partition(":")
        return getattr(importlib.import_module(module), function)
    if "from_unet" in spec:
        return write_untrained_controlnet
    return WRITERS[role.partition(weights.VERSION_MARK)[0]]


def write(roles: dict[str, str], dest_root: Path, force: bool = False) -> None:
    """roles: component name -> role (several conditions share the base)."""
    for name, role in roles.items():
        folder = dest_root / name
        if weights.is_complete(folder, name, tiny=True) and not force:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        writer(name, role)(folder, name)
        weights.write_marker(folder, tiny=True, component=name, generator=weights.TINY_GENERATOR)
        print(f"tiny {name}: written to {folder}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--force", action="store_true", help="rewrite even if already complete")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar for a one-shard, instant save is noise
    roles = {}
    for image in weights.CONDITIONS + tuple(weights.FAMILIES):  # a combined image's are its conditions'
        for role, name in weights.components(image).items():
            # A family's detector roles are named after their condition: canny.detector.
            condition, _, own = role.partition(".")
            roles[name] = own if condition in weights.CONDITIONS else role
    # Derived components are written from the base, so the base goes first.
    roles = dict(sorted(roles.items(), key=lambda item: "from_unet" in weights.MANIFEST["components"][item[0]]))
    write(roles, weights.root() / weights.TINY, args.force)


if __name__ == "__main__":
    main()
