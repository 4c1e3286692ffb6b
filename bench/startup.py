"""Start-up and the per-request work outside the forward passes, each beside its floor (issue 18).

Called by bench/run.py after its other phases (`--skip startup` leaves it out); `python -m bench.startup`
with bench/run.py's options runs it alone (`--size full` on CPU: the rest of the harness takes hours there).

- imports: what setup() imports (the predictor module, then models.pipeline, fast, assets, style and the
  detector's module) in a fresh interpreter under `python -X importtime`: wall time, and the packages
  whose import took longest (cumulative, as importtime reports them).
- weights: models.pipeline.load_pipeline() against the floor measured in the same process, alternated:
  every .safetensors file of the base and the ControlNet read (safetensors' own reader) and each tensor
  cast to the served dtype (fp16 on CUDA, fp32 on CPU), each cast tensor dropped at once (a lower
  bound: the allocator reuses the same memory) and, the floor a load can reach, kept until the last
  file is read. Medians; the page cache is warm after the first.
- time to READY through the real Cog server: bench/run.py's server phase when it ran, else a server of
  its own started and stopped here.
- per request, outside the forward passes: a request's wall time less the time spent inside the text
  encoder, UNet, ControlNet and VAE decoder forwards (hooks around each), at the `steps` of the headline
  and a small sample (128x128: the overhead does not depend on it; the forwards would drown it), for
  plain diffusers (the pipeline called with the prompts and the map), for our runner with the fast path
  off, and with its exact options (the default). The same loaded models serve all three, in that order
  (the exact options patch them). The ControlNet's control-image embeddings per request are counted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZE = 128  # sample side for the per-request phase
SETUP_IMPORTS = """
import time
start = time.perf_counter()
import importlib, predictors.canny.predict as p
from models import fast
from models.assets import AssetCache
from models.pipeline import load_pipeline
from models.style import StyleAssets
p.Predictor.detector_class()
print("IMPORTS_S", time.perf_counter() - start)
"""


def imports(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", SETUP_IMPORTS], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, **env}, check=True)
    wall = float(re.search(r"IMPORTS_S (\S+)", out.stdout).group(1))
    rows, loaded = [], set()
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        loaded.add(m.group(4).split(".")[0])
        if len(m.group(3)) <= 3:  # a package the script or a first-level import pulled in
            rows.append((int(m.group(2)) / 1e3, m.group(4)))
    top = sorted(rows, reverse=True)[:8]
    return {"wall_ms": wall * 1e3, "top_level_ms": {name: ms for ms, name in top},
            "not_imported": [name for name in ("controlnet_aux", "timm", "skimage", "mediapipe") if name not in loaded]}


def floor(folders: list[Path], dtype, keep: bool = False) -> float:
    """Read every weight file and cast each tensor to `dtype`: what loading cannot do without. With
    `keep`, the cast tensors are held until every file is read, as a load holds them: on CPU (fp16
    files cast to fp32) that is 5.4 GB of fresh memory to fault in, which the dropping floor reuses
    from the allocator instead (its figure is a lower bound no load can reach)."""
    from safetensors.torch import load_file

    start = time.perf_counter()
    kept = []
    for file in sorted(f for folder in folders for f in folder.rglob("*.safetensors")):
        for tensor in load_file(str(file)).values():
            cast = tensor.to(dtype)
            if keep:
                kept.append(cast)
    took = (time.perf_counter() - start) * 1e3
    del kept
    return took


def weights_vs_floor(ws, device: str, runs: int) -> dict:
    import gc

    from bench.common import stats
    from models.pipeline import _dtype, load_pipeline

    floors, kept, loads = [], [], []
    for _ in range(runs):  # alternated, so that a change of the machine's speed moves all three
        floors.append(floor([ws.base, ws.controlnet], _dtype(device)))
        gc.collect()
        kept.append(floor([ws.base, ws.controlnet], _dtype(device), keep=True))
        gc.collect()
        start = time.perf_counter()
        pipe = load_pipeline(ws.base, ws.controlnet, device=device)
        loads.append((time.perf_counter() - start) * 1e3)
        del pipe
        gc.collect()
    f, k, w = stats(floors), stats(kept), stats(loads)
    return {"floor": f, "floor_kept": k, "load_pipeline": w, "ratio": w["median_ms"] / f["median_ms"],
            "ratio_kept": w["median_ms"] / k["median_ms"],
            "pair_ratio_kept": stats([a / b for a, b in zip(loads, kept)])["median_ms"]}


class ForwardClock:
    """Time spent inside the top-level forwards of `modules` (nested calls counted once)."""

    def __init__(self, modules):
        self.inside, self.depth, self.handles = 0.0, 0, []
        for module in modules:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, *_):
        if self.depth == 0:
            self.start = time.perf_counter()
        self.depth += 1

    def _leave(self, *_):
        self.depth -= 1
        if self.depth == 0:
            self.inside += time.perf_counter() - self.start

    def outside_ms(self, fn) -> float:
        self.inside = 0.0
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start - self.inside) * 1e3

    def remove(self):
        for handle in self.handles:
            handle.remove()


def per_request(ws, device: str, steps: int, runs: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from bench.common import PROMPT, SEED, stats
    from cog_base import A_PROMPT, N_PROMPT
    from models import fast
    from models.pipeline import ControlNetRunner, Request, load_pipeline

    pipe = load_pipeline(ws.base, ws.controlnet, device=device)
    runner = ControlNetRunner(pipe, lambda rgb, **_: rgb, detect_at_resolution=False, log=lambda _: None)
    control = np.zeros((SIZE, SIZE, 3), np.uint8)
    control[SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4] = 255
    prompt = f"{PROMPT}, {A_PROMPT}"
    request = Request(prompt=prompt, negative_prompt=N_PROMPT, steps=steps, seed=SEED)
    embedding = pipe.controlnet.controlnet_cond_embedding
    embeddings = []
    counter = embedding.register_forward_hook(lambda *_: embeddings.append(1))

    def plain():
        pipe(prompt=prompt, negative_prompt=N_PROMPT, image=Image.fromarray(control), height=SIZE, width=SIZE,
             num_inference_steps=steps, guidance_scale=9.0, generator=torch.Generator("cpu").manual_seed(SEED))

    def ours():
        runner.generate(control, request)

    clock = ForwardClock([pipe.text_encoder, pipe.unet, pipe.controlnet, pipe.vae.decoder, pipe.vae.post_quant_conv])
    out = {"steps": steps, "sample": f"{SIZE}x{SIZE}"}
    with torch.inference_mode():
        for name, fn in (("plain diffusers", plain), ("ours, fast path off", ours), ("ours, exact options", ours)):
            if name == "ours, exact options":
                fast.apply(pipe, fast.EXACT, log=lambda _: None)
            fn()  # warm-up (and the negative cache's first fill)
            # With cond_once the hook still fires at every step (the cached forward returns at once):
            # its own count of computations then.
            embeddings.clear()
            before = getattr(embedding, "computed", None)
            fn()
            count = len(embeddings) if before is None else embedding.computed - before
            out[name] = {**stats([clock.outside_ms(fn) for _ in range(runs)]), "control_embeddings_per_request": count}
            print(f"startup: outside the forwards, {name}: {out[name]}", flush=True)
    counter.remove()
    clock.remove()
    return out


def ready(args, results: dict, env: dict) -> float:
    if "server_cold_start_ms" in results:
        return results["server_cold_start_ms"]
    from scripts.cog_server import CogServer

    server = CogServer("canny", log_path=(args.out / "startup-server.log"), env=env)
    start = time.perf_counter()
    try:
        server.start(timeout=900)
        return (time.perf_counter() - start) * 1e3
    finally:
        server.stop()


def measure(args, results: dict, env: dict) -> None:
    """The phase: results["startup"]."""
    import torch

    import weights

    if "startup" in args.skip:
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ws = weights.locate("canny")
    runs = max(1, min(args.runs, 5))
    started = time.perf_counter()
    r = results["startup"] = {"load": os.getloadavg()}
    r["imports"] = imports(env)
    print(f"startup: imports {r['imports']}", flush=True)
    r["weights"] = weights_vs_floor(ws, device, runs)
    print(f"startup: weights {r['weights']}", flush=True)
    r["per_request"] = per_request(ws, device, args.steps[0], runs)
    server_env = {**env, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")} if device == "cpu" else env
    r["ready_ms"] = ready(args, results, server_env)
    r["load_after"] = os.getloadavg()
    r["took_s"] = time.perf_counter() - started


def markdown(r: dict) -> list[str]:
    s = r.get("startup")
    if not s:
        return []
    w, p = s["weights"], s["per_request"]
    lines = ["", f"## Start-up and per-request work (load {s['load'][0]:.1f} before, {s['load_after'][0]:.1f} after)", "",
             "| what | measured | floor, same run |", "|---|---|---|",
             f"| setup's imports, fresh interpreter | {s['imports']['wall_ms'] / 1e3:.2f} s | - |",
             f"| weights: load_pipeline() | {w['load_pipeline']['median_ms'] / 1e3:.2f} s ({w['ratio_kept']:.2f}x the tensors-kept "
             f"floor, {w['pair_ratio_kept']:.2f}x pair by pair; {w['ratio']:.2f}x the dropping one) "
             f"| read + cast, tensors kept: {w['floor_kept']['median_ms'] / 1e3:.2f} s; each dropped after its cast: "
             f"{w['floor']['median_ms'] / 1e3:.2f} s |",
             f"| time to READY, real Cog server | {s['ready_ms'] / 1e3:.1f} s | weights floor {w['floor']['median_ms'] / 1e3:.2f} s |"]
    plain = p["plain diffusers"]["median_ms"]
    for name in ("ours, fast path off", "ours, exact options"):
        lines.append(f"| per request outside the forwards ({p['steps']} steps, {p['sample']}), {name} "
                     f"| {p[name]['median_ms']:.1f} ms; control embeddings {p[name]['control_embeddings_per_request']} "
                     f"| plain diffusers: {plain:.1f} ms; control embeddings "
                     f"{p['plain diffusers']['control_embeddings_per_request']} |")
    top = ", ".join(f"{name} {ms / 1e3:.2f} s" for name, ms in s["imports"]["top_level_ms"].items())
    lines += ["", f"Imports, cumulative per top-level package: {top}; not imported: "
              f"{', '.join(s['imports']['not_imported']) or '-'}."]
    return lines


def check(r: dict) -> list[str]:
    if "startup" in r["args"]["skip"]:
        return []
    s = r.get("startup", {})
    problems = [] if s.get("weights", {}).get("floor", {}).get("median_ms", 0) > 0 else ["no weights-vs-floor timing"]
    problems += [] if s.get("ready_ms", 0) > 0 else ["no time to READY"]
    p = s.get("per_request", {})
    if p.get("ours, exact options", {}).get("control_embeddings_per_request") != 1:
        problems.append(f"the exact options did not embed the control image once per request: {p}")
    return problems


def main(argv=None) -> int:
    import json

    from bench import common

    args = common.parse(argv)
    args.skip = [name for name in args.skip if name != "startup"]
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = common.prepare_weights(args)
    args.out = args.out or ROOT / "build" / "bench" / f"startup-{args.size}"
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    measure(args, results, env)
    (args.out / "startup.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(markdown(results)))
    problems = check(results)
    for problem in problems:
        print(f"INCOMPLETE: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
