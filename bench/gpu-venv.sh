#!/usr/bin/env bash
# A Python 3.12 virtualenv holding exactly bench/gpu-machine.lock (the GPU machine's own packages),
# built once per version of that lock and kept outside the clone, as scripts/venv.sh keeps the main
# one (CI on this machine reuses it; ~5 GB, PyPI's CUDA torch). Prints the virtualenv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${GPU_REHEARSAL_PYTHON:-/root/.pyenv/versions/3.12.1/bin/python3.12}
command -v "$PYTHON" >/dev/null || PYTHON=python3.12
command -v "$PYTHON" >/dev/null || { echo "gpu-rehearsal needs a Python 3.12 (the GPU machine's)" >&2; exit 1; }
key=$( (cat bench/gpu-machine.lock; "$PYTHON" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)
cache=${CONTROLNET_COG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/controlnet-cog}
venv="$cache/gpu-machine-venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "Installing the GPU machine's packages into $venv (first time only: ~4 GB of downloads)..." >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$PYTHON" -m venv "$venv"
  # --no-deps: exactly the lock, so that nothing the GPU machine lacks can be here to hide a gap in the
  # bundle. The machine-wide pip config's cap and find-links are for Python 3.11's torch: ignored.
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    --no-deps -r bench/gpu-machine.lock >&2
  touch "$venv/.complete"
fi
echo "$venv/bin/python"
