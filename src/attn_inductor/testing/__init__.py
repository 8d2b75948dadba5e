"""Helpers for testing that attention is rewritten, in a test suite or in CI.

- :func:`assert_rewritten` — one call, fails with the explain table;
- the pytest fixture ``assert_attention_rewritten`` (plugin registered through
  the ``pytest11`` entry point, see :mod:`attn_inductor.testing.pytest_plugin`);
- ``python -m attn_inductor check module:factory`` (:mod:`attn_inductor.testing.cli`).

The numerics rule used by our own tests lives in :mod:`attn_inductor.testing.numerics`.
"""

from .asserts import assert_rewritten, rewrite_problems

__all__ = ["assert_rewritten", "rewrite_problems"]
