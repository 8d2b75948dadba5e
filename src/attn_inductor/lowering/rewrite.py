"""Replace a matched P·V node by a call to ``attn_inductor::attention``.

Inputs are brought to the op's [B, H, L, D] layout with views only
(transpose, unsqueeze); the probabilities' producers become dead and are
removed, so no [Lq, Lk] tensor is left in the graph unless something else
still uses it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .match import AttentionMatch, Operand

aten = torch.ops.aten


def _operand_node(graph: fx.Graph, op: Operand, shape: tuple, free: int | None = None) -> fx.Node:
    node = op.node
    if isinstance(node, tuple):  # ("squeeze2", n): [B, Hkv, 1, L, D] -> [B, Hkv, L, D]
        node = graph.call_function(aten.squeeze.dim, (node[1], 2))
    if op.transposed:
        node = graph.call_function(aten.transpose.int, (node, -2, -1))
    have = _shape_of(op)
    if tuple(have) != tuple(shape):
        node = graph.call_function(aten.reshape.default, (node, _size_list(shape, free)))
    return node


def _size_list(shape: tuple, free: int | None) -> list:
    """``shape`` as a reshape's size list; ``free`` (the one size that varies with the length) as -1."""
    sizes = list(shape)
    if free is not None:
        sizes[free] = -1
    return sizes


def _shape_of(op: Operand) -> tuple:
    from .match import _op_shape

    return tuple(_op_shape(op))


def _as_tensor(graph: fx.Graph, node, device):
    """A captured size (a SymInt the score reads, e.g. ``L - 1`` in a relative-position index) enters the
    op as a 0-d int64 tensor on the inputs' device: the op's ``captured`` is a list of tensors."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else node
    if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
        return graph.call_function(aten.scalar_tensor.default, (node,), {"dtype": torch.int64, "device": device})
    return node


RESHAPED = ("q", "k", "v", "out")


def reshape_targets(match: AttentionMatch) -> dict:
    """The size lists the rewrite would reshape to, by name in RESHAPED (only those that differ)."""
    out = {}
    for name, op, shape in (("q", match.q, match.q_shape), ("k", match.k, match.k_shape),
                            ("v", match.v, match.v_shape)):
        if tuple(_shape_of(op)) != tuple(shape):
            out[name] = tuple(shape)
    if tuple(match.out_shape) != tuple(match.q_shape[:3] + match.v_shape[3:]):
        out["out"] = tuple(match.out_shape)
    return out


def rewrite_attention(gm: fx.GraphModule, match: AttentionMatch, config: str, free: dict | None = None
                      ) -> fx.Node:
    """Insert the op before the P·V node and reroute its users.  Returns the new call node.

    ``free`` (Note [dynamic sizes] in backend.py): for a graph with symbolic sizes, whose shapes in
    ``match`` are their hints, the one dim of each reshape target (by name in RESHAPED) that varies with
    the length, written -1."""
    free = free or {}
    graph = gm.graph
    pv = match.output
    with graph.inserting_before(pv):
        q = _operand_node(graph, match.q, match.q_shape, free.get("q"))
        k = _operand_node(graph, match.k, match.k_shape, free.get("k"))
        v = _operand_node(graph, match.v, match.v_shape, free.get("v"))
        device = pv.meta["val"].device if isinstance(pv.meta.get("val"), torch.Tensor) else None
        captured = [_as_tensor(graph, c, device) for c in match.captured]
        call = graph.call_function(
            torch.ops.attn_inductor.attention.default,
            (q, k, v, captured, match.spec.to_json(), config),
        )
        out = graph.call_function(operator.getitem, (call, 0))
        out_shape = match.q_shape[:3] + match.v_shape[3:]
        if tuple(match.out_shape) != tuple(out_shape):
            out = graph.call_function(aten.reshape.default, (out, _size_list(match.out_shape, free.get("out"))))
    pv.replace_all_uses_with(out)
    graph.erase_node(pv)
    return call
