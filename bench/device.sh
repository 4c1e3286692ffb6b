#!/usr/bin/env bash
# The one command run on the lent GPU machine (docs/benchmarks.md, "Still to run on a GPU"): installs the
# carried wheels (make gpu-bundle) into a temporary target, records the machine, then bench/device.py
# makes the random full-size weights on the GPU and measures, in priority order, within the budget.
#
#   bench/device.sh [--heavy] [--budget SECONDS] [--size full|tiny] [--device auto|cuda|cpu]
#
# --heavy: the compile-heavy modes (max-autotune, CUDA graphs), a second call. --budget: the seconds
# the whole script may take, install included (default 480: done within 8 minutes on an H200, under
# the device tool's 10-minute command limit). Results go to $OUT (the device tool's folder; else
# build/device): benchmarks.md (ready to paste into docs/benchmarks.md), results.json, machine.txt,
# run.log, server.log: five files, flat, as the tool brings back. PYTHON (default python3, the
# machine's torch) and GPU_BUNDLE (default .gpu-bundle) can be changed: make gpu-rehearsal does.
set -uo pipefail
START=$(date +%s)
COMMAND="bench/device.sh $*"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUNDLE=${GPU_BUNDLE:-.gpu-bundle}
OUT=${OUT:-build/device}
BUDGET=480
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

main() {
ls "$BUNDLE"/*.whl >/dev/null 2>&1 || { echo "no wheels in $BUNDLE: run make gpu-bundle here and carry $BUNDLE" >&2; return 2; }
SITE=$(mktemp -d /tmp/controlnet-site.XXXXXX)
# The device tool's way: no index (the machine reaches none), no dependencies (the machine has them).
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
  --target "$SITE" "$BUNDLE"/*.whl || { echo "installing the bundle failed" >&2; return 2; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
echo "bundle: $(ls "$BUNDLE"/*.whl | wc -l) wheels installed into $SITE in $(( $(date +%s) - START )) s"

{
  echo "# The machine ($(date -u +%FT%TZ)); replace the guesses in bench/gpu-machine.lock with this pip list"
  echo; echo "## nvidia-smi"; nvidia-smi 2>&1 || echo "(no nvidia-smi)"
  echo; echo "## python"; "$PYTHON" -c 'import sys; print(sys.executable, sys.version)'
  echo; echo "## versions as imported (the bundle first on the path)"
  "$PYTHON" -W ignore - <<'EOF' 2>&1
import importlib
for name in ("torch", "torchvision", "triton", "transformers", "huggingface_hub", "tokenizers", "safetensors",
             "accelerate", "numpy", "PIL", "cv2", "scipy", "skimage", "timm", "peft", "diffusers", "controlnet_aux",
             "cog", "pydantic", "fastapi", "starlette", "uvicorn", "structlog", "attrs", "httptools", "uvloop"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} {getattr(module, '__file__', '')}")
    except Exception as exc:
        print(f"{name}: {type(exc).__name__}: {exc}")
import torch
print("torch.version.cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
EOF
  echo; echo "## pip check (the bundle and the machine together)"; "$PYTHON" -m pip check 2>&1
  echo; echo "## pip list (the machine's own packages)"; PYTHONPATH= "$PYTHON" -m pip list --disable-pip-version-check 2>&1
  echo; echo "## cpu"; nproc; free -g 2>/dev/null | head -2
} > "$OUT/machine.txt"
echo "machine recorded in $OUT/machine.txt"

# The budget counts from this script's start; the weights are made inside it.
"$PYTHON" -m bench.device --deadline $((START + BUDGET)) --budget "$BUDGET" --out "$OUT" --command "$COMMAND" ${args[@]+"${args[@]}"}
rc=$?
rm -rf "$SITE"
echo "bench/device.sh: exit $rc after $(( $(date +%s) - START )) s; results in $OUT"
return $rc
}

# Everything it prints also goes to run.log, which comes back even if the run is cut short.
main 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
