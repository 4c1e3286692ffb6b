"""The README's first command: a real prediction through Cog's HTTP server, start to finish.

Starts the server for one condition (tiny weights when the real ones are absent, said loudly),
sends one prediction on a generated sample image, saves the files to outputs/ and stops the server.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image, ImageDraw

from scripts.cog_config import ROOT
from scripts.cog_server import CogServer
from scripts.predict import encode_image, predict
from scripts.serve import port_number, require_port
from scripts.sizes import weights_gb


def sample_image(path: Path) -> Path:
    """A line drawing of a house: clear edges, lines and regions for every detector."""
    img = Image.new("RGB", (640, 480), (235, 232, 220))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 360, 640, 480], fill=(90, 140, 70))  # lawn
    draw.rectangle([160, 200, 480, 400], fill=(200, 170, 130), outline=(40, 30, 20), width=6)  # walls
    draw.polygon([(140, 210), (320, 80), (500, 210)], fill=(150, 50, 40), outline=(40, 30, 20))  # roof
    draw.rectangle([290, 300, 350, 400], fill=(90, 60, 40), outline=(40, 30, 20), width=4)  # door
    for x in (190, 390):
        draw.rectangle([x, 240, x + 60, 290], fill=(170, 210, 240), outline=(40, 30, 20), width=4)
    draw.ellipse([520, 40, 600, 120], fill=(250, 210, 80))  # sun
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cond", default="canny")
    parser.add_argument("--prompt", default="a cozy cottage with a red roof, photorealistic, golden hour")
    parser.add_argument("--image", default=None, help="your own image instead of the generated drawing")
    parser.add_argument("--sample-only", action="store_true", help="only write the drawing to outputs/sample-input.png")
    parser.add_argument("--port", type=port_number, default=None, help="the Cog server's port (default: a free one)")
    args = parser.parse_args()

    out_dir = ROOT / "outputs"
    if args.sample_only:
        print(sample_image(out_dir / "sample-input.png").relative_to(ROOT))
        return
    if args.port:
        require_port(args.port, who="make quickstart")
    image = Path(args.image) if args.image else sample_image(out_dir / "sample-input.png")
    start = time.monotonic()
    with CogServer(args.cond, port=args.port) as server:
        print(f"Cog server for {args.cond} is READY at {server.url} ({time.monotonic() - start:.1f}s)")
        tiny = "TINY RANDOM-WEIGHT" in server.log()
        paths = predict(server.url, {"image": encode_image(str(image)), "prompt": args.prompt}, out_dir, f"{args.cond}-quickstart")
    print(f"\nDone in {time.monotonic() - start:.1f}s. Input: {image.relative_to(ROOT) if image.is_relative_to(ROOT) else image}")
    for path in paths:
        print(f"  {path.relative_to(ROOT)}")
    print(f"Server log: {server.log_path.relative_to(ROOT)}")
    if tiny:
        print(
            "\n" + "!" * 78 + "\n  These images came from TINY RANDOM-WEIGHT models: they are noise, by design.\n"
            f"  For real images: make weights COND={args.cond}   (needs internet, {weights_gb(args.cond)} GB), then run this again.\n"
            + "!" * 78
        )


if __name__ == "__main__":
    main()
