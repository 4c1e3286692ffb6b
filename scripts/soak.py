"""`make soak [N=1000] [COND=canny]`: N sequential predictions against one real Cog server.

Reports failures, the prediction worker's resident memory after 50 predictions and at the end (it
must stay within 10%), and temporary files left behind. The requests rotate through the inputs that
allocate differently (sizes, sample counts, schedulers, preprocess-only, exact sizes, bad images) so
a leak in any of those paths shows. Exits non-zero when any check fails. CI runs a short version.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil
from PIL import Image, ImageDraw

from scripts.cog_server import CogServer
from scripts.serve import port_number, require_port

MEMORY_GROWTH_LIMIT = 0.10
BASELINE_AT = 50


def image_uri(width: int, height: int) -> str:
    img = Image.new("RGB", (width, height), (230, 225, 210))
    draw = ImageDraw.Draw(img)
    draw.rectangle([width // 5, height // 4, width // 2, height - 10], outline=(20, 20, 20), width=4)
    draw.ellipse([width // 2, 10, width - 10, height // 2], outline=(20, 20, 20), width=4)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def requests_cycle():
    landscape, portrait = image_uri(400, 300), image_uri(300, 420)
    base = {"prompt": "a house by a lake", "image_resolution": "256", "ddim_steps": 2}
    yield "plain", {**base, "image": landscape}, True
    yield "portrait, 4 samples", {**base, "image": portrait, "num_samples": "4", "ddim_steps": 1}, True
    yield "512", {**base, "image": landscape, "image_resolution": "512", "ddim_steps": 1}, True
    yield "UniPC", {**base, "image": landscape, "scheduler": "UniPC"}, True
    yield "preprocess only", {**base, "image": landscape, "preprocess_only": True}, True
    yield "exact size", {**base, "image": portrait, "width": 300, "height": 200}, True
    yield "bad image", {**base, "image": "data:image/png;base64," + base64.b64encode(b"nope").decode()}, False


def worker_rss(server: CogServer) -> int:
    parent = psutil.Process(server.process.pid)
    return sum(child.memory_info().rss for child in parent.children(recursive=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--cond", default="canny")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--port", type=port_number, default=None, help="the Cog server's port (default: a free one)")
    args = parser.parse_args(argv)
    if args.port:
        require_port(args.port, who="make soak")

    tmp = Path(tempfile.mkdtemp(prefix="soak-tmp-"))
    cycle = list(requests_cycle())
    failures, baseline, started = [], None, time.monotonic()
    with CogServer(args.cond, port=args.port, env={"TMPDIR": str(tmp)}, log_path=tmp.parent / f"{tmp.name}.log") as server:
        print(f"soak: {args.n} predictions against {args.cond} at {server.url}", flush=True)
        at_start = set(tmp.rglob("*"))  # start-up's own (torch's compile cache folder, say)
        for i in range(args.n):
            name, inputs, should_succeed = cycle[i % len(cycle)]
            response = server.predict({**inputs, "seed": i + 1}, timeout=300)
            status = response.json().get("status") if response.status_code == 200 else f"HTTP {response.status_code}"
            if (status == "succeeded") != should_succeed:
                failures.append(f"#{i} {name}: {status} {response.json().get('error') if response.status_code == 200 else ''}")
            if i + 1 == min(BASELINE_AT, args.n):
                baseline = worker_rss(server)
            if (i + 1) % 100 == 0:
                print(f"soak: {i + 1}/{args.n}, {len(failures)} failures, worker {worker_rss(server) / 2**20:.0f} MiB, "
                      f"{time.monotonic() - started:.0f}s", flush=True)
        final = worker_rss(server)
    # What is left once the server is gone; the last prediction's outputs go with their predictor.
    left = sorted(str(p.relative_to(tmp)) for p in set(tmp.rglob("*")) - at_start)
    growth = (final - baseline) / baseline if baseline else 0.0
    report = {
        "predictions": args.n, "failures": failures, "seconds": round(time.monotonic() - started, 1),
        "worker_mib_after_50": round(baseline / 2**20, 1), "worker_mib_at_end": round(final / 2**20, 1),
        "memory_growth": round(growth, 4), "temp_files_left": left,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    ok = not failures and growth <= MEMORY_GROWTH_LIMIT and not left
    print("soak: " + ("OK" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
