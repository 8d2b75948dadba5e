#!/usr/bin/env bash
# Create .venv (once) and install attn_inductor with its test extras.
# torch is pinned to the CPU build this project tests against; a GPU machine
# with its own torch (2.11+) can skip this and `pip install -e '.[triton,test]'`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[triton,test]"
