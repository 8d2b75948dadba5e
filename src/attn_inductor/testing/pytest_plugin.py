"""pytest plugin (``pytest11`` entry point ``attn_inductor``): the ``assert_attention_rewritten`` fixture.

    def test_attention(assert_attention_rewritten):
        assert_attention_rewritten(model, x, expected=2)

The fixture is :func:`attn_inductor.testing.assert_rewritten`, plus two pieces
of test hygiene:

- after the test it resets Dynamo, so compiled state does not leak into the
  next test;
- while it runs, pytest's log capture is detached from torch's structured-trace
  logger ``torch.__trace``.  That logger never propagates and is always at
  DEBUG, and pytest attaches its capture handler to every non-propagating
  logger, so a failure report would otherwise end in hundreds of blank
  ``DEBUG torch.__trace`` lines under the explain table.

This module imports nothing heavy at collection time: torch and attn_inductor
are imported only when a test asks for the fixture, so merely having the
package installed does not slow down unrelated pytest runs.
"""

from __future__ import annotations

import functools
import logging

import pytest


def _without_trace_capture(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        __tracebackhide__ = True
        trace_log = logging.getLogger("torch.__trace")
        detached = [h for h in trace_log.handlers if type(h).__name__ == "LogCaptureHandler"]
        for h in detached:
            trace_log.removeHandler(h)
        try:
            return fn(*args, **kwargs)
        finally:
            for h in detached:
                trace_log.addHandler(h)

    return wrapper


@pytest.fixture
def assert_attention_rewritten():
    """``assert_attention_rewritten(model, *inputs, expected=None, options=None, **kwargs)``; see ``assert_rewritten``."""
    import torch

    from attn_inductor.testing.asserts import assert_rewritten

    yield _without_trace_capture(assert_rewritten)
    torch._dynamo.reset()
