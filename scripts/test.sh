#!/usr/bin/env bash
# Set up, then run the test suite (CPU; the Triton kernels run under TRITON_INTERPRET=1 in their own tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n 2 "$@"
