"""`python -m bench.weights`: full-size SD 1.5 + ControlNet canny with random weights, fp16 safetensors.

Written in the real folder layout with the real markers (the manifest's revision), plus `bench: true`,
under a root outside the repo (default ~/.cache/controlnet-cog/bench-weights). With
`CONTROLNET_WEIGHTS_DIR=<root> CONTROLNET_WEIGHTS=real` the real loader and `setup()` load them
exactly as they load a download, so what the benchmark times is the served path. Speed does not depend
on the weight values; the images are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

import weights
from weights.tiny import write_tokenizer

CONFIGS = Path(__file__).resolve().parent / "configs"
CONDITION = "canny"
DEFAULT_ROOT = Path(os.environ.get("CONTROLNET_COG_CACHE", Path.home() / ".cache" / "controlnet-cog")) / "bench-weights"


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def _save(model, folder: Path, variant: str | None) -> int:
    model.to(torch.float16).save_pretrained(folder, variant=variant)
    return sum(p.numel() for p in model.parameters())


def write_base(folder: Path) -> dict[str, int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config("sd15-scheduler"), indent=2))
    counts = {}
    torch.manual_seed(0)
    counts["unet"] = _save(UNet2DConditionModel.from_config(config("sd15-unet")), folder / "unet", "fp16")
    counts["vae"] = _save(AutoencoderKL.from_config(config("sd15-vae")), folder / "vae", "fp16")
    te = {k: v for k, v in config("sd15-text_encoder").items() if k not in ("architectures", "torch_dtype", "model_type")}
    counts["text_encoder"] = _save(CLIPTextModel(CLIPTextConfig(**te)), folder / "text_encoder", "fp16")
    return counts


def write_controlnet(folder: Path) -> dict[str, int]:
    from diffusers import ControlNetModel

    torch.manual_seed(1)
    # The canny download is a single fp16 file without a variant suffix; keep that layout.
    return {"controlnet": _save(ControlNetModel.from_config(config("sd-controlnet-canny")), folder, None)}


def write(root: Path, force: bool = False) -> dict[str, int]:
    if Path(root).resolve() == weights.HERE:
        # Random weights with real markers there would be served as the real model.
        raise SystemExit(f"refusing to write random bench weights into {weights.HERE}; pick another --root")
    counts: dict[str, int] = {}
    writers = {"base": write_base, "controlnet": write_controlnet}
    for role, name in weights.components(CONDITION).items():
        folder = root / name
        if weights.is_complete(folder, name, tiny=False) and not force:
            info = weights.marker(folder)
            counts.update(info.get("params", {}))
            continue
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        written = writers[role](folder)
        counts.update(written)
        # The real marker (so CONTROLNET_WEIGHTS=real finds it) plus `bench` so nobody mistakes it.
        weights.write_marker(folder, revision=weights.MANIFEST["components"][name]["revision"], component=name,
                             bench=True, params=written)
        print(f"bench {name}: {sum(written.values()) / 1e6:.0f} M params written to {folder} "
              f"in {time.perf_counter() - start:.0f}s", flush=True)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    write(args.root, args.force)


if __name__ == "__main__":
    main()
