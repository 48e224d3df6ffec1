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
# Optional: Debian's chromium and chromium-driver, for the end-to-end browser test of the web viewer
# (tests/test_serve.py; it skips without them). Installed in CI (CI=true, as root) or when asked with
# MEDANOMALY_INSTALL_BROWSER=1.
if { [ "${CI:-}" = true ] || [ "${MEDANOMALY_INSTALL_BROWSER:-}" = 1 ]; } \
        && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
            >/dev/null 2>&1 || echo "chromium not installed; the browser test will skip" >&2
    else
        echo "chromium not installed (needs root and apt-get); the browser test will skip" >&2
    fi
fi
