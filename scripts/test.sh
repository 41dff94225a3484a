#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs memcached and chromium (Debian) and the Python
# dependencies into .venv, then lints, checks types (mypy) and runs pytest. Extra arguments go to pytest
# (e.g. scripts/test.sh -k webhook).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v memcached >/dev/null 2>&1 && [ ! -x /usr/bin/memcached ]; then
    echo "test.sh: installing memcached from Debian's packages" >&2
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq memcached >/dev/null
fi

# The console's browser tests drive Debian's Chromium (Playwright without its own browser download).
if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
    echo "test.sh: installing chromium from Debian's packages" >&2
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# Exact versions from constraints.txt (scripts/lock.sh keeps it current).
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'

.venv/bin/python -m ruff check .
# Types: the files and strictness are in pyproject.toml ([tool.mypy]); any error fails the run.
.venv/bin/python -m mypy
.venv/bin/python -m pytest "$@"
