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


def _operand_node(graph: fx.Graph, op: Operand, shape: tuple) -> fx.Node:
    node = op.node
    if isinstance(node, tuple):  # ("squeeze2", n): [B, Hkv, 1, L, D] -> [B, Hkv, L, D]
        node = graph.call_function(aten.squeeze.dim, (node[1], 2))
    if op.transposed:
        node = graph.call_function(aten.transpose.int, (node, -2, -1))
    have = _shape_of(op)
    if tuple(have) != tuple(shape):
        node = graph.call_function(aten.reshape.default, (node, list(shape)))
    return node


def _shape_of(op: Operand) -> tuple:
    from .match import _op_shape

    return tuple(_op_shape(op))


def _as_tensor(graph: fx.Graph, node):
    """A captured size (a SymInt the score reads, e.g. ``L - 1`` in a relative-position index) enters the
    op as a 0-d int64 tensor: the op's ``captured`` is a list of tensors."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else node
    if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
        return graph.call_function(aten.scalar_tensor.default, (node,), {"dtype": torch.int64})
    return node


def needs_size_reshape(match: AttentionMatch) -> bool:
    """Would the rewrite reshape an operand or the output to an explicit size list?"""
    return any(tuple(_shape_of(op)) != tuple(shape) for op, shape in
               ((match.q, match.q_shape), (match.k, match.k_shape), (match.v, match.v_shape))) or \
        tuple(match.out_shape) != tuple(match.q_shape[:3] + match.v_shape[3:])


def rewrite_attention(gm: fx.GraphModule, match: AttentionMatch, config: str, any_length: bool = False
                      ) -> fx.Node | None:
    """Insert the op before the P·V node and reroute its users.  Returns the new call node.

    ``any_length`` (Note [dynamic sizes] in backend.py): the graph has symbolic sizes and the shapes in
    ``match`` are their hints, so a rewrite that would reshape to a size list is not made (None)."""
    if any_length and needs_size_reshape(match):
        return None
    graph = gm.graph
    pv = match.output
    with graph.inserting_before(pv):
        q = _operand_node(graph, match.q, match.q_shape)
        k = _operand_node(graph, match.k, match.k_shape)
        v = _operand_node(graph, match.v, match.v_shape)
        captured = [_as_tensor(graph, c) for c in match.captured]
        call = graph.call_function(
            torch.ops.attn_inductor.attention.default,
            (q, k, v, captured, match.spec.to_json(), config),
        )
        out = graph.call_function(operator.getitem, (call, 0))
        out_shape = match.q_shape[:3] + match.v_shape[3:]
        if tuple(match.out_shape) != tuple(out_shape):
            out = graph.call_function(aten.reshape.default, (out, list(match.out_shape)))
    pv.replace_all_uses_with(out)
    graph.erase_node(pv)
    return call
