"""The Z-Image rows of the device script (bench/device.py's `zimage` phase): Z-Image-Turbo with the Fun
ControlNet Union 2.1 as the zimage image serves it, 8 steps at 1024x1024, with the ControlNet and without
it (a window covering no step: its compute skipped, the base model alone, bit-identical to diffusers' plain
pipeline), batch 1 and 4, peak GPU memory.

Full size is built with random weights directly in GPU memory, in bf16 as served: about 27 GB that speed
does not depend on, and which the device budget has no time to write to disk and read back. The
architectures are diffusers' own defaults for Z-Image-Turbo's transformer, Qwen3-4B's text encoder, the
16-channel VAE and models.zimage's ControlNet config (checked against the real file's parameter count).
The tokenizer is the tiny weights' byte tokenizer: a prompt comes out as more tokens than the real one
makes (one a byte), so the text encoding is timed on a longer sequence than served. `--size tiny` loads
the tiny weights in the real layout through the served loader (the CPU rehearsal).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

PROMPT = "a cozy cottage with a red roof, photorealistic, golden hour"
SEED = 12345
# Qwen3-4B, as Z-Image-Turbo's text_encoder/config.json gives it.
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
# The FLUX-style VAE Z-Image uses: 16 latent channels, no quant convolutions.
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
           use_quant_conv=False, use_post_quant_conv=False)
PROFILES = {"full": dict(steps=8, size=1024, batches=(1, 4), warmup=1, runs=3),
            "tiny": dict(steps=2, size=128, batches=(1, 4), warmup=0, runs=1)}


def _random_(module, torch) -> None:
    """Pad tokens start as torch.empty (NaN possible); the rest keep their init."""
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            if name.endswith("pad_token"):
                tensor.normal_(0.0, 0.02)


def build_full(device: str, work: Path):
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageControlNetModel,
                           ZImageControlNetPipeline, ZImageTransformer2DModel)
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    from models.zimage import CONTROLNET_21_CONFIG
    from weights.tiny_zimage import write_tokenizer

    dtype = torch.bfloat16

    def made(cls, *args, **kwargs):
        with torch.device(device):  # the random init on the GPU: seconds, not minutes
            return cls(*args, **kwargs).to(dtype).eval()

    write_tokenizer(work / "tokenizer")
    transformer = made(ZImageTransformer2DModel)
    _random_(transformer, torch)
    controlnet = made(ZImageControlNetModel, **{k: v for k, v in CONTROLNET_21_CONFIG.items() if not k.startswith("_")})
    pipe = ZImageControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=made(AutoencoderKL, **VAE),
        text_encoder=made(Qwen3Model, Qwen3Config(**QWEN3_4B)), tokenizer=AutoTokenizer.from_pretrained(work / "tokenizer"),
        transformer=transformer, controlnet=controlnet,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny(device: str, work: Path):
    from models import zimage
    from weights import tiny_zimage

    tiny_zimage.write_base(work / "base")
    file = tiny_zimage.write_controlnet(work / "controlnet")
    return zimage.load_pipeline(work / "base", zimage.load_controlnet(file, file.parent), device)


def params_m(pipe) -> dict[str, float]:
    """Each model's own parameters, in millions: the ControlNet shares the transformer's embedders and
    refiners (bound to it), which count once, under the transformer."""
    seen, counts = set(), {}
    for name in ("transformer", "controlnet", "text_encoder", "vae"):
        own = [p for p in getattr(pipe, name).parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        counts[name] = round(sum(p.numel() for p in own) / 1e6, 1)
    return counts


def measure(size: str, cuda: bool, clock, repeat, record: dict, work: Path | None = None) -> None:
    """Fills `record`: parameters, build time, and a row per (ControlNet on/off, batch) with peak GPU memory."""
    import numpy as np
    import torch
    from PIL import Image

    from models.zimage import control_window

    profile = PROFILES[size]
    device = "cuda" if cuda else "cpu"
    work = Path(work or tempfile.mkdtemp(prefix="bench-zimage-"))
    start = time.time()
    pipe = (build_full if size == "full" else build_tiny)(device, work)
    record["build_s"] = round(time.time() - start, 1)
    record["params_m"] = params_m(pipe)
    record.update(steps=profile["steps"], size=f"{profile['size']}x{profile['size']}", dtype=str(pipe.transformer.dtype),
                  rows={})
    rng = np.random.default_rng(0)
    control = Image.fromarray(np.where(rng.random((profile["size"], profile["size"], 3)) > 0.9, 255, 0).astype(np.uint8))

    def call(batch: int):
        return pipe(prompt=PROMPT, height=profile["size"], width=profile["size"], num_inference_steps=profile["steps"],
                    guidance_scale=0.0, control_image=control, controlnet_conditioning_scale=0.75,
                    num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np")

    for with_controlnet in (True, False):
        for batch in profile["batches"]:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode(), control_window(pipe, 0.0 if with_controlnet else 1.0, 1.0):
                row = repeat(lambda: call(batch), clock.wall, profile["warmup"], profile["runs"])
            row["images_per_s"] = batch * 1e3 / row["median_ms"]
            if cuda:
                row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
            name = f"{'with' if with_controlnet else 'without'} the ControlNet, batch {batch}"
            record["rows"][name] = row
            print(f"  zimage {name}: {row}", flush=True)


def markdown(record: dict) -> list[str]:
    if not record.get("rows"):
        return []
    lines = ["", f"### Z-Image-Turbo + Fun ControlNet Union 2.1 ({record['steps']} steps at {record['size']}, "
             f"{record['dtype']}, guidance 0)", "",
             f"Parameters (M): {record['params_m']}; built in {record['build_s']} s.", "",
             "| row | median ms | p90 ms | min ms | runs | images/s | peak GPU MiB |", "|---|---|---|---|---|---|---|"]
    for name, s in record["rows"].items():
        peak = f"{s['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in s else "-"
        lines.append(f"| {name} | {s['median_ms']:.1f} | {s['p90_ms']:.1f} | {s['min_ms']:.1f} | {s['runs']} | "
                     f"{s['images_per_s']:.2f} | {peak} |")
    return lines
