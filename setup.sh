#!/usr/bin/env bash
# Install bdseal and everything it needs into .venv (torch pinned to 2.13.0 by constraints.txt),
# then run the quick start (`bdseal demo`: BadNets on the embedded digits, undefended vs defended, one table).
# `./setup.sh --no-run` only installs.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev,cluster,fm]' -c constraints.txt
if [ "${1:-}" != "--no-run" ]; then
  .venv/bin/bdseal demo
fi
