#!/usr/bin/env bash
# make gpu-rehearsal (CI): bench/device.sh end to end here, as it will run on the GPU machine, but tiny
# and on the CPU: the GPU machine's Python 3.12 packages (bench/gpu-venv.sh, bench/gpu-machine.lock),
# the carried bundle (make gpu-bundle) installed the way device.sh installs it there, both calls (the
# main one and --heavy). Fails if a call fails, a phase does not finish or never ran (the units phase's
# three rows included), or a result file is missing or would not come back from the device tool (at
# most 8 files, 16 MiB each, plain names).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
# One thread per process: on a shared 2-core machine, torch's spinning OpenMP threads made the tiny models
# ten times slower (measured at load 10). Nothing here is a timing.
export OMP_NUM_THREADS=1
python=$(bench/gpu-venv.sh)
out=build/gpu-rehearsal
rm -rf "$out"
mkdir -p "$out/work"
# The weights and scratch files stay out of the folders that would come back.
PYTHON=$python OUT=$out/main bench/device.sh --size tiny --device cpu --budget 900 --work "$out/work"
# --heavy: a budget that fits its reference phases even on a busy machine (at load 12 they left 20 s of
# 120), and one compile mode (aot_eager, as above) only when the machine is idle enough (at load 11 it
# took 94 s): the rehearsal stays bounded on a busy machine.
PYTHON=$python OUT=$out/heavy bench/device.sh --size tiny --device cpu --heavy --budget 150 --work "$out/work"
"$python" - "$out" <<'EOF'
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
problems = []
for call, files, required in (("main", {"benchmarks.md", "results.json", "machine.txt", "run.log", "server.log"},
                               None),
                              ("heavy", {"benchmarks.md", "results.json", "machine.txt", "run.log"},
                               {"reference baseline", "reference served"})):
    folder = out / call
    found = {p.name for p in folder.iterdir()}
    problems += [f"{call}: {name} missing" for name in sorted(files - found)]
    if len(found) > 8:
        problems.append(f"{call}: {len(found)} files, the device tool brings back 8")
    for p in folder.iterdir():
        if not re.fullmatch(r"[A-Za-z0-9._-]+", p.name) or not p.is_file() or p.stat().st_size > 16 * 2**20:
            problems.append(f"{call}: {p.name} would not come back (a plain file, plain name, <= 16 MiB)")
    if "results.json" in found:
        phases = json.loads((folder / "results.json").read_text())["phases"]
        for name, phase in phases.items():
            if (required is None or name in required) and phase["status"] != "done":
                problems.append(f"{call}: phase {name} {phase['status']} {phase.get('why') or phase.get('error', '')}")
        if required and not required <= set(phases):
            problems.append(f"{call}: phases {sorted(required - set(phases))} never ran")
        if call == "main":  # the last phases must have run too, not just those that ran have passed
            for name in ("samples4", "units", "compile all default"):
                if name not in phases:
                    problems.append(f"main: phase {name} never ran")
            rows = phases.get("units", {}).get("rows", {})
            if len(rows) != 3 or "per_added_unit_ms" not in phases.get("units", {}):
                problems.append(f"main: units timed {sorted(rows)}, not 1, 2 and 3 units")
            if "benchmarks.md" in found and "#### Control units" not in (folder / "benchmarks.md").read_text():
                problems.append("main: benchmarks.md has no control-units table")
for problem in problems:
    print(f"REHEARSAL: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
echo "gpu-rehearsal passed in $(( $(date +%s) - start )) s: $out/main/benchmarks.md, $out/heavy/benchmarks.md"
