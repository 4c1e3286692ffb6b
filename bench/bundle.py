"""`make gpu-bundle`: the wheels the lent GPU machine lacks (bench/gpu-bundle.lock) into .gpu-bundle/.

CPython 3.12 manylinux x86_64 wheels, the machine's interpreter and platform, downloaded from PyPI
with `pip download --no-deps --only-binary=:all:` (the device tool's README: pip matches each
manylinux tag exactly, so every tag such a machine accepts is named). Exactly one wheel per lock line:
wheels of an older lock are removed (two versions of one package stop the whole install there).
Stdlib only, so any python3 with pip runs it. The folder travels to the machine with the device
tool's `carry` (the working tree and it must stay under 64 MiB together), so its size is checked.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "bench" / "gpu-bundle.lock"
DEFAULT_DIR = ROOT / ".gpu-bundle"
LIMIT_MIB = 40  # of the 64 MiB that travels; the working tree itself is under 1 MiB
PYTHON_VERSION = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def normalize(name: str) -> str:
    """Wheel file names spell the project with underscores, locks with anything (PEP 503 / 427)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def pins(lock: Path = LOCK) -> dict[str, str]:
    out = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            if not version:
                raise SystemExit(f"{lock}: every line must be name==version, not {line!r}")
            out[normalize(name)] = version.strip()
    return out


def wheel_key(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return normalize(name), version


def sync(folder: Path, lock: Path = LOCK) -> list[Path]:
    wanted = pins(lock)
    folder.mkdir(parents=True, exist_ok=True)
    have = {}
    for wheel in folder.glob("*.whl"):
        key = wheel_key(wheel)
        if wanted.get(key[0]) == key[1]:
            have[key[0]] = wheel
        else:
            wheel.unlink()  # another version, or no longer in the lock
    missing = [f"{name}=={version}" for name, version in wanted.items() if name not in have]
    if missing:
        # Into a fresh folder first, so an interrupted download leaves no half wheel behind.
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                   "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
                   *[arg for p in PLATFORMS for arg in ("--platform", p)], "-d", tmp, *missing]
            print(f"downloading {len(missing)} wheel(s) for CPython {PYTHON_VERSION} manylinux x86_64", flush=True)
            subprocess.run(cmd, check=True)
            for wheel in Path(tmp).glob("*.whl"):
                wheel.rename(folder / wheel.name)
    wheels = sorted(folder.glob("*.whl"))
    got = {wheel_key(w)[0]: w for w in wheels}
    if sorted(got) != sorted(wanted) or len(wheels) != len(wanted):
        raise SystemExit(f"{folder}: expected one wheel for each of {sorted(wanted)}, found {[w.name for w in wheels]}")
    return wheels


def working_tree_bytes() -> int | None:
    """What the device tool sends besides the carried folder: tracked and untracked-not-ignored files."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((ROOT / name.decode()).stat().st_size for name in names if name and (ROOT / name.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--lock", type=Path, default=LOCK)
    args = parser.parse_args(argv)
    wheels = sync(args.dir, args.lock)
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:7.2f} MiB  in all, {len(wheels)} wheels in {args.dir} (limit {LIMIT_MIB} MiB)")
    tree = working_tree_bytes()
    if tree is not None:
        print(f"travels to the GPU machine: working tree {tree / 2**20:.2f} MiB + bundle {total / 2**20:.2f} MiB "
              f"= {(tree + total) / 2**20:.2f} MiB of 64")
    if total > LIMIT_MIB * 2**20:
        print(f"the bundle is over {LIMIT_MIB} MiB: it and the working tree must travel in 64 MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
