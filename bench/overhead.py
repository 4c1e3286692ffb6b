"""What sits around the image on the CPU (issue 18): encoding the outputs, and the HTTP path.

Each figure is measured beside its floor in the same run, with the load noted:
- encoding: photo-like images at 1@704x512 and 4@1024x768 (with a control map each time, as a request
  returns it), per format and level, one after another on one thread; then the served path
  (models.encode: its settings, on its pool); floor: the same images at PNG level 0 (no compression),
  and for the pool the longest single image or the one-thread sum over the cores, whichever is more.
- HTTP overhead: the real Cog server (canny, the weights of the run) at 1@512 and 4@768, round trip
  minus Cog's predict_time; floor: a minimal uvicorn app (`python -m bench.overhead floor`, its own
  process as Cog's is) that parses the same request, decodes the image once and answers the same
  output files as data: URIs once, written with the stdlib's json (the issue's floor) and, a second
  floor, with orjson as our answers are; the three are sent in turn, request by request.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENCODE_SHAPES = {"1@704x512": (1, 704, 512), "4@1024x768": (4, 1024, 768)}
ENCODINGS = {  # label: (format, Pillow options)
    "png Pillow default (level 6)": ("png", {}),
    "png level 0 (floor: stored)": ("png", {"compress_level": 0}),
    "png level 1": ("png", {"compress_level": 1}),
    "png level 3": ("png", {"compress_level": 3}),
    "png level 9": ("png", {"compress_level": 9}),
    "webp q80 method 0": ("webp", {"quality": 80, "method": 0}),
    "webp q80 method 4 (libwebp default)": ("webp", {"quality": 80, "method": 4}),
    "jpg q80": ("jpg", {"quality": 80}),
    "jpg q95": ("jpg", {"quality": 95}),
}
HTTP_SHAPES = {"1@512": ("1", "512"), "4@768": ("4", "768")}


def photo(width: int, height: int, seed: int = 0):
    """Photo-like: smooth colour regions, soft edges, sensor-like noise (what PNG sizes depend on)."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8))
    smooth = coarse.resize((width, height), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    noisy = np.asarray(smooth, dtype=np.int16) + rng.normal(0, 4, size=(height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def control_map(width: int, height: int):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "black")
    draw = ImageDraw.Draw(img)
    for i in range(0, width, 37):
        draw.line([i, 0, width - i, height - 1], fill="white", width=1)
    return img


def _median(fn, runs: int) -> float:
    from bench.common import stats

    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return stats(times)


def measure_encoding(runs: int) -> dict:
    from PIL import Image

    from models import encode

    out = {}
    for shape, (count, width, height) in ENCODE_SHAPES.items():
        images = [control_map(width, height)] + [photo(width, height, seed) for seed in range(count)]
        row = {}
        for label, (fmt, options) in ENCODINGS.items():
            fmt_name = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}[fmt]
            sizes = []

            def serial():
                sizes.clear()
                for img in images:
                    buf = io.BytesIO()
                    img.save(buf, format=fmt_name, **options)
                    sizes.append(buf.tell())

            timing = _median(serial, runs)
            row[label] = {**timing, "bytes": sum(sizes), "sample_bytes": sizes[1]}
        # The served path: models.encode's settings on its pool, every image of the request at once.
        folder = ROOT / "build" / "bench" / "encode"
        folder.mkdir(parents=True, exist_ok=True)
        for fmt in encode.FORMATS:
            options = encode.save_options(fmt, 80)
            single = []

            def one_thread():
                single.clear()
                for i, img in enumerate(images):
                    start = time.perf_counter()
                    encode.save(img, str(folder / f"serial-{i}"), fmt, 80)
                    single.append((time.perf_counter() - start) * 1e3)

            serial_timing = _median(one_thread, runs)

            def pooled():
                for future in [encode.submit(img, str(folder / f"pool-{i}"), fmt, 80) for i, img in enumerate(images)]:
                    future.result()

            pool_timing = _median(pooled, runs)
            cores = min(encode.pool()._max_workers, os.cpu_count() or 1)
            floor = max(max(single), serial_timing["median_ms"] / cores)
            # Lossless: the PNG's pixels are the source's.
            identical = None
            if fmt == "png":
                identical = all(
                    Image.open(folder / f"pool-{i}.png").convert("RGB").tobytes() == img.convert("RGB").tobytes()
                    for i, img in enumerate(images))
            row[f"served {fmt} ({', '.join(f'{k} {v}' for k, v in options.items() if k != 'format')}), one thread"] = serial_timing
            row[f"served {fmt}, pool of {encode.pool()._max_workers}"] = {
                **pool_timing, "floor_ms": floor, "ratio": pool_timing["median_ms"] / floor, "pixels_identical": identical}
        out[shape] = row
        print(f"encoding {shape}: " + json.dumps({k: round(v["median_ms"], 1) for k, v in row.items()}), flush=True)
    return out


# -- the floor app ------------------------------------------------------------------------------------

# How the floor app writes its answer: the stdlib's json (the floor), or orjson as the served
# answers are now written (cog_base/cog016/serving.py), so that the floor is never the slower serialiser.
FLOOR_JSON = ("stdlib", "orjson")


def floor_app(outputs: list[Path], dumps=json.dumps):
    """A minimal ASGI app: parse the body, decode the image once, answer the files as data: URIs."""
    import mimetypes

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        if not raw:  # the readiness probe
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        body = json.loads(raw)
        image = body["input"]["image"]
        decoded = binascii.a2b_base64(image.split(",", 1)[1])
        answer = {"input": {k: v for k, v in body["input"].items() if k != "image"}, "decoded_bytes": len(decoded),
                  "output": [f"data:{mimetypes.guess_type(p.name)[0]};base64,{base64.b64encode(p.read_bytes()).decode()}"
                             for p in outputs], "status": "succeeded"}
        raw = dumps(answer)
        raw = raw.encode() if isinstance(raw, str) else raw
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})

    return app


def serve_floor(port: int, folder: Path, serialiser: str = "stdlib") -> None:
    import uvicorn

    if serialiser == "orjson":
        import orjson

        dumps = orjson.dumps
    else:
        dumps = json.dumps
    outputs = sorted(folder.iterdir())
    uvicorn.run(floor_app(outputs, dumps), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _wait_port(url: str, timeout: float = 60) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise TimeoutError(f"the floor app at {url} did not start")


def _start_floors(folder: Path) -> dict:
    from scripts.cog_server import free_port

    floors = {}
    for serialiser in FLOOR_JSON:
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "bench.overhead", "floor", "--port", str(port),
                                    "--outputs", str(folder), "--json", serialiser], cwd=ROOT, start_new_session=True)
        floors[serialiser] = (process, f"http://127.0.0.1:{port}")
    for _, url in floors.values():
        _wait_port(url)
    return floors


def _stop(process) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def measure_http(env: dict, warmup: int, runs: int, log_dir: Path) -> dict:
    """Ours (the real Cog server) and the floors, request by request in turn (ours, floor, floor with
    orjson, ours, ...) so that a change of the machine's speed moves all of them; each shape in turn."""
    import requests

    from bench.common import stats
    from scripts.cog_server import CogServer

    buf = io.BytesIO()
    photo(680, 512, seed=7).save(buf, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    out = {"input_bytes": len(buf.getvalue())}
    server = CogServer("canny", log_path=log_dir / "overhead-server.log", env=env)
    floors = {}
    try:
        server.start(timeout=900)
        session = requests.Session()
        for shape, (count, resolution) in HTTP_SHAPES.items():
            inputs = {"image": image, "prompt": "a house", "seed": 1, "ddim_steps": 1, "num_samples": count,
                      "image_resolution": resolution}

            def ours():
                start = time.perf_counter()
                response = session.post(f"{server.url}/predictions", json={"input": inputs}, timeout=900)
                round_trip = (time.perf_counter() - start) * 1e3
                answer = response.json()
                if answer.get("status") != "succeeded":
                    raise RuntimeError(f"overhead: the server's prediction failed: {answer.get('error') or answer}")
                return round_trip, answer, len(response.content)

            _, answer, answer_bytes = ours()
            # The floors answer these same files.
            folder = log_dir / f"overhead-outputs-{shape.replace('@', 'at')}"
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.iterdir():
                old.unlink()
            for i, uri in enumerate(answer["output"]):
                ext = {"image/png": "png", "image/webp": "webp", "image/jpeg": "jpg"}[uri[5:uri.index(";")]]
                (folder / f"{i}.{ext}").write_bytes(base64.b64decode(uri.split(",", 1)[1]))
            floors = _start_floors(folder)
            times = {"ours": [], "predict_time": [], **{name: [] for name in FLOOR_JSON}}
            for i in range(warmup + runs):
                round_trip, answer, _ = ours()
                predict = answer["metrics"]["predict_time"] * 1e3
                floor_ms = {}
                for name, (_, url) in floors.items():
                    start = time.perf_counter()
                    reply = session.post(url, json={"input": inputs}, timeout=60)
                    floor_ms[name] = (time.perf_counter() - start) * 1e3  # as for ours: not the client's decoding after it
                    if len(reply.json()["output"]) != len(answer["output"]):
                        raise RuntimeError("overhead: the floor answered another number of files")
                if i >= warmup:
                    times["ours"].append(round_trip - predict)
                    times["predict_time"].append(predict)
                    for name, value in floor_ms.items():
                        times[name].append(value)
            for process, _ in floors.values():
                _stop(process)
            floors = {}
            row = {"ours": stats(times["ours"]), "predict_time": stats(times["predict_time"]),
                   "floor": stats(times["stdlib"]), "floor_orjson": stats(times["orjson"]),
                   "answer_bytes": answer_bytes, "echoed_input_chars": len(str(answer["input"].get("image")))}
            row["ratio"] = row["ours"]["median_ms"] / row["floor"]["median_ms"]
            row["ratio_orjson"] = row["ours"]["median_ms"] / row["floor_orjson"]["median_ms"]
            # Pair by pair: robust to the machine's speed drifting during the run.
            row["pair_ratio_median"] = stats([a / b for a, b in zip(times["ours"], times["stdlib"])])["median_ms"]
            out[shape] = row
            print(f"HTTP overhead {shape}: ours {row['ours']['median_ms']:.1f} ms, floor {row['floor']['median_ms']:.1f} ms "
                  f"({row['ratio']:.2f}x), floor with orjson {row['floor_orjson']['median_ms']:.1f} ms "
                  f"({row['ratio_orjson']:.2f}x)", flush=True)
    finally:
        for process, _ in floors.values():
            _stop(process)
        server.stop()
    return out


def measure(args, results: dict, env: dict) -> None:
    """bench/run.py's phase: encoding, then HTTP overhead; the load average before and after."""
    out = {"load_before": os.getloadavg()}
    out["encoding"] = measure_encoding(args.runs)
    if "server" not in args.skip:
        out["http"] = measure_http(env, max(args.warmup, 1), args.runs, args.out)
    out["load_after"] = os.getloadavg()
    results["overhead"] = out


def markdown(overhead: dict) -> list[str]:
    load = "/".join(f"{x:.1f}" for x in overhead["load_before"]) + " before, " + "/".join(
        f"{x:.1f}" for x in overhead["load_after"]) + " after"
    lines = ["", f"## Encoding (one thread unless a pool; load average 1/5/15 min: {load})", "",
             "| shape | encoding | median ms | p90 ms | bytes (all / one sample) | floor ms |", "|---|---|---|---|---|---|"]
    for shape, row in overhead["encoding"].items():
        for label, s in row.items():
            size = f"{s['bytes'] // 1000} KB / {s['sample_bytes'] // 1000} KB" if "bytes" in s else ""
            floor = f"{s['floor_ms']:.1f} ({s['ratio']:.2f}x)" if "floor_ms" in s else ""
            if s.get("pixels_identical") is not None:
                floor += f"; pixels identical: {s['pixels_identical']}"
            lines.append(f"| {shape} | {label} | {s['median_ms']:.1f} | {s['p90_ms']:.1f} | {size} | {floor} |")
    if "http" in overhead:
        http = overhead["http"]
        lines += ["", f"## HTTP overhead, sync (round trip - predict_time; input PNG {http['input_bytes'] // 1000} KB; "
                  "requests interleaved: ours, floor, floor with orjson)", "",
                  "| shape | ours median ms (p90) | floor median ms (p90) | ratio (pair by pair) | floor with orjson, median ms | ratio "
                  "| answer bytes | input echoed (chars) |", "|---|---|---|---|---|---|---|---|"]
        for shape in HTTP_SHAPES:
            r = http[shape]
            lines.append(f"| {shape} | {r['ours']['median_ms']:.1f} ({r['ours']['p90_ms']:.1f}) | {r['floor']['median_ms']:.1f} "
                         f"({r['floor']['p90_ms']:.1f}) | {r['ratio']:.2f}x ({r['pair_ratio_median']:.2f}x) | "
                         f"{r['floor_orjson']['median_ms']:.1f} | {r['ratio_orjson']:.2f}x | {r['answer_bytes']} | "
                         f"{r['echoed_input_chars']} |")
    return lines


def check(r: dict) -> list[str]:
    """What the phase must have produced (bench/run.py's check)."""
    o = r.get("overhead")
    if not o:
        return ["no overhead phase"]
    problems = [f"no encoding timings for {shape}" for shape in ENCODE_SHAPES if len(o["encoding"].get(shape, {})) < len(ENCODINGS) + 6]
    for shape, row in o["encoding"].items():
        if any(s.get("pixels_identical") is False for s in row.values()):
            problems.append(f"PNG pixels differ from the source at {shape}")
    if "server" not in r["args"]["skip"]:
        problems += [f"no HTTP overhead for {shape} ({floor})" for shape in HTTP_SHAPES for floor in ("floor", "floor_orjson")
                     if not o.get("http", {}).get(shape, {}).get(floor, {}).get("median_ms")]
    return problems


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the floor app: python -m bench.overhead floor --port N --outputs DIR")
    parser.add_argument("what", choices=["floor"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--outputs", type=Path, required=True)
    parser.add_argument("--json", choices=FLOOR_JSON, default="stdlib")
    a = parser.parse_args()
    serve_floor(a.port, a.outputs, a.json)
