"""What the benchmark's entry points share (bench/run.py, bench/startup.py, bench/overhead.py): the
workload's constants, the arguments, the statistics and the weights' preparation. It imports none of
them, so they import it and not each other."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a cozy cottage with a red roof, photorealistic, golden hour"
SEED = 12345


def parse(argv, description: str | None = None):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 30, 50], help="first one is the headline")
    p.add_argument("--runs", type=int, default=20, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=3, help="warm-up runs (10 are used when compiled)")
    p.add_argument("--resolution", type=int, default=512, choices=(256, 512, 768))
    p.add_argument("--fast", default="all", help="models/fast.py options to time against the plain path ('' = skip)")
    p.add_argument("--lossy", type=int, nargs="*", default=[10, 15], help="fewer-step variants for the lossy table")
    p.add_argument("--skip", nargs="*", default=[], choices=("baseline", "server", "samples4", "fast", "lossy", "units", "startup", "overhead"))
    p.add_argument("--weights-root", type=Path, default=None, help="full size: where bench/weights.py writes")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    return p.parse_args(argv)


def stats(ms: list[float]) -> dict:
    import numpy as np

    a = np.asarray(ms, dtype=float)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)), "min_ms": float(a.min()), "runs": len(a)}


def prepare_weights(args) -> dict:
    """The weights of --size written where needed; the environment that makes the loader find them (set here too)."""
    if args.size == "full":
        from bench import weights as bench_weights

        root = (args.weights_root or bench_weights.DEFAULT_ROOT).resolve()
        bench_weights.write(root)
        env = {"CONTROLNET_WEIGHTS_DIR": str(root), "CONTROLNET_WEIGHTS": "real"}
    else:
        import weights.tiny

        weights.tiny.main([])
        env = {"CONTROLNET_WEIGHTS": "tiny"}
    os.environ.update(env)
    return env
