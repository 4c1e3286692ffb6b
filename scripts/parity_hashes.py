"""`python -m scripts.parity_hashes`: the reference hashes that pin today's outputs, bit for bit.

Every condition's image (tiny random weights, CPU) is run through its plain `generate()` on a fixed
drawing with a few input sets, and the sha256 of each returned image's pixels is written to
tests/fixtures/parity_hashes.json. tests/test_parity.py recomputes them with the code of the day: a
refactor of the request path must leave every one unchanged.

The fixture records the commit whose code made it. Float results depend on the CPU's kernels and
torch's version, so on another platform regenerate it from that commit (`git worktree add /tmp/ref
<commit>` and run this module there with --out), never from the code under test. Everything runs
on one CPU thread (see one_thread()).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CONTROLNET_WEIGHTS", "tiny")

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "parity_hashes.json"
CONDITIONS = ("canny", "depth", "hed", "hough", "normal", "pose", "scribble", "seg", "custom")
FAST = dict(prompt="a cozy house", image_resolution="256", ddim_steps=2, seed=11)
# Input sets beyond the defaults, for every condition; each leaves the others at their defaults.
CASES = {
    "guess_mode": dict(guess_mode=True, scale=4.0),
    "window": dict(control_guidance_start=0.0, control_guidance_end=0.5),  # the ControlNet acts in step 1 of 2
    "strength": dict(controlnet_conditioning_scale=0.6),
}
# Paths that do not depend on the condition, run on the first condition only (the suite's time is shared).
SHARED_CASES = {
    "four_samples_eta": dict(num_samples="4", eta=0.5),
    "cfg_scale_one": dict(scale=1.0),
    "scheduler": dict(scheduler="UniPC"),
    "exact_size": dict(width=300, height=260),
    "no_map": dict(return_control_map=False),
    "preprocess_only": dict(preprocess_only=True),
}
# A non-default value for each detector option a condition takes.
OPTIONS = dict(low_threshold=50, high_threshold=150, detect_resolution=384, value_threshold=0.3,
               distance_threshold=2.0, bg_threshold=0.4)


def drawing(width: int = 400, height: int = 300) -> Image.Image:
    """Noise with strong edges (conftest's test drawing, kept here so the fixture never moves with it)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(90, 110, size=(height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([width // 8, height // 6, width // 2, height // 2], fill=(230, 40, 40))
    draw.ellipse([width // 2, height // 2, width - 20, height - 10], fill=(20, 20, 200))
    draw.line([0, height - 1, width - 1, 0], fill=(250, 250, 250), width=5)
    return img


def pixel_hash(path) -> str:
    pixels = np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB")))
    return hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()


def run(predictor, **inputs) -> list[str] | dict:
    try:
        return [pixel_hash(p) for p in predictor.generate(**inputs)]
    except ValueError as exc:  # a refused input set is part of the behaviour too
        return {"error": str(exc)}


def condition_hashes(condition: str, folder: Path) -> dict:
    from tests.conftest import predictor_class

    predictor = predictor_class(condition)()
    predictor.setup()
    image = folder / "input.png"
    drawing().save(image)
    files = predictor.generate(image=image, **FAST)
    out = {"defaults": [pixel_hash(p) for p in files]}
    # The map the defaults returned, sent back as the image with control_image_is_map.
    control = folder / "map.png"
    shutil.copy(files[0], control)
    out["is_map"] = run(predictor, image=control, control_image_is_map=True, **FAST)
    cases = {**CASES, **(SHARED_CASES if condition == CONDITIONS[0] else {})}
    out.update({name: run(predictor, image=image, **FAST, **case) for name, case in cases.items()})
    options = {k: v for k, v in OPTIONS.items() if k in predictor.extra_inputs}
    if options:
        out["options"] = run(predictor, image=image, **FAST, **options)
    return out


@contextlib.contextmanager
def one_thread():
    """torch's CPU kernels split their sums by thread count, and the last bits of the samples with them:
    one thread makes the hashes the same on any number of cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compute(conditions=CONDITIONS) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="parity-"))
    try:
        with one_thread():
            return {c: condition_hashes(c, folder) for c in conditions}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def platform_info() -> dict:
    import torch

    return {"torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "cog_base", "models", "predictors", "weights"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    fixture = {
        "_comment": f"made by `python -m scripts.parity_hashes` on the code of commit {commit}, one CPU thread"
                    + (" (with uncommitted changes!)" if dirty else "")
                    + "; sha256 of each output's RGB pixels (shape + bytes), in output order",
        "commit": commit,
        "platform": platform_info(),
        "inputs": {"fast": FAST, "cases": CASES, "shared_cases": SHARED_CASES, "options": OPTIONS},
        "hashes": compute(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
