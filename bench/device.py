"""What bench/device.sh runs on the lent GPU machine: every benchmark figure, in priority order, in a budget.

Phases, in the order of what matters most if the run is cut short (docs/benchmarks.md, issue 17):
  baseline  plain diffusers fp16 eager (the reference every ratio is taken against)
  served    our served path, plain: setup, first prediction, 20/30/50 steps, stages, peak memory
  eager     the plain path (CONTROLNET_FAST=off), then each opt-in eager option on top of the served
            default (the exact options), then both, through setup() (CONTROLNET_FAST)
  server    the real Cog server: launch to READY, first prediction, HTTP overhead
  samples4  num_samples 4: images/s and peak GPU memory
  units     the multi image with 1, 2 and 3 ControlNet units (canny, depth, seg; maps sent as maps, so no
            detector runs): median per row and the cost of each added unit
  zimage    the zimage image's model (Z-Image-Turbo + Fun ControlNet Union 2.1, bf16): 8 steps at 1024x1024 with
            and without the ControlNet, batch 1 and 4, peak GPU memory (bench/zimage.py)
  compile   torch.compile (mode "default") at the served shape, compile time reported
`--heavy` (a second, separate call) instead runs a short reference (baseline and plain served at the
headline steps, for the ratios and the exactness check) and the compile-heavy modes: max-autotune
without CUDA graphs, then max-autotune (CUDA graphs).

A phase starts only if its estimated cost fits in what is left of the budget (else it is listed as
skipped, with why); a phase that fails is reported and the next one runs. After every phase the
results so far are rewritten: OUT/results.json and OUT/benchmarks.md (docs/benchmarks.md's tables,
ready to paste), so that a run killed at its limit still returns what it did. `--size tiny --device
cpu` is the same code on tiny models with few steps (`make gpu-rehearsal`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

from bench import run as bench

# The multi image's units, in order (the units phase times the first 1, 2, 3). Each is sent its map
# (controlnet_N_image_is_map), so the rows time ControlNets, not detectors: canny's map is cheap to make
# here (OpenCV), depth's is any grey image, seg's flat areas of palette colours.
UNITS = ("canny", "depth", "seg")
# "off": the plain path, against the served default (models/fast.py EXACT); the rest add opt-in options to it.
EAGER = ("off", "vae_guard", "channels_last", "vae_guard,channels_last")
# (options, torch.compile mode): the first run's compile; --heavy's.
COMPILE = (("all", "default"),)
# reduce-overhead: CUDA graphs at about default's compile time; max-autotune adds autotuning to them (the
# models/fast.py default on CUDA); the last one autotunes without graphs.
HEAVY = (("all", "reduce-overhead"), ("all", "max-autotune"), ("all", "max-autotune-no-cudagraphs"))

# Per size: steps (the first is the headline), timed runs at the headline / at the other step counts,
# warm-ups, runs per stage, resolution; and each phase's expected cost in seconds on an H200 (full)
# or 2 CPU cores (tiny), which decides whether it still fits the budget. The H200 costs are estimates
# (no GPU has run this yet): replace them with the took_s of each phase in the first run's results.json.
PROFILES = {
    "full": dict(steps=[20, 30, 50], runs=20, fit_runs=5, warmup=3, stage_runs=10, resolution=512, backend="inductor",
                 cost=dict(baseline=45, served=75, eager=15, server=75, samples4=20, units=45, compile=150, reference=20,
                           heavy=330, zimage=150)),
    # tiny compiles with aot_eager: Dynamo's and AOTAutograd's graph capture on this torch, without
    # Inductor's C++ builds (over 7 minutes on 2 busy cores); the GPU's Triton kernels are not rehearsed.
    "tiny": dict(steps=[2, 1], runs=1, fit_runs=1, warmup=0, stage_runs=1, resolution=256, backend="aot_eager",
                 cost=dict(baseline=10, served=15, eager=5, server=40, samples4=5, units=30, compile=60, reference=10,
                           heavy=120, zimage=30)),
}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(PROFILES), default="full")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--heavy", action="store_true", help="the compile-heavy modes instead (a second call)")
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds by which to be done")
    p.add_argument("--budget", type=float, default=480, help="seconds from now, when --deadline is not given")
    p.add_argument("--weights-root", type=Path, default=None)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (input image, server log, caches)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--command", default=None, help="the command line to print in the results")
    return p.parse_args(argv)


class Run:
    def __init__(self, args):
        import torch

        self.args, self.torch = args, torch
        self.profile = SimpleNamespace(**PROFILES[args.size])
        self.cuda = torch.cuda.is_available()
        self.clock = bench.Clock(self.cuda)
        self.deadline = args.deadline or time.time() + args.budget
        self.started = time.time()
        self.head = self.profile.steps[0]
        self.results = {"invocation": "heavy" if args.heavy else "main", "command": args.command,
                        "size": args.size, "budget_s": args.budget, "phases": {}}
        self.reference = None  # the plain served samples for the seed, which every variant must match

    # --- bookkeeping ---------------------------------------------------------------------------------

    def phase(self, name: str, cost_key: str, fn, *fn_args) -> None:
        left = self.deadline - time.time()
        cost = self.profile.cost[cost_key]
        record = self.results["phases"].setdefault(name, {})
        if left < cost:
            record.update(status="skipped", why=f"{left:.0f} s left of the budget, needs about {cost} s")
            print(f"== {name}: skipped ({record['why']})", flush=True)
            self.save()
            return
        record.update(status="running")
        self.save()
        print(f"== {name}: starting ({left:.0f} s left, expected about {cost} s)", flush=True)
        start = time.time()
        try:
            fn(record, *fn_args)
            record["status"] = "done"
        except Exception as exc:  # one broken phase must not lose the others' figures
            traceback.print_exc()
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        record["took_s"] = round(time.time() - start, 1)
        print(f"== {name}: {record['status']} in {record['took_s']} s", flush=True)
        self.free()
        self.save()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def save(self) -> None:
        # From the script's start when device.sh gave a deadline (its install and records included).
        self.results["elapsed_s"] = round(time.time() - (self.deadline - self.args.budget), 1)
        for name, text in (("results.json", json.dumps(self.results, indent=1) + "\n"),
                           ("benchmarks.md", markdown(self.results))):
            tmp = self.args.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.args.out / name)  # whole files only, even if the run is killed mid-write

    # --- helpers -------------------------------------------------------------------------------------

    def kwargs(self, steps: int, samples: int = 1) -> dict:
        return dict(image=self.image, prompt=bench.PROMPT, image_resolution=self.profile.resolution, scale=9.0,
                    seed=bench.SEED, eta=0.0, low_threshold=100, high_threshold=200, ddim_steps=steps,
                    num_samples=samples)

    def predictor(self, record: dict, fast: str = "", image: str = "canny", **env):
        """A fresh Predictor of `image` set up as the server would, with CONTROLNET_FAST=fast (and env)."""
        import importlib

        Predictor = importlib.import_module(f"predictors.{image}.predict").Predictor
        settings = {"CONTROLNET_FAST": fast, **env}
        saved = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        try:  # setup() reads them; later phases must not inherit them
            predictor = Predictor()
            _, record["setup_ms"] = self.clock.wall(predictor.setup)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        return predictor

    def timed(self, call, steps: list[int], runs: int | None = None, warmup: int | None = None) -> dict:
        """Median/p90/min of call(n) at each step count (the headline with more runs), peak GPU memory."""
        p, out = self.profile, {}
        for i, n in enumerate(steps):
            if self.cuda:
                self.torch.cuda.reset_peak_memory_stats()
            out[f"steps_{n}"] = bench.repeat(lambda: call(n), self.clock.wall,
                                             (warmup if warmup is not None else p.warmup) if i == 0 else min(1, p.warmup),
                                             (runs or p.runs) if i == 0 else p.fit_runs)
            if self.cuda:
                out[f"steps_{n}"]["peak_gpu_mib"] = self.torch.cuda.max_memory_allocated() / 2**20
            print(f"  {n} steps: {out[f'steps_{n}']}", flush=True)
        if len(steps) > 1:
            out["fit"] = bench.fit({n: out[f"steps_{n}"]["median_ms"] for n in steps})
        return out

    def match(self, predictor) -> dict:
        import numpy as np

        if self.reference is None:
            return {"ok": None, "why": "no plain reference in this run"}
        diff = np.abs(bench.samples_of(predictor.generate(**self.kwargs(self.head))) - self.reference)
        return {"max_abs": int(diff.max()), "mean_abs": float(diff.mean()),
                "ok": bool(diff.max() <= bench.MATCH_MAX and diff.mean() <= bench.MATCH_MEAN)}

    # --- phases --------------------------------------------------------------------------------------

    def baseline(self, record: dict, steps: list[int] | None = None) -> None:
        pipe, record["load_ms"] = self.clock.wall(bench.load_baseline, self.cuda, self.ws.base, self.ws.controlnet)
        call = bench.baseline_call(pipe, self.image, self.profile.resolution)
        record.update(self.timed(call, steps or self.profile.steps))

    def served(self, record: dict) -> None:
        from models.image import load_rgb

        predictor = self.predictor(record)
        _, record["first_prediction_ms"] = self.clock.wall(predictor.generate, **self.kwargs(self.head))
        record["dtype"] = str(predictor.runner.pipe.unet.dtype)
        record.update(self.timed(lambda n: predictor.generate(**self.kwargs(n)), self.profile.steps))
        self.reference = bench.samples_of(predictor.generate(**self.kwargs(self.head)))
        stage_args = SimpleNamespace(warmup=self.profile.warmup, runs=self.profile.stage_runs,
                                     resolution=self.profile.resolution)
        record["stages"] = bench.stages(stage_args, self.clock, predictor.runner.pipe, predictor.runner,
                                        load_rgb(self.image), self.head)

    def reference_served(self, record: dict) -> None:
        """--heavy: the plain served path at the headline only, for the ratios and the reference samples."""
        predictor = self.predictor(record)
        record.update(self.timed(lambda n: predictor.generate(**self.kwargs(n)), [self.head]))
        self.reference = bench.samples_of(predictor.generate(**self.kwargs(self.head)))

    def eager(self, record: dict, options: str) -> None:
        predictor = self.predictor(record, options)
        record.update(self.timed(lambda n: predictor.generate(**self.kwargs(n)), [self.head]))
        record["match"] = self.match(predictor)

    def server(self, record: dict) -> None:
        server_args = SimpleNamespace(steps=[self.head], warmup=self.profile.warmup, runs=self.profile.runs,
                                      resolution=self.profile.resolution, out=self.args.work)
        figures: dict = {}
        try:
            bench.measure_server(server_args, self.image, figures, {**self.env, "CONTROLNET_FAST": ""})
        finally:
            log = self.args.work / "server.log"
            if log.exists():  # the last 4 MiB: what comes back from the machine is bounded
                data = log.read_bytes()[-4 * 2**20:]
                (self.args.out / "server.log").write_bytes(data)
        record.update(figures)

    def samples4(self, record: dict) -> None:
        predictor = self.predictor(record)
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        record.update(bench.repeat(lambda: predictor.generate(**self.kwargs(self.head, 4)), self.clock.wall,
                                   min(1, self.profile.warmup), max(1, self.profile.runs // 4)))
        record["images_per_s"] = 4e3 / record["median_ms"]
        if self.cuda:
            record["peak_gpu_mib"] = self.torch.cuda.max_memory_allocated() / 2**20

    def unit_maps(self) -> dict[str, Path]:
        """Each unit's map at the input image's size (so the size plan is the served one)."""
        import numpy as np
        from PIL import Image

        from models.detectors.canny import CannyDetector
        from models.detectors.seg import ADE20K_PALETTE
        from models.image import load_rgb

        rgb = load_rgb(self.image)
        height, width = rgb.shape[:2]
        seg = np.empty_like(rgb)
        for i, rows in enumerate(np.array_split(np.arange(height), 2)):
            for j, cols in enumerate(np.array_split(np.arange(width), 2)):
                seg[np.ix_(rows, cols)] = ADE20K_PALETTE[1 + 2 * i + j]
        maps = {"canny": CannyDetector()(rgb), "depth": np.repeat(rgb.mean(axis=2, keepdims=True), 3, axis=2),
                "seg": seg}
        paths = {}
        for name in UNITS:
            paths[name] = self.args.work / f"map-{name}.png"
            Image.fromarray(maps[name].astype(np.uint8)).save(paths[name])
        return paths

    def units(self, record: dict) -> None:
        """The multi image with the first 1, 2, 3 of UNITS: same prompt, shape, steps and seed."""
        from PIL import Image

        from bench import weights as bench_weights

        start = time.time()
        bench_weights.write(self.root, device="cuda" if self.cuda else "cpu", size=self.args.size, image="multi")
        record["weights_s"] = round(time.time() - start, 1)
        maps = self.unit_maps()
        # At least as many ControlNets kept as units: the rows must not time reloads.
        predictor = self.predictor(record, image="multi", CONTROLNET_MAX_LOADED=str(len(UNITS)))
        kwargs = {k: v for k, v in self.kwargs(self.head).items() if k not in ("image", "low_threshold", "high_threshold")}
        record.update(conditions=list(UNITS), rows={})
        previous = None
        for k in range(1, len(UNITS) + 1):
            inputs = dict(kwargs, return_control_map=False)  # the uploaded maps would come back as they went
            for n, condition in enumerate(UNITS[:k], 1):
                inputs.update({f"controlnet_{n}": condition, f"controlnet_{n}_image": maps[condition],
                               f"controlnet_{n}_image_is_map": True})
            if self.cuda:
                self.torch.cuda.reset_peak_memory_stats()
            # At least one warm-up: a unit's first use loads its ControlNet.
            row = bench.repeat(lambda: predictor.generate(**inputs), self.clock.wall, max(1, self.profile.warmup),
                               max(1, self.profile.runs // 2))
            if self.cuda:
                row["peak_gpu_mib"] = self.torch.cuda.max_memory_allocated() / 2**20
            if previous is not None:
                row["added_ms"] = row["median_ms"] - previous
            previous = row["median_ms"]
            if k == 1:
                with Image.open(predictor.generate(**inputs)[-1]) as sample:
                    record["sample_size"] = f"{sample.width}x{sample.height}"
            record["rows"][f"{k} unit{'s' if k > 1 else ''} ({' + '.join(UNITS[:k])})"] = row
            print(f"  {k} units: {row}", flush=True)
        medians = [r["median_ms"] for r in record["rows"].values()]
        record["per_added_unit_ms"] = (medians[-1] - medians[0]) / (len(medians) - 1)

    def zimage(self, record: dict) -> None:
        from bench import zimage

        zimage.measure(self.args.size, self.cuda, self.clock, bench.repeat, record, self.args.work / "zimage")

    def compiled(self, record: dict, options: str, mode: str) -> None:
        if self.profile.backend != "inductor":
            mode = "default"  # the only mode other backends take; the rehearsal checks the plumbing, not Inductor
        # A fresh Inductor cache: the setup time is a cold compile, as in a new container without one.
        cache = Path(tempfile.mkdtemp(prefix=f"inductor-{mode}-", dir=self.args.work))
        predictor = self.predictor(record, options, CONTROLNET_COMPILE_MODE=mode, CONTROLNET_COMPILE_CACHE=str(cache),
                                   CONTROLNET_WARMUP=self.shape, CONTROLNET_COMPILE_BACKEND=self.profile.backend)
        record.update(mode=mode, backend=self.profile.backend, warmed=self.shape)
        plain = self.results["phases"].get("served", self.results["phases"].get("reference served", {})).get("setup_ms")
        if plain:
            record["compile_ms"] = record["setup_ms"] - plain  # setup with compile + warm-up, less a plain setup
        # setup() already ran the warmed shape twice (compiling, CUDA graphs recorded); then the usual warm-ups.
        record.update(self.timed(lambda n: predictor.generate(**self.kwargs(n)), [self.head]))
        record["match"] = self.match(predictor)

    # --- the run -------------------------------------------------------------------------------------

    def prepare(self) -> None:
        import weights
        from bench import weights as bench_weights
        from models.image import target_size
        from PIL import Image

        a = self.args
        root = self.root = (a.weights_root or a.work / f"weights-{a.size}").resolve()
        start = time.time()
        # Kept from an earlier call on the same machine (the --heavy call after the main one, warm).
        reused = all((weights.marker(root / name) or {}).get("size") == a.size
                     for name in weights.components(bench_weights.CONDITION).values())
        counts = bench_weights.write(root, device="cuda" if self.cuda else "cpu", size=a.size)
        self.results["weights"] = {"root": str(root), "size": a.size, "made_on": "cuda" if self.cuda else "cpu",
                                   "params_m": round(sum(counts.values()) / 1e6, 1), "reused": reused,
                                   "prepare_s": round(time.time() - start, 1)}
        self.env = {"CONTROLNET_WEIGHTS_DIR": str(root), "CONTROLNET_WEIGHTS": "real"}
        os.environ.update(self.env)
        self.ws = weights.locate("canny")
        self.image = bench.input_image(a.work / "input.png")
        with Image.open(self.image) as img:
            height, width = target_size(img.height, img.width, self.profile.resolution)
        self.shape = f"{width}x{height}:1"
        self.results["sample_size"] = f"{width}x{height}"
        self.results["versions"] = bench.versions(self.cuda)

    def main(self) -> None:
        self.prepare()
        self.save()
        if self.args.heavy:
            self.phase("reference baseline", "reference", self.baseline, [self.head])
            self.phase("reference served", "reference", self.reference_served)
            for options, mode in HEAVY:
                cost = "compile" if mode == "reduce-overhead" else "heavy"  # autotuning takes minutes more
                self.phase(f"compile {options} {mode}", cost, self.compiled, options, mode)
            return
        self.phase("baseline", "baseline", self.baseline)
        self.phase("served", "served", self.served)
        for options in EAGER:
            self.phase(f"eager {options}", "eager", self.eager, options)
        self.phase("server", "server", self.server)
        self.phase("samples4", "samples4", self.samples4)
        self.phase("units", "units", self.units)
        self.phase("zimage", "zimage", self.zimage)
        for options, mode in COMPILE:
            self.phase(f"compile {options} {mode}", "compile", self.compiled, options, mode)


# --- the markdown file ---------------------------------------------------------------------------------

def _row(name: str, s: dict) -> str:
    return f"| {name} | {s['median_ms']:.1f} | {s['p90_ms']:.1f} | {s['min_ms']:.1f} | {s['runs']} |"


def _ratio(base: dict | None, s: dict | None, key: str) -> str:
    if not base or not s or key not in base or key not in s:
        return "-"
    return f"{base[key]['median_ms'] / s[key]['median_ms']:.2f}x"


def _match(m: dict | None) -> str:
    if not m:
        return "-"
    if m.get("ok") is None:
        return m.get("why", "-")
    return f"{m['max_abs']} / {m['mean_abs']:.3f} ({'ok' if m['ok'] else 'OUT OF TOLERANCE'})"


def markdown(r: dict) -> str:
    phases, versions = r["phases"], r.get("versions", {})
    steps = PROFILES[r["size"]]["steps"]
    head = f"steps_{steps[0]}"
    where = versions.get("gpu")
    lines = [f"### {'GPU: ' + where if 'gpu' in versions else 'CPU'}, {r['size']} size, "
             f"{'compile-heavy call' if r['invocation'] == 'heavy' else 'main call'} ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `{r.get('command') or 'bench/device.sh'}`. Budget {r['budget_s']:.0f} s, "
             f"{r.get('elapsed_s', 0):.0f} s used. Sample {r.get('sample_size', '?')}, DDIM, scale 9, seed {bench.SEED}."]
    w = r.get("weights")
    if w:
        lines[-1] += f" Random-weight fp16 models ({w['params_m']} M params) " + (
            "kept from an earlier call." if w.get("reused") else f"made on {w['made_on']} and written in {w['prepare_s']} s.")
    status = {name: p["status"] for name, p in phases.items()}
    not_done = [f"{name} (still running when this file was written: cut short there, or under way)"
                if p["status"] == "running" else f"{name} ({p['status']}: {p.get('why') or p.get('error', '')})"
                for name, p in phases.items() if p["status"] != "done"]
    lines += ["", "Phases: " + ", ".join(f"{n} {s}" for n, s in status.items()) + "."]
    if not_done:
        lines += ["", "Not measured: " + "; ".join(not_done)]

    base = phases.get("baseline") or phases.get("reference baseline")
    served = phases.get("served") or phases.get("reference served")
    lines += ["", "#### End to end (in process, PNGs included)", "",
              "| measurement | median ms | p90 ms | min ms | runs |", "|---|---|---|---|---|"]
    for label, p in (("baseline", base), ("served", served)):
        for key in (p or {}):
            if key.startswith("steps_"):
                lines.append(_row(f"{label} steps {key[6:]}", p[key]))
    if phases.get("samples4", {}).get("median_ms"):
        lines.append(_row(f"served samples 4 (steps {steps[0]})", phases["samples4"]))
    for name, p in phases.items():
        if (name.startswith("eager") or name.startswith("compile")) and head in p:
            lines.append(_row(f"{name} steps {steps[0]}", p[head]))

    figures = {}
    if served:
        if "setup_ms" in served:
            figures["setup in process (s)"] = served["setup_ms"] / 1e3
        if "first_prediction_ms" in served:
            figures["first prediction after setup (ms)"] = served["first_prediction_ms"]
    for label, p in (("served", served), ("baseline", base)):
        if p and p.get("fit"):
            f = p["fit"]
            figures[f"{label}: T(n) = a + b*n (ms)"] = (f"{f['a_ms']:.1f} + {f['b_ms_per_step']:.2f} n "
                                                        f"({f['it_per_s'] or 0:.1f} it/s)")
    if base and "load_ms" in base:
        figures["baseline: load (s)"] = base["load_ms"] / 1e3
    figures[f"ratio served vs baseline ({steps[0]} steps, baseline / ours)"] = _ratio(base, served, head)
    if served and "peak_gpu_mib" in served.get(head, {}):
        figures["served: peak GPU memory, 1 sample (MiB)"] = served[head]["peak_gpu_mib"]
    s4 = phases.get("samples4", {})
    if served and head in served and "images_per_s" in s4:
        figures["served: images/s at num_samples 1 / 4"] = f"{1e3 / served[head]['median_ms']:.2f} / {s4['images_per_s']:.2f}"
    if "peak_gpu_mib" in s4:
        figures["served: peak GPU memory, 4 samples (MiB)"] = s4["peak_gpu_mib"]
    srv = phases.get("server", {})
    if "server" in srv:
        figures["server's fast path"] = "off (plain)"
        figures["server cold start to READY (s)"] = srv["server_cold_start_ms"] / 1e3
        figures["server first prediction (ms)"] = srv["server_first_prediction_ms"]
        figures["HTTP overhead, median (ms)"] = srv["server"]["http_overhead"]["median_ms"]
        figures["HTTP round trip, median (ms)"] = srv["server"]["round_trip"]["median_ms"]
        figures["server predict_time, median (ms)"] = srv["server"]["predict_time"]["median_ms"]
    lines += ["", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in figures.items()]

    fast_rows = [(n, p) for n, p in phases.items() if (n.startswith("eager") or n.startswith("compile")) and head in p]
    if fast_rows:
        lines += ["", f"#### Fast-path options (through setup(), as CONTROLNET_FAST; {steps[0]} steps)", "",
                  "| options | setup s | compile s | median ms | vs plain served | vs baseline | max / mean abs vs plain (uint8) |",
                  "|---|---|---|---|---|---|---|"]
        for name, p in fast_rows:
            if p.get("backend", "inductor") != "inductor":
                name += f" (backend {p['backend']})"
            compile_s = f"{p['compile_ms'] / 1e3:.1f}" if "compile_ms" in p else "-"
            lines.append(f"| {name} | {p['setup_ms'] / 1e3:.2f} | {compile_s} | {p[head]['median_ms']:.1f} | "
                         f"{_ratio(served, p, head)} | {_ratio(base, p, head)} | {_match(p.get('match'))} |")
        lines += ["", f"Compiled variants are warmed in setup() at {r.get('sample_size')} (CONTROLNET_WARMUP), "
                  "from an empty Inductor cache; compile s = their setup less the plain setup."]
    units = phases.get("units", {})
    if units.get("rows"):
        lines += ["", f"#### Control units (the multi image, {steps[0]} steps, maps sent as maps: no detector runs)", "",
                  "| units | median ms | p90 ms | min ms | runs | added by the last unit (ms) |", "|---|---|---|---|---|---|"]
        lines += [_row(name, s) + (f" {s['added_ms']:.1f} |" if "added_ms" in s else " - |")
                  for name, s in units["rows"].items()]
        if "per_added_unit_ms" in units:
            lines += ["", f"Each added unit costs {units['per_added_unit_ms']:.1f} ms (median, 1 to "
                      f"{len(units['rows'])} units, sample {units.get('sample_size', '?')}, seed {bench.SEED}); "
                      f"multi setup {units['setup_ms'] / 1e3:.2f} s."]
    if phases.get("zimage", {}).get("rows"):
        from bench import zimage

        lines += zimage.markdown(phases["zimage"])
    if served and served.get("stages"):
        lines += ["", f"#### Stages ({steps[0]} steps, {'CUDA events' if 'gpu' in versions else 'perf_counter'})", "",
                  "| stage | median ms | p90 ms | min ms | runs |", "|---|---|---|---|---|"]
        lines += [_row(name, s) for name, s in served["stages"].items()]
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the loader and the server's worker pick the device themselves
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    args.out = args.out or bench.ROOT / "build" / "device"
    args.work = args.work or Path(tempfile.gettempdir()) / "controlnet-bench"
    for folder in (args.out, args.work):
        folder.mkdir(parents=True, exist_ok=True)
    run = Run(args)
    try:
        run.main()
    finally:
        run.save()
    print(markdown(run.results))
    statuses = {name: p["status"] for name, p in run.results["phases"].items()}
    bad = [name for name, s in statuses.items() if s == "failed"]
    bad += [f"{name} (fast path out of tolerance)" for name, p in run.results["phases"].items()
            if (p.get("match") or {}).get("ok") is False]
    for name in bad:
        print(f"FAILED: {name}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
