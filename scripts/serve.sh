#!/usr/bin/env bash
# Install the service's dependencies into .venv (first run only) and start it:
#   scripts/serve.sh --config config.ini
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
EXTRAS=""
if ! command -v ffmpeg >/dev/null 2>&1; then
    EXTRAS="[voice]"  # voice messages need an ffmpeg: take the one the imageio-ffmpeg package ships
fi
# Exact versions from constraints.txt (scripts/lock.sh keeps it current).
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".${EXTRAS}"
exec .venv/bin/python bootstrap.py "$@"
