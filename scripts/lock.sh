#!/usr/bin/env bash
# Re-pin constraints.txt: every package `pip install -e '.[test]'` brings into a fresh venv, at the newest
# versions that satisfy pyproject.toml. scripts/serve.sh and scripts/test.sh install with `-c constraints.txt`,
# so every install gets exactly these versions. Run after changing dependencies, review the diff, commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m venv "$TMP/venv"
"$TMP/venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
{
    echo "# Exact versions for every install (pip install -c constraints.txt); regenerate with scripts/lock.sh."
    "$TMP/venv/bin/python" -m pip freeze --disable-pip-version-check --exclude-editable --all \
        | grep -viE '^(pip|setuptools|wheel)=='
} > constraints.txt
echo "lock.sh: constraints.txt has $(grep -c '==' constraints.txt) pins" >&2
