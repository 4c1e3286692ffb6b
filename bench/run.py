"""`make bench` / `make bench-smoke`: time the served canny prediction path, as docs/benchmarks.md describes.

Workload (docs/benchmarks.md): canny 100/200, image_resolution 512, 1 sample, DDIM 20 steps, eta 0,
scale 9, fixed prompt, seed and input image; also 30 and 50 steps for T(n) = a + b*n.

--size full: full-size SD 1.5 + ControlNet canny with random fp16 weights (bench/weights.py), loaded by
the real loader through the canny predictor's setup(). --size tiny: the tiny test weights (the smoke run).

Order, so that at most one copy of the models is in memory at a time: the predictor in-process (cold
setup, first prediction, end-to-end per step count, stages, num_samples 4, then the fast path on the
same pipeline and its match against the plain output), then plain diffusers (the baseline), then the
real Cog server in a subprocess (cold start to READY, first prediction, HTTP overhead).
Timing: CUDA events for the stages on a GPU (after warm-up), wall time around whole predictions
(they end in PNG files, so the device is idle when they return), perf_counter on CPU.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench import startup
from bench import common
from bench.common import PROMPT, ROOT, SEED, prepare_weights, stats  # noqa: F401  (bench/device.py reads them here)

MATCH_MAX, MATCH_MEAN = 8, 1.0  # fast vs plain, uint8 pixel units, on a GPU (fp16 reorderings)


def parse(argv):
    return common.parse(argv, __doc__)


class Clock:
    """CUDA events on a GPU, perf_counter on CPU; milliseconds."""

    def __init__(self, cuda: bool):
        import torch

        self.torch, self.cuda = torch, cuda

    def time(self, fn, *args, **kwargs):
        if self.cuda:
            start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        return out, (time.perf_counter() - start) * 1e3

    def wall(self, fn, *args, **kwargs):
        if self.cuda:
            self.torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if self.cuda:
            self.torch.cuda.synchronize()
        return out, (time.perf_counter() - start) * 1e3


def repeat(fn, clock_fn, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        fn()
    return stats([clock_fn(fn)[1] for _ in range(runs)])


def input_image(path: Path, width: int = 680, height: int = 512) -> Path:
    """A photo-like image with edges Canny finds, 4:3 (at 512: 680x512 -> a 640x512 sample)."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.random.default_rng(0).integers(90, 110, size=(height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([width // 8, height // 6, width // 2, height // 2], fill=(230, 40, 40))
    draw.ellipse([width // 2, height // 2, width - 20, height - 10], fill=(20, 20, 200))
    draw.line([0, height - 1, width - 1, 0], fill=(250, 250, 250), width=5)
    img.save(path)
    return path


def fit(points: dict[int, float]) -> dict | None:
    import numpy as np

    if len(points) < 2:
        return None
    b, a = np.polyfit(list(points), list(points.values()), 1)
    return {"a_ms": float(a), "b_ms_per_step": float(b), "it_per_s": float(1e3 / b) if b > 0 else None}


def samples_of(paths) -> "np.ndarray":
    import numpy as np
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths[1:]])


def quality(reference, candidate) -> dict:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref, cand = reference.astype("uint8"), candidate.astype("uint8")
    identical = bool((ref == cand).all())  # PSNR is infinite; JSON has no infinity
    return {
        "psnr_db": None if identical else float(peak_signal_noise_ratio(ref, cand, data_range=255)),
        "ssim": float(structural_similarity(ref[0], cand[0], channel_axis=-1, data_range=255)),
    }


def measure_predictor(args, clock, image: Path, results: dict) -> None:
    import numpy as np
    import torch
    from PIL import Image

    import weights
    from models import fast
    from models.image import load_rgb
    from predictors.canny.predict import Predictor

    cuda = clock.cuda
    generate_kwargs = dict(image=image, prompt=PROMPT, image_resolution=args.resolution, scale=9.0, seed=SEED,
                           eta=0.0, low_threshold=100, high_threshold=200)

    predictor, ms = clock.wall(lambda: (p := Predictor(), p.setup(), p)[-1])
    results["setup_in_process_ms"] = ms
    head = args.steps[0]
    first, ms = clock.wall(predictor.generate, ddim_steps=head, **generate_kwargs)
    results["first_prediction_ms"] = ms
    pipe, runner = predictor.runner.pipe, predictor.runner
    results["dtype"] = str(pipe.unet.dtype)

    def e2e(variant: str, warmup: int) -> dict:
        out = {}
        for n in args.steps:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out[f"steps_{n}"] = repeat(lambda: predictor.generate(ddim_steps=n, **generate_kwargs), clock.wall,
                                       warmup, args.runs)
            if cuda:
                out[f"steps_{n}"]["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
            print(f"{variant} e2e {n} steps: {out[f'steps_{n}']}", flush=True)
        out["fit"] = fit({n: out[f"steps_{n}"]["median_ms"] for n in args.steps})
        if "samples4" not in args.skip:
            s4 = repeat(lambda: predictor.generate(ddim_steps=head, num_samples=4, **generate_kwargs), clock.wall,
                        min(1, args.warmup), max(1, args.runs // 4))
            out["samples_4"] = {**s4, "images_per_s": 4e3 / s4["median_ms"]}
            print(f"{variant} num_samples 4: {out['samples_4']}", flush=True)
        out["samples_1_images_per_s"] = 1e3 / out[f"steps_{head}"]["median_ms"]
        return out

    results["served"] = e2e("served", args.warmup)
    results["stages"] = stages(args, clock, pipe, runner, load_rgb(image), head)
    reference = samples_of(predictor.generate(ddim_steps=head, **generate_kwargs))

    if args.lossy and "lossy" not in args.skip:
        results["lossy"] = {}
        for n in args.lossy:
            timing = repeat(lambda: predictor.generate(ddim_steps=n, **generate_kwargs), clock.wall, min(1, args.warmup), max(1, args.runs // 4))
            q = quality(reference, samples_of(predictor.generate(ddim_steps=n, **generate_kwargs)))
            results["lossy"][f"DDIM {n} steps"] = {**timing, **q}

    options = fast.options_from_env(args.fast) if args.fast and "fast" not in args.skip else ()
    if options:
        _, ms = clock.wall(fast.apply, pipe, options, cache_root=weights.root())
        results["fast_options"] = list(options)
        warm = max(args.warmup, 10) if "compile" in options else args.warmup
        _, ms_warm = clock.wall(lambda: [predictor.generate(ddim_steps=n, **generate_kwargs) for n in args.steps])
        results["fast_apply_ms"], results["fast_first_calls_ms"] = ms, ms_warm
        results["fast"] = e2e("fast", warm)
        diff = np.abs(samples_of(predictor.generate(ddim_steps=head, **generate_kwargs)) - reference)
        results["fast_match"] = {"max_abs": int(diff.max()), "mean_abs": float(diff.mean()),
                                 "tolerance": {"max_abs": MATCH_MAX, "mean_abs": MATCH_MEAN},
                                 "ok": bool(diff.max() <= MATCH_MAX and diff.mean() <= MATCH_MEAN)}
        print(f"fast vs plain: {results['fast_match']}", flush=True)
    del predictor, runner, pipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def stages(args, clock, pipe, runner, rgb, steps: int) -> dict:
    """The prediction's pieces called one by one, as ControlNetRunner and the predictor chain them."""
    import torch
    from PIL import Image

    from cog_base import A_PROMPT, N_PROMPT

    prompt, device = f"{PROMPT}, {A_PROMPT}", pipe.device
    parts = {}

    from models.image import target_size

    size = target_size(*rgb.shape[:2], args.resolution)

    def detector():
        return runner.control_map(rgb, size, 512, low_threshold=100, high_threshold=200)

    def text():
        return pipe.encode_prompt(prompt, device, 1, True, negative_prompt=N_PROMPT)

    control = detector()
    embeds, negative = text()
    height, width = control.shape[:2]

    def denoise():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, image=Image.fromarray(control),
                    height=height, width=width, num_inference_steps=steps, guidance_scale=9.0, eta=0.0,
                    generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").images

    latents = denoise()

    def decode():
        return pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]

    decoded = decode()

    def png():
        for img in [Image.fromarray(control), *pipe.image_processor.postprocess(decoded, output_type="pil")]:
            img.save(io.BytesIO(), format="PNG")

    with torch.inference_mode():
        for name, fn, clock_fn in (("detector", detector, clock.time), ("text_encoder", text, clock.time),
                                   ("denoise_loop", denoise, clock.time), ("vae_decode", decode, clock.time),
                                   ("postprocess_png", png, clock.wall)):
            parts[name] = repeat(fn, clock_fn, min(1, args.warmup), args.runs)
            print(f"stage {name}: {parts[name]}", flush=True)
    return parts


UNITS = {"1 unit (canny)": {}, "2 units (canny + depth)": {"controlnet_2": "depth"}}


def measure_units(args, clock, image: Path, results: dict) -> None:
    """Cost per ControlNet unit: the multi image with one unit and with two, same inputs and seed. Only
    where the multi image's weights are (the tiny ones; `make bench-weights` writes canny's alone)."""
    import gc

    import weights
    from predictors.multi.predict import Predictor

    try:
        weights.locate("multi")
    except weights.MissingWeightsError:
        results["units_skipped"] = "no weights for the multi image"
        return
    predictor = Predictor()
    predictor.setup()
    inputs = dict(prompt=PROMPT, image_resolution=args.resolution, ddim_steps=args.steps[0], seed=SEED,
                  controlnet_1="canny", controlnet_1_image=image)
    results["units"] = {}
    for name, extra in UNITS.items():
        extra = {**extra, **({"controlnet_2_image": image} if extra else {})}
        # At least one warm-up: a unit's first use loads its ControlNet and detector.
        results["units"][name] = repeat(lambda: predictor.generate(**inputs, **extra), clock.wall,
                                        max(1, args.warmup), args.runs)
        print(f"multi {name}: {results['units'][name]}", flush=True)
    del predictor
    gc.collect()


def load_baseline(cuda: bool, base: Path, controlnet: Path):
    """Plain diffusers: StableDiffusionControlNetPipeline, fp16 (fp32 on CPU), default SDPA, eager."""
    import torch
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dtype = torch.float16 if cuda else torch.float32
    kw = dict(torch_dtype=dtype, local_files_only=True)
    fp16 = {"variant": "fp16"} if any(base.glob("unet/*.fp16.safetensors")) else {}
    pipe = StableDiffusionControlNetPipeline(
        vae=AutoencoderKL.from_pretrained(base / "vae", **kw, **fp16),
        text_encoder=CLIPTextModel.from_pretrained(base / "text_encoder", **kw, **fp16),
        tokenizer=CLIPTokenizer.from_pretrained(base / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(base / "unet", **kw, **fp16),
        controlnet=ControlNetModel.from_pretrained(controlnet, **kw),
        scheduler=DDIMScheduler.from_pretrained(base / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def baseline_call(pipe, image: Path, resolution: int):
    """call(n): one plain-diffusers image at n steps, the served request's prompt, map and seed (PIL out)."""
    import torch
    from PIL import Image

    from cog_base import A_PROMPT, N_PROMPT
    from models.detectors.canny import CannyDetector
    from models.image import load_rgb, resize_to_resolution

    control = Image.fromarray(CannyDetector()(resize_to_resolution(load_rgb(image), resolution)))

    def call(n: int):
        return pipe(prompt=f"{PROMPT}, {A_PROMPT}", negative_prompt=N_PROMPT, image=control,
                    height=control.height, width=control.width, num_inference_steps=n, guidance_scale=9.0,
                    generator=torch.Generator("cpu").manual_seed(SEED)).images

    return call


def measure_baseline(args, clock, image: Path, results: dict, base: Path, controlnet: Path) -> None:
    import torch

    pipe, ms = clock.wall(load_baseline, clock.cuda, base, controlnet)
    results["baseline_load_ms"] = ms
    call = baseline_call(pipe, image, args.resolution)
    out = {}
    for n in args.steps:
        out[f"steps_{n}"] = repeat(lambda: call(n), clock.wall, args.warmup, args.runs)
        print(f"baseline {n} steps: {out[f'steps_{n}']}", flush=True)
    out["fit"] = fit({n: out[f"steps_{n}"]["median_ms"] for n in args.steps})
    results["baseline"] = out
    del pipe, call
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()


def measure_server(args, image: Path, results: dict, env: dict) -> None:
    """The real Cog HTTP server: cold start to READY, first prediction, then overhead = round trip - predict_time."""
    from scripts.cog_server import CogServer

    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    inputs = {"image": uri, "prompt": PROMPT, "seed": SEED, "ddim_steps": args.steps[0],
              "image_resolution": str(args.resolution)}
    log = (args.out or ROOT / "build" / "bench") / "server.log"
    server = CogServer("canny", log_path=log, env=env)
    start = time.perf_counter()
    try:
        server.start(timeout=900)
        ready = time.perf_counter()
        response = server.predict(inputs)
        results["server_cold_start_ms"] = (ready - start) * 1e3
        results["server_first_prediction_ms"] = (time.perf_counter() - ready) * 1e3
        response.raise_for_status()
        round_trips, overheads, predict = [], [], []
        for i in range(args.warmup + args.runs):
            t0 = time.perf_counter()
            body = server.predict(inputs).json()
            rt = (time.perf_counter() - t0) * 1e3
            if body.get("status") != "succeeded":
                raise RuntimeError(f"server prediction failed: {body.get('error')}")
            if i >= args.warmup:
                round_trips.append(rt)
                predict.append(body["metrics"]["predict_time"] * 1e3)
                overheads.append(rt - predict[-1])
        results["server"] = {"round_trip": stats(round_trips), "predict_time": stats(predict), "http_overhead": stats(overheads)}
        print(f"server: {results['server']}", flush=True)
    finally:
        server.stop()


def versions(cuda: bool) -> dict:
    import cog
    import diffusers
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "cog": cog.__version__, "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    if cuda:
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def markdown(r: dict) -> str:
    def row(name, s):
        return f"| {name} | {s['median_ms']:.1f} | {s['p90_ms']:.1f} | {s['min_ms']:.1f} | {s['runs']} |"

    head = r["args"]["steps"][0]
    lines = [f"# Benchmark: {r['args']['size']} size on {r['versions'].get('gpu', 'CPU')} ({r['dtype']})", "",
             f"Command: `{r['command']}`", "", "## End to end (in process, PNGs included)", "",
             "| measurement | median ms | p90 ms | min ms | runs |", "|---|---|---|---|---|"]
    for variant in ("served", "fast", "baseline"):
        for key, s in r.get(variant, {}).items():
            if key.startswith("steps_") or key == "samples_4":
                lines.append(row(f"{variant} {key.replace('_', ' ')}", s))
    for name, s in r.get("units", {}).items():
        lines.append(row(f"multi, {name}, steps {head}", s))
    lines += ["", "| figure | value |", "|---|---|"]
    figures = {"setup in process (s)": r.get("setup_in_process_ms", 0) / 1e3,
               "first prediction after setup (ms)": r.get("first_prediction_ms")}
    for variant in ("served", "fast", "baseline"):
        if variant in r and r[variant].get("fit"):
            f = r[variant]["fit"]
            figures[f"{variant}: T(n) = a + b*n (ms)"] = f"{f['a_ms']:.1f} + {f['b_ms_per_step']:.2f} n ({f['it_per_s'] or 0:.1f} it/s)"
        if variant in r and "samples_4" in r[variant]:
            figures[f"{variant}: images/s at num_samples 1 / 4"] = (
                f"{r[variant]['samples_1_images_per_s']:.2f} / {r[variant]['samples_4']['images_per_s']:.2f}")
        if variant in r and "peak_gpu_mib" in r[variant].get(f"steps_{head}", {}):
            figures[f"{variant}: peak GPU memory (MiB)"] = r[variant][f"steps_{head}"]["peak_gpu_mib"]
    for key in ("ratio_served_vs_baseline", "ratio_fast_vs_baseline"):
        if key in r:
            figures[key.replace("_", " ") + f" ({head} steps, baseline / e2e)"] = r[key]
    if "fast_match" in r:
        figures["fast vs plain, same seed (max / mean abs, uint8)"] = (
            f"{r['fast_match']['max_abs']} / {r['fast_match']['mean_abs']:.3f} (ok: {r['fast_match']['ok']})")
    if "server" in r:
        figures["server's fast path (CONTROLNET_FAST)"] = r.get("server_fast_path", "off")
        figures["server cold start to READY (s)"] = r["server_cold_start_ms"] / 1e3
        figures["server first prediction (ms)"] = r["server_first_prediction_ms"]
        figures["HTTP overhead, median (ms)"] = r["server"]["http_overhead"]["median_ms"]
        figures["HTTP round trip, median (ms)"] = r["server"]["round_trip"]["median_ms"]
    for name, value in figures.items():
        lines.append(f"| {name} | {value:.3f} |" if isinstance(value, float) else f"| {name} | {value} |")
    lines += ["", f"## Stages ({head} steps, {'CUDA events' if 'gpu' in r['versions'] else 'perf_counter'})", "",
              "| stage | median ms | p90 ms | min ms | runs |", "|---|---|---|---|---|"]
    lines += [row(name, s) for name, s in r["stages"].items()]
    if r.get("lossy"):
        lines += ["", f"## Lossy options (against the exact {head}-step output, same seed)", "",
                  "| option | median ms | PSNR dB | SSIM |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['median_ms']:.1f} | {v['psnr_db'] if v['psnr_db'] is None else round(v['psnr_db'], 2)} | {v['ssim']:.4f} |" for k, v in r["lossy"].items()]
    lines += startup.markdown(r)
    if "overhead" in r:
        from bench import overhead

        lines += overhead.markdown(r["overhead"])
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    return "\n".join(lines)


def check(r: dict) -> list[str]:
    """What a complete run must contain; the smoke run fails on any gap (so the harness cannot rot)."""
    problems = []
    head = r["args"]["steps"][0]
    for variant in ["served"] + (["baseline"] if "baseline" not in r["args"]["skip"] else []) + (
            ["fast"] if r.get("fast_options") else []):
        if not r.get(variant, {}).get(f"steps_{head}", {}).get("median_ms", 0) > 0:
            problems.append(f"no {variant} timing")
    for stage in ("detector", "text_encoder", "denoise_loop", "vae_decode", "postprocess_png"):
        if not r["stages"].get(stage, {}).get("median_ms", 0) > 0:
            problems.append(f"no {stage} stage timing")
    if "server" not in r["args"]["skip"] and not r.get("server", {}).get("round_trip"):
        problems.append("no server timing")
    if "units" not in r["args"]["skip"] and "units_skipped" not in r and len(r.get("units", {})) != len(UNITS):
        problems.append("no multi unit timings")
    problems += startup.check(r)
    if "overhead" not in r["args"]["skip"]:
        from bench import overhead

        problems += overhead.check(r)
    if r.get("fast_match") and not r["fast_match"]["ok"]:
        problems.append(f"fast path does not match the plain path: {r['fast_match']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the loader picks the device itself
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import weights

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device here")
    device = "cuda" if cuda else "cpu"
    args.out = args.out or ROOT / "build" / "bench" / f"{args.size}-{device}"
    args.out.mkdir(parents=True, exist_ok=True)
    env = prepare_weights(args)
    ws = weights.locate("canny")

    clock = Clock(cuda)
    image = input_image(args.out / "input.png")
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
               "versions": versions(cuda), "weights": str(ws.base.parent)}
    measure_predictor(args, clock, image, results)
    if "units" not in args.skip:
        measure_units(args, clock, image, results)
    if "baseline" not in args.skip:
        measure_baseline(args, clock, image, results, ws.base, ws.controlnet)
        head = f"steps_{args.steps[0]}"
        for variant in ("served", "fast"):
            if variant in results:
                results[f"ratio_{variant}_vs_baseline"] = (
                    results["baseline"][head]["median_ms"] / results[variant][head]["median_ms"])
    if "server" not in args.skip:
        # The server serves what setup() applies: the same fast options, compiled for the timed shape.
        served = "" if "fast" in args.skip else args.fast
        from PIL import Image

        from models.image import target_size

        with Image.open(image) as img:
            height, width = target_size(img.height, img.width, args.resolution)
        server_env = {**env, "CONTROLNET_FAST": served, "CONTROLNET_WARMUP": f"{width}x{height}:1"}
        results["server_fast_path"] = served or "off"
        measure_server(args, image, results, {**server_env, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
                       if args.device == "cpu" else server_env)
    startup.measure(args, results, env)  # start-up and per-request work beside their floors
    if "overhead" not in args.skip:
        from bench import overhead

        overhead.measure(args, results, {**env, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
                         if args.device == "cpu" else env)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    print(table)
    print(f"written: {args.out / 'results.json'}, {args.out / 'results.md'}")
    problems = check(results)
    for problem in problems:
        print(f"INCOMPLETE: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
