"""The GPU machine's bundle and script (bench/bundle.py, bench/device.py): offline, no GPU.

`make gpu-rehearsal` runs the whole of bench/device.sh on the GPU machine's package versions; these
check the pieces it relies on: the lock's consistency, the wheel folder's upkeep, the budget's
skipping and the report a cut-short run leaves behind.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import bundle

ROOT = Path(__file__).resolve().parent.parent


def requirement_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[bundle.normalize(name)] = version.strip()
    return pins


def test_bundle_pins_are_the_project_pins():
    """The carried packages run what the images run: a bump in requirements.txt must reach the bundle."""
    project = requirement_pins(ROOT / "requirements.txt")
    carried = bundle.pins()
    assert {"diffusers", "controlnet_aux", "cog", "pydantic", "fastapi", "uvicorn", "structlog"} <= set(carried)
    differ = {name: (version, project[name]) for name, version in carried.items() if name in project and project[name] != version}
    assert differ == {}, f"bench/gpu-bundle.lock differs from requirements.txt (bundle, project): {differ}"


def test_bundle_carries_only_what_the_machine_lacks():
    machine = requirement_pins(ROOT / "bench" / "gpu-machine.lock")
    # typing_extensions is carried on purpose: pydantic needs >= 4.16 and the machine's is unrecorded.
    assert set(bundle.pins()) & set(machine) == {"typing_extensions"}
    for name in ("torch", "transformers", "huggingface_hub", "numpy"):
        assert name in machine and name not in bundle.pins()


def fake_wheel(folder: Path, name: str, version: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    path.write_bytes(b"x" * 10)
    return path


def test_sync_keeps_exactly_one_wheel_per_pin(tmp_path, monkeypatch):
    lock = tmp_path / "lock"
    lock.write_text("# why\nfoo-bar==1.0  # needed\nbaz==2.0\n")
    folder = tmp_path / "wheels"
    folder.mkdir()
    keep = [fake_wheel(folder, "foo_bar", "1.0"), fake_wheel(folder, "baz", "2.0")]
    stale = [fake_wheel(folder, "baz", "1.9"), fake_wheel(folder, "gone", "3.0")]
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing to download"))
    assert bundle.sync(folder, lock) == sorted(keep)
    assert not any(p.exists() for p in stale)


def test_sync_downloads_only_the_missing_pins_for_the_machine(tmp_path, monkeypatch):
    lock = tmp_path / "lock"
    lock.write_text("foo==1.0\nbaz==2.0\n")
    folder = tmp_path / "wheels"
    folder.mkdir()
    fake_wheel(folder, "foo", "1.0")
    calls = []

    def download(cmd, check):
        calls.append(cmd)
        fake_wheel(Path(cmd[cmd.index("-d") + 1]), "baz", "2.0")

    monkeypatch.setattr(subprocess, "run", download)
    assert [p.name for p in bundle.sync(folder, lock)] == ["baz-2.0-py3-none-any.whl", "foo-1.0-py3-none-any.whl"]
    (cmd,) = calls
    assert cmd[-1] == "baz==2.0" and "foo==1.0" not in cmd
    assert {"--no-deps", "--only-binary=:all:", "manylinux_2_28_x86_64", "manylinux2014_x86_64"} <= set(cmd)
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("--implementation") + 1] == "cp"
    assert not [p for p in folder.iterdir() if p.is_dir()], "the download's temporary folder is left behind"


def test_sync_fails_when_a_pin_brings_no_wheel(tmp_path, monkeypatch):
    lock = tmp_path / "lock"
    lock.write_text("foo==1.0\n")
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: None)
    with pytest.raises(SystemExit, match="expected one wheel"):
        bundle.sync(tmp_path / "wheels", lock)


def run_in(tmp_path, budget: float):
    from bench import device

    args = SimpleNamespace(size="tiny", heavy=False, deadline=None, budget=budget, out=tmp_path, command="test")
    return device.Run(args), device


def test_a_phase_that_does_not_fit_the_budget_is_skipped_and_said(tmp_path):
    run, device = run_in(tmp_path, budget=3)
    ran = []
    run.phase("served", "served", lambda record: ran.append(record))  # tiny "served" costs 15 s
    assert ran == []
    phase = run.results["phases"]["served"]
    assert phase["status"] == "skipped" and "left of the budget" in phase["why"]
    assert "served (skipped" in (tmp_path / "benchmarks.md").read_text()


def test_a_failed_phase_is_reported_and_the_next_one_runs(tmp_path):
    run, device = run_in(tmp_path, budget=600)

    def broken(record):
        raise RuntimeError("no kernel image for this device")

    def fine(record):
        record.update(setup_ms=1000.0, steps_2={"median_ms": 50.0, "p90_ms": 60.0, "min_ms": 40.0, "runs": 2})

    run.phase("eager negcache", "eager", broken)
    # What a killed run leaves: both files, already saying what failed.
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["phases"]["eager negcache"]["status"] == "failed"
    run.phase("eager vae_guard", "eager", fine)
    text = (tmp_path / "benchmarks.md").read_text()
    assert "eager negcache (failed: RuntimeError: no kernel image for this device)" in text
    assert re.search(r"\| eager vae_guard steps 2 \| 50\.0 \| 60\.0 \| 40\.0 \| 2 \|", text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmarks.md", "results.json"]


def test_the_report_gives_the_ratios_against_the_baseline(tmp_path):
    from bench import device

    timing = lambda ms: {"median_ms": ms, "p90_ms": ms, "min_ms": ms, "runs": 1}
    results = {"invocation": "main", "command": "bench/device.sh", "size": "tiny", "budget_s": 480,
               "elapsed_s": 400, "sample_size": "320x256", "versions": {"gpu": "NVIDIA H200"},
               "phases": {"baseline": {"status": "done", "steps_2": timing(600.0)},
                          "served": {"status": "done", "setup_ms": 4000.0, "steps_2": timing(300.0)},
                          "compile all default": {"status": "done", "setup_ms": 64000.0, "compile_ms": 60000.0,
                                                  "steps_2": timing(200.0),
                                                  "match": {"max_abs": 3, "mean_abs": 0.1, "ok": True}},
                          "samples4": {"status": "skipped", "why": "10 s left of the budget, needs about 20 s"},
                          "units": {"status": "done", "setup_ms": 5000.0, "sample_size": "320x256",
                                    "rows": {"1 unit (canny)": timing(300.0),
                                             "2 units (canny + depth)": {**timing(380.0), "added_ms": 80.0},
                                             "3 units (canny + depth + seg)": {**timing(470.0), "added_ms": 90.0}},
                                    "per_added_unit_ms": 85.0},
                          "compile all reduce-overhead": {"status": "running"}}}
    text = device.markdown(results)
    assert "| ratio served vs baseline (2 steps, baseline / ours) | 2.00x |" in text
    assert "| compile all default | 64.00 | 60.0 | 200.0 | 1.50x | 3.00x | 3 / 0.100 (ok) |" in text
    assert "samples4 (skipped: 10 s left of the budget, needs about 20 s)" in text
    assert "| 1 unit (canny) | 300.0 | 300.0 | 300.0 | 1 | - |" in text
    assert "| 3 units (canny + depth + seg) | 470.0 | 470.0 | 470.0 | 1 | 90.0 |" in text
    assert "Each added unit costs 85.0 ms" in text
    assert "compile all reduce-overhead (still running when this file was written: cut short there" in text
    assert text.startswith("### GPU: NVIDIA H200, tiny size, main call")


def test_tiny_bench_weights_are_the_real_layout(tmp_path, monkeypatch):
    """--size tiny writes what the real loader takes as real weights, and is not mistaken for full size;
    --image multi adds what the multi image needs."""
    import weights
    from bench import weights as bench_weights

    counts = bench_weights.write(tmp_path, device="cpu", size="tiny")
    assert 1e6 < sum(counts.values()) < 1e7
    monkeypatch.setenv("CONTROLNET_WEIGHTS_DIR", str(tmp_path))
    found = weights.locate("canny", prefer="real")
    assert not found.tiny
    for folder in found.folders.values():
        assert weights.marker(folder)["size"] == "tiny" and weights.marker(folder)["bench"] is True
    unet = next((found.base / "unet").glob("*.fp16.safetensors"))
    before = unet.stat().st_mtime_ns
    assert bench_weights.write(tmp_path, device="cpu", size="tiny") == counts  # complete: kept
    assert unet.stat().st_mtime_ns == before

    # The units phase's: what locate("multi") needs, canny's kept, the other ControlNets canny's file.
    assert not _locates(weights, "multi")
    bench_weights.write(tmp_path, device="cpu", size="tiny", image="multi")
    assert unet.stat().st_mtime_ns == before
    multi = weights.locate("multi", prefer="real")
    canny = next(found.controlnet.glob("*.safetensors"))
    for condition in weights.COMBINED["multi"]:
        own = multi.of(condition)
        if condition != "canny":
            assert next(own.controlnet.glob("*.safetensors")).samefile(canny)
            assert weights.marker(own.controlnet)["linked_from"] == found.controlnet.name
        if own.detector:
            assert "stand_in" in weights.marker(own.detector)


def _locates(weights, image: str) -> bool:
    try:
        weights.locate(image, prefer="real")
    except weights.MissingWeightsError:
        return False
    return True
