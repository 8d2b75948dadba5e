"""Capture: a Dynamo FX graph → an aten-level graph the matcher can read.

``make_fx(pre_dispatch=True)`` under Dynamo's own fake mode keeps attention at a
convenient level (``aten.matmul``, ``aten.softmax.int``, ``aten.masked_fill``,
``aten.tril``, ``aten.to.dtype`` ...), records fake-tensor metadata on every
node (``meta["val"]``) and leaves autograd to AOTAutograd later, so the
rewritten graph goes straight to ``compile_fx`` with backward support.

It does not functionalise: in-place ops stay in the graph and the extractor
treats them conservatively (see ``lowering/extract.py``).
"""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from .. import _compat


class CaptureError(RuntimeError):
    """The graph could not be re-traced at aten level; the caller falls back to stock Inductor."""


def _refuse_higher_order_ops(gm: torch.fx.GraphModule) -> None:
    """Note [higher-order ops]: ``make_fx`` inlines an ``autograd.Function`` (or a checkpointed region)
    as plain ops run under no_grad, which would silently drop its backward.  So this whole-graph capture
    never sees such graphs: the backend sends them to ``regions.py`` (Note [region capture]), which keeps
    the HOPs opaque.  The check stays here so that a direct caller cannot lose a backward either."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
            name = getattr(node.target, "__name__", str(node.target))
            raise CaptureError(
                f"graph contains the higher-order op `{name}` (an autograd.Function, activation "
                f"checkpointing, ...); re-tracing it would lose its backward")


def capture_aten_graph(gm: torch.fx.GraphModule, example_inputs) -> torch.fx.GraphModule:
    _refuse_higher_order_ops(gm)
    fakes = _compat.placeholder_fakes(gm)
    fake_mode = _compat.fake_mode_of_graph(gm)
    if fake_mode is None or len(fakes) != len(example_inputs) or any(f is None for f in fakes):
        raise CaptureError("Dynamo recorded no fake inputs for this graph")
    try:
        with fake_mode:
            aten_gm = make_fx(gm, pre_dispatch=True, tracing_mode="real")(*fakes)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "leave it to Inductor"
        raise CaptureError(f"aten re-trace failed: {type(exc).__name__}: {exc}") from exc
    return aten_gm
