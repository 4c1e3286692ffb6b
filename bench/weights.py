"""`python -m bench.weights`: full-size SD 1.5 + ControlNet canny with random weights, fp16 safetensors.

Written in the real folder layout with the real markers (the manifest's revision), plus `bench: true`,
under a root outside the repo (default ~/.cache/controlnet-cog/bench-weights). With
`CONTROLNET_WEIGHTS_DIR=<root> CONTROLNET_WEIGHTS=real` the real loader and `setup()` load them
exactly as they load a download, so what the benchmark times is the served path. Speed does not depend
on the weight values; the images are noise.

The models are built and cast on `--device` (default: the GPU when there is one): on a GPU the random
init of 1.4 G parameters takes seconds, against about a minute on 2 CPU cores. `--size tiny` writes the
same layout and markers from the same configs shrunk (bench/device.sh's CPU rehearsal).

`--image multi` writes what the multi image needs beside them (bench/device.py's units phase): every
v1.0 ControlNet has canny's architecture and speed does not depend on the weight values, so each other
condition's ControlNet is canny's random file hard-linked under its own name and marker (no parameters
to make, no gigabytes to write: instant on any machine). `weights.locate("multi")` wants every component
complete, detectors included, though the bench never runs them (its units send maps, image_is_map): each
detector is the small random version its class writes for the tests (save_random), in the real format,
made on the CPU (its class loads it from there), marked `stand_in` so nobody mistakes its size.
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


# --size tiny: the real configs with these values replaced (same block types, so the same code runs).
_TINY_NET = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "attention_head_dim": 8,
             "norm_num_groups": 8, "cross_attention_dim": 32}
TINY = {
    "sd15-unet": _TINY_NET,
    "sd-controlnet-canny": {**_TINY_NET, "conditioning_embedding_out_channels": [8, 16, 16, 32]},
    "sd15-vae": {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 4},
    "sd15-text_encoder": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                          "num_hidden_layers": 2, "projection_dim": 32},
}


def config(name: str, size: str = "full") -> dict:
    values = json.loads((CONFIGS / f"{name}.json").read_text())
    return {**values, **TINY.get(name, {})} if size == "tiny" else values


def _save(model, folder: Path, variant: str | None) -> int:
    # Cast where it was built, then write from host memory (safetensors serialises CPU tensors).
    model.to(torch.float16).to("cpu").save_pretrained(folder, variant=variant)
    return sum(p.numel() for p in model.parameters())


def write_base(folder: Path, size: str = "full") -> dict[str, int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config("sd15-scheduler"), indent=2))
    counts = {}
    torch.manual_seed(0)
    counts["unet"] = _save(UNet2DConditionModel.from_config(config("sd15-unet", size)), folder / "unet", "fp16")
    counts["vae"] = _save(AutoencoderKL.from_config(config("sd15-vae", size)), folder / "vae", "fp16")
    te = {k: v for k, v in config("sd15-text_encoder", size).items() if k not in ("architectures", "torch_dtype", "model_type")}
    counts["text_encoder"] = _save(CLIPTextModel(CLIPTextConfig(**te)), folder / "text_encoder", "fp16")
    return counts


def write_controlnet(folder: Path, size: str = "full") -> dict[str, int]:
    from diffusers import ControlNetModel

    torch.manual_seed(1)
    # The canny download is a single fp16 file without a variant suffix; keep that layout.
    return {"controlnet": _save(ControlNetModel.from_config(config("sd-controlnet-canny", size)), folder, None)}


def link_controlnet(folder: Path, source: Path) -> dict[str, int]:
    """Canny's random ControlNet under another component's name: its files hard-linked (copied where
    links are refused), so the multi image loads a model of its own from its own folder."""
    folder.mkdir(parents=True)
    for file in source.iterdir():
        if file.name == weights.MARKER:
            continue
        try:
            os.link(file, folder / file.name)
        except OSError:
            shutil.copy2(file, folder / file.name)
    return {}


def write_detector(folder: Path, name: str) -> dict[str, int]:
    from weights.tiny import write_detector as small_random

    small_random(folder, name)
    return {}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def write(root: Path, force: bool = False, device: str | None = None, size: str = "full",
          image: str = CONDITION) -> dict[str, int]:
    """The components of `image` (canny, or multi: canny's first, the other ControlNets link to it)."""
    if Path(root).resolve() == weights.HERE:
        # Random weights with real markers there would be served as the real model.
        raise SystemExit(f"refusing to write random bench weights into {weights.HERE}; pick another --root")
    device = device or default_device()
    counts: dict[str, int] = {}
    own = weights.components(CONDITION)
    # role kind -> component name, canny's first; a component shared by two conditions (midas) once.
    # Another ControlNet version's role (controlnet@1.1) is of its default role's kind.
    wanted = {name: role.partition(weights.VERSION_MARK)[0].rpartition(".")[2]
              for role, name in {**own, **weights.components(image)}.items()}
    for name, kind in wanted.items():
        folder = root / name
        info = weights.marker(folder) or {}
        if weights.is_complete(folder, name, tiny=False) and info.get("size", "full") == size and not force:
            counts.update(info.get("params", {}))
            continue
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        extra: dict = {}
        if kind == "detector":
            written = write_detector(folder, name)
            extra = {"stand_in": "the small random detector of the tests: the bench sends maps, never runs it"}
        elif kind == "controlnet" and name != own["controlnet"]:
            written = link_controlnet(folder, root / own["controlnet"])
            extra = {"linked_from": own["controlnet"]}
        else:
            # Parameters are created (and randomly initialised) on `device`.
            with torch.device(device):
                written = {"base": write_base, "controlnet": write_controlnet}[kind](folder, size)
        counts.update(written)
        # The real marker (so CONTROLNET_WEIGHTS=real finds it) plus `bench` so nobody mistakes it.
        weights.write_marker(folder, revision=weights.revision(name), component=name,
                             bench=True, size=size, params=written, **extra)
        made = f"{sum(written.values()) / 1e6:.1f} M params made on {device}"
        if extra:
            made = "small random detector" if kind == "detector" else f"linked to {extra['linked_from']}"
        print(f"bench {name} ({size}): {made}, written to {folder} in {time.perf_counter() - start:.1f}s", flush=True)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--device", default=None, help="where the models are built (default: cuda if there is one)")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--image", choices=(CONDITION, "multi"), default=CONDITION,
                        help="multi: also the multi image's ControlNets (linked to canny's) and detectors")
    args = parser.parse_args(argv)
    write(args.root, args.force, args.device, args.size, args.image)


if __name__ == "__main__":
    main()
