#!/usr/bin/env bash
# Set up, then run the demo: a naive-attention transformer compiled with backend="flexattn".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
