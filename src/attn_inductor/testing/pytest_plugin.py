"""pytest plugin (``pytest11`` entry point ``attn_inductor``): the ``assert_attention_rewritten`` fixture.

    def test_attention(assert_attention_rewritten):
        assert_attention_rewritten(model, x, expected=2)

The fixture is :func:`attn_inductor.testing.assert_rewritten`; after the test
it resets Dynamo so compiled state does not leak into the next test.  This
module imports nothing heavy at collection time: torch and attn_inductor are
imported only when a test asks for the fixture, so merely having the package
installed does not slow down unrelated pytest runs.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def assert_attention_rewritten():
    """``assert_attention_rewritten(model, *inputs, expected=None, options=None, **kwargs)``; see ``assert_rewritten``."""
    import torch

    from attn_inductor.testing.asserts import assert_rewritten

    yield assert_rewritten
    torch._dynamo.reset()
