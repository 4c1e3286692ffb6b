#!/usr/bin/env bash
# Make .venv point at a virtualenv holding exactly requirements-dev.txt, built once per version of
# the pins and kept outside the clone (CI and fresh clones reuse it; ~5 GB with CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
key=$( (cat requirements.txt requirements-dev.txt; "$PYTHON" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)
cache=${CONTROLNET_COG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/controlnet-cog}
venv="$cache/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "Installing the pinned packages into $venv (first time only: ~3 GB of downloads)..." >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$PYTHON" -m venv "$venv"
  # torch from PyPI is the CUDA build, which also runs on CPU. A machine-wide pip config may add a
  # find-links folder with a CPU-only torch that PyPI's torchvision cannot load: ignore it.
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar on \
    -r requirements-dev.txt
  # A stray coglet would make cog 0.16 switch to a server it cannot drive.
  if "$venv/bin/python" -c 'import coglet' 2>/dev/null; then echo "coglet must not be installed" >&2; exit 1; fi
  touch "$venv/.complete"
fi
ln -sfn "$venv" .venv
