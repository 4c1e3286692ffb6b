"""`python -m scripts.sizes`: the README's table of weight, image and GPU-memory sizes, from weights/manifest.json.

The one source of these figures: each component's `size_mb` in the manifest, the components each image
carries (`weights.components`), and the measured size of an image without weights. `--check` exits 1
when the README's table is not what this writes (the suite runs it). Stdlib only.
"""

from __future__ import annotations

import argparse
import sys

import weights
from scripts.cog_config import ROOT

README = ROOT / "README.md"
BEGIN = "<!-- sizes: written by `python -m scripts.sizes` from weights/manifest.json; edit those, not this table -->"
END = "<!-- end of sizes -->"
# Measured: `make image-test` images with tiny weights were 5.93-5.99 GB (2026-11/12, docs/images.md), all but
# ~0.01 GB of it the base image, torch and its CUDA wheels and the code.
PACKAGES_GB = 5.92
# The multi image keeps at most this many ControlNets loaded (CONTROLNET_MAX_LOADED's default).
MAX_LOADED = 3


def size_gb(name: str) -> float:
    return weights.MANIFEST["components"][name]["size_mb"] / 1000


def gpu_gb(name: str, role: str) -> float:
    """What a component takes in GPU memory: the pipeline casts every ControlNet to fp16 on CUDA, so one
    stored in fp32 (the 1.0 downloads, tile's .bin, custom's untrained one) takes half its size; the base
    is stored in fp16 and the detectors are counted as stored."""
    spec = weights.MANIFEST["components"][name]
    if spec.get("dtype") == "bf16":  # served as stored (the Z-Image models)
        return size_gb(name)
    fp32 = "from_unet" in spec or not any("fp16" in f for f in spec["files"])
    is_controlnet = role.partition(weights.VERSION_MARK)[0].endswith("controlnet")
    return size_gb(name) / 2 if is_controlnet and fp32 else size_gb(name)


def weights_gb(image: str) -> str:
    """What `make weights COND=image` downloads, in GB (the quickstart's hint says it)."""
    return row(image)[1]


def row(image: str) -> tuple[str, str, str, str]:
    roles = weights.components(image)
    names = dict.fromkeys(roles.values())  # one file set per component: MiDaS serves depth and normal
    total = sum(size_gb(n) for n in names)
    base = gpu_gb(roles["base"], "base")
    if image in weights.COMBINED:
        nets = sorted((gpu_gb(n, r) for r, n in roles.items() if r.endswith("controlnet")), reverse=True)[:MAX_LOADED]
        # at most MAX_LOADED ControlNets at once (the largest counted); a detector loads when first used
        detectors = {n: gpu_gb(n, r) for r, n in roles.items() if r.endswith("detector")}
        gpu = f"{base + sum(nets):.2f} + the detectors used (all: {sum(detectors.values()):.2f})"
    else:
        default = base + sum(gpu_gb(n, r) for r, n in roles.items() if r != "base" and not weights.version_of(r))
        gpu = f"{default:.2f}"
        newer = {r: n for r, n in roles.items() if weights.version_of(r)}
        if newer:
            gpu += f"; {default + sum(gpu_gb(n, r) for r, n in newer.items()):.2f} once a 1.1 request came"
    return image, f"{total:.2f}", f"{PACKAGES_GB + total:.1f}", gpu


def table() -> str:
    lines = [
        BEGIN,
        "| image | weights (GB) | image (GB, est.) | GPU memory for the weights (GB, est.) |",
        "|---|---|---|---|",
        *(f"| {' | '.join(row(image))} |" for image in weights.IMAGES),
        END,
    ]
    return "\n".join(lines)


def render(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + table() + text[end:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's table is not what this writes")
    args = parser.parse_args(argv)
    text = README.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{README.name}: no table markers ({BEGIN} ... {END})")
    new = render(text)
    if args.check:
        if new != text:
            sys.exit(f"{README.name}'s table of sizes is stale: run `python -m scripts.sizes`")
        return
    README.write_text(new)


if __name__ == "__main__":
    main()
