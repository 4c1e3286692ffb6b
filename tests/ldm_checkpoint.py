"""Write a diffusers SD 1.5 base (UNet, VAE, text encoder) as ONE original-layout (LDM/CompVis) checkpoint.

Hand-written because diffusers ships only the other direction (LDM -> diffusers, in
diffusers.loaders.single_file_utils) as a library; its diffusers -> LDM converter is a script
(scripts/convert_diffusers_to_original_stable_diffusion.py) that is not installed. Writing the mapping
here also keeps the test independent of the code under test: if diffusers' reading of the layout drifted,
the loaded weights would no longer equal the ones written.

The layout is SD 1.5's checkpoint (v1-inference.yaml), generalised to any number of blocks and
layers_per_block, so the tiny test configs map the same way as the real ones:

  model.diffusion_model.input_blocks.0.0        conv_in
  model.diffusion_model.input_blocks.{i}.0/.1   down block resnet / its attention, then .0.op = downsampler
  model.diffusion_model.middle_block.0/1/2      mid resnet, attention, resnet
  model.diffusion_model.output_blocks.{i}.0/.1  up block resnet / attention, then .1.conv or .2.conv = upsampler
  first_stage_model.{encoder,decoder}.*         VAE; its mid-block attention is 1x1 convs (q, k, v, proj_out)
  cond_stage_model.transformer.text_model.*     CLIP text model, keys as transformers names them
"""

from __future__ import annotations

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."

_RESNET = {  # diffusers ResnetBlock2D -> ldm ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(prefix_map: dict[str, str], key: str) -> str | None:
    """The longest matching diffusers prefix, replaced; None when no prefix matches."""
    for old in sorted(prefix_map, key=len, reverse=True):
        if key == old or key.startswith(old + "."):
            return prefix_map[old] + key[len(old):]
    return None


def _unet_prefixes(config: dict) -> dict[str, str]:
    layers = config["layers_per_block"]
    blocks = len(config["block_out_channels"])
    out = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.attentions.0": "middle_block.1",
    }
    for r in range(2):
        for d, l in _RESNET.items():
            out[f"mid_block.resnets.{r}.{d}"] = f"middle_block.{2 * r}.{l}"
    for b in range(blocks):
        for j in range(layers):
            i = 1 + b * (layers + 1) + j
            for d, l in _RESNET.items():
                out[f"down_blocks.{b}.resnets.{j}.{d}"] = f"input_blocks.{i}.0.{l}"
            out[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
        out[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{1 + b * (layers + 1) + layers}.0.op"
    for b in range(blocks):
        has_attention = config["up_block_types"][b].startswith("CrossAttn")
        for j in range(layers + 1):
            i = b * (layers + 1) + j
            for d, l in _RESNET.items():
                out[f"up_blocks.{b}.resnets.{j}.{d}"] = f"output_blocks.{i}.0.{l}"
            out[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
        last = b * (layers + 1) + layers
        out[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{last}.{2 if has_attention else 1}.conv"
    return out


def _vae_prefixes(config: dict) -> dict[str, str]:
    blocks = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    out = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        out |= {f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
                f"{part}.conv_norm_out": f"{part}.norm_out"}
        for r in range(2):
            out[f"{part}.mid_block.resnets.{r}"] = f"{part}.mid.block_{r + 1}"
        for d, l in _VAE_ATTENTION.items():
            out[f"{part}.mid_block.attentions.0.{d}"] = f"{part}.mid.attn_1.{l}"
    for b in range(blocks):
        for j in range(layers):
            out[f"encoder.down_blocks.{b}.resnets.{j}"] = f"encoder.down.{b}.block.{j}"
        out[f"encoder.down_blocks.{b}.downsamplers.0.conv"] = f"encoder.down.{b}.downsample.conv"
        # ldm numbers the decoder's levels from the lowest resolution up, diffusers in execution order.
        for j in range(layers + 1):
            out[f"decoder.up_blocks.{b}.resnets.{j}"] = f"decoder.up.{blocks - 1 - b}.block.{j}"
        out[f"decoder.up_blocks.{b}.upsamplers.0.conv"] = f"decoder.up.{blocks - 1 - b}.upsample.conv"
    return out


def to_ldm(unet: dict, unet_config: dict, vae: dict, vae_config: dict, text_encoder: dict) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict from the three diffusers/transformers state dicts; every key must map."""
    out: dict[str, torch.Tensor] = {}
    unet_map, vae_map = _unet_prefixes(unet_config), _vae_prefixes(vae_config)
    for key, value in unet.items():
        new = _rename(unet_map, key)
        if new is None:
            raise KeyError(f"no LDM name for unet key {key}")
        out[UNET + new] = value
    for key, value in vae.items():
        new = _rename(vae_map, key)
        if new is None:
            raise KeyError(f"no LDM name for vae key {key}")
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # ldm's AttnBlock uses 1x1 convs where diffusers has Linear
        out[VAE + new] = value
    for key, value in text_encoder.items():
        # transformers >= 5.6 saves CLIPTextModel without its `text_model.` level; checkpoints have it.
        out[CLIP + key.removeprefix("text_model.")] = value
    return out
