"""``python -m attn_inductor check module:factory [--expect N] [--json out.json]``; see ``testing/cli.py``."""

import sys

from .testing.cli import main

if __name__ == "__main__":
    sys.exit(main())
