"""`python -m scripts.parity_hashes`: the reference hashes that pin today's outputs, bit for bit.

Every condition's image (tiny random weights, CPU) is run through its plain `generate()` on a fixed
drawing with a few input sets, and the sha256 of each returned image's pixels is written to
tests/fixtures/parity_hashes.json. tests/test_parity.py recomputes them with the code of the day: a
refactor of the request path must leave every one unchanged.

The fixture records the commit whose code made it. Float results depend on the CPU's kernels and
torch's version, so the hashes hold only where they were made. On any other CPU the reference is that
commit's code run on this machine (`expected()`): the commit's tree is exported beside the clone,
gets its own tiny weights and runs this script; the result is cached per CPU and torch version
(~/.cache/controlnet-cog/parity/), and `--add-reference` commits it into the fixture for a CPU the
team's machines have. Never regenerate the reference from the code under test. Everything runs on one
CPU thread (see one_thread()).
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
import sys
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


def cpu_info() -> str:
    """What picks torch's CPU kernels, and with them the last bits of a float result: the vendor, the
    model and the widest vector unit torch dispatches to (its own answer, so a CPU whose flags differ
    in what torch ignores keeps one reference)."""
    import torch

    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    vendor = fields.get("vendor_id") or platform.processor() or platform.machine()
    model = fields.get("model name") or platform.machine()
    return f"{vendor} {model} {torch.backends.cpu.get_cpu_capability()}"


def platform_info() -> dict:
    import torch

    return {"torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version(),
            "cpu": cpu_info()}


def platform_key(info: dict) -> str:
    """The platform a reference holds for (no "cpu" in it: the machine that made the fixture was not recorded,
    so that reference holds for no machine but its own, and every other one builds its own)."""
    return f"{info.get('cpu', 'unrecorded CPU')} | torch {info['torch']}"


def _fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def expected(fixture: dict | None = None, cache: Path | None = None) -> tuple[dict, str]:
    """The hashes this machine must reproduce, and where they come from: the fixture's own when it was
    made on this platform, a reference the fixture carries for this platform, a cached one, or else the
    fixture's commit run here now (minutes, once per CPU and torch version)."""
    fixture = fixture or _fixture()
    here = platform_key(platform_info())
    if platform_key(fixture["platform"]) == here:
        return fixture["hashes"], f"the fixture (made on {here})"
    committed = fixture.get("references", {}).get(here)
    if committed is not None and committed["inputs"] == fixture["inputs"]:
        return committed["hashes"], f"the fixture's reference for {here}"
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "controlnet-cog" / "parity"
    slug = hashlib.sha256(here.encode()).hexdigest()[:16]
    cached = cache / f"{fixture['commit'][:12]}-{slug}.json"
    if cached.is_file():
        made = json.loads(cached.read_text())
        if made.get("inputs") == fixture["inputs"] and platform_key(made["platform"]) == here:
            return made["hashes"], f"commit {fixture['commit'][:10]} run on this machine (cached in {cached})"
    made = build_reference(fixture["commit"], cached)
    if platform_key(made["platform"]) != here:
        raise RuntimeError(f"the reference was made on {platform_key(made['platform'])}, not on {here}")
    if made["inputs"] != fixture["inputs"]:
        raise RuntimeError("the reference was made from other input sets than the fixture's")
    return made["hashes"], f"commit {fixture['commit'][:10]} run on this machine now (cached in {cached})"


def build_reference(commit: str, out: Path) -> dict:
    """Runs `commit`'s code on this machine: its tree exported (git archive: the clone's own work tree and
    git state untouched), its own tiny weights written there by its own generator, then this script,
    which that commit predates. Writes the result to `out` and returns it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="parity-reference-") as tmp:
        tree = Path(tmp)
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True)
        if archive.returncode != 0:
            raise RuntimeError(
                f"the parity reference for this CPU needs commit {commit} of this repository's history "
                f"(a full clone): git archive said {archive.stderr.decode(errors='replace').strip()}"
            )
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        shutil.copy(Path(__file__), tree / "scripts" / "parity_hashes.py")
        env = {**os.environ, "CONTROLNET_WEIGHTS_DIR": str(tree / "weights"), "CONTROLNET_WEIGHTS": "tiny",
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
        partial = out.with_suffix(".partial")
        for step in (["-m", "weights.tiny"], ["-m", "scripts.parity_hashes", "--out", str(partial), "--commit", commit]):
            done = subprocess.run([sys.executable, *step], cwd=tree, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"commit {commit[:10]}'s `python {' '.join(step)}` failed:\n{done.stderr[-4000:]}")
        partial.replace(out)
    return json.loads(out.read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FIXTURE)
    parser.add_argument("--commit", help="the commit this tree is (for a tree without git: an exported one)")
    parser.add_argument("--add-reference", action="store_true",
                        help="run the fixture's commit on this machine and add its hashes to the fixture as the "
                             "reference for this CPU (for a CPU the team's machines have; others build theirs)")
    args = parser.parse_args(argv)
    if args.add_reference:
        return add_reference()
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
    dirty = not args.commit and subprocess.run(
        ["git", "status", "--porcelain", "--", "cog_base", "models", "predictors", "weights"],
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


def add_reference() -> None:
    fixture = _fixture()
    with tempfile.TemporaryDirectory() as tmp:
        made = build_reference(fixture["commit"], Path(tmp) / "reference.json")
    here = platform_key(made["platform"])
    fixture.setdefault("references", {})[here] = {
        "_comment": f"commit {fixture['commit'][:10]}'s code run on {here} (python -m scripts.parity_hashes --add-reference)",
        "platform": made["platform"], "inputs": made["inputs"], "hashes": made["hashes"],
    }
    FIXTURE.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"added the reference for {here} to {FIXTURE}")


if __name__ == "__main__":
    main()
