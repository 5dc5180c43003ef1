#!/usr/bin/env bash
# Create/refresh the project virtualenv (.venv) from the project's own files. Idempotent.
# torch is pinned (==2.13.0, CPU build) in pyproject's worker extra: a loose requirement would
# pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.edgepress-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[worker,dev]'
  touch "$stamp"
fi
