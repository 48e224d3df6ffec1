#!/usr/bin/env bash
# Create .venv and install medanomaly with pinned dependencies. torch==2.13.0 (CPU build) goes in
# first and alone: asked for unpinned, or by another package, pip would fetch GBs of CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
