"""Match one structural shape anchored at softmax.

    P = softmax(mods(Q·Kᵀ), dim=-1)  [casts, eval dropout]  →  P·V

Every spelling reaches this shape after capture: ``matmul``/``@``/``bmm``/
``einsum``, transposes and ``.mT``, scales on the scores or on q/k, masks as
``masked_fill``/``where``/additive tensors, GQA by ``repeat_interleave`` or
``expand``+``reshape``.  ``match_attention`` returns an :class:`AttentionMatch`
(the spec plus where Q, K, V and the captured tensors come from) or a
:class:`MatchFailure` whose reason ``explain`` prints verbatim.  A rewrite that
cannot be shown equivalent is not done.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from . import expr as E
from .extract import (CASTS, IDENTITY, MATMULS, VIEW_LIKE, ExtractionError, Extractor, _ops, node_dtype,
                      node_shape, reshape_index)
from .spec import AttentionSpec

aten = torch.ops.aten

SOFTMAX_OPS = _ops("softmax.int", "_softmax.default", "_safe_softmax.default")
SOFT_MASK_THRESHOLD = -1.0e4  # Note [soft masks]: a finite fill at or below this acts as a mask


@dataclass
class MatchFailure:
    reason: str
    node: str | None = None

    def __str__(self):
        return f"{self.reason}" + (f" (at node `{self.node}`)" if self.node else "")


@dataclass
class Operand:
    """A [.., L, D] operand: ``node``, transposed over its last two dims if ``transposed``.

    ``node`` may be ``("squeeze2", n)``: ``n`` is [B, Hkv, 1, L, D] (GQA by expand of an unsqueezed source).
    """

    node: object
    transposed: bool = False


@dataclass
class AttentionMatch:
    softmax: fx.Node
    output: fx.Node             # the P·V node whose value we replace
    q: Operand
    k: Operand
    v: Operand
    captured: list[fx.Node]
    spec: AttentionSpec
    out_shape: tuple             # shape of the P·V output the op's [B, H, Lq, Dv] result is reshaped to
    q_shape: tuple               # kernel layouts: [B, Hq, Lq, D], [B, Hkv, Lk, D], [B, Hkv, Lk, Dv]
    k_shape: tuple
    v_shape: tuple

    @property
    def gqa_group(self):
        return self.spec.gqa_group


def find_softmax_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX_OPS]


def _strip_forward(node: fx.Node):
    """Follow single-user casts / identities / eval dropout from softmax toward P·V."""
    cur = node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return cur, users
        u = users[0]
        if u.op == "call_function" and (u.target in CASTS or u.target in IDENTITY):
            cur = u
            continue
        if (u.op == "call_function" and u.target in VIEW_LIKE
                and node_shape(u)[-2:] == node_shape(cur)[-2:] and len(node_shape(u)) >= 2):
            cur = u  # [B, H, Lq, Lk] <-> [B*H, Lq, Lk]: leading dims only
            continue
        if u.op == "call_function" and u.target == aten.dropout.default:
            train = u.args[2] if len(u.args) > 2 else u.kwargs.get("train", False)
            p = u.args[1] if len(u.args) > 1 else u.kwargs.get("p", 0.0)
            if train and p > 0:
                return u, [u]
            cur = u
            continue
        return cur, users


def _einsum_roles(eq: str):
    """Parse a 2-operand einsum; return (lhs, rhs, out) subscripts or None."""
    eq = eq.replace(" ", "")
    m = re.fullmatch(r"([a-zA-Z.]+),([a-zA-Z.]+)->([a-zA-Z.]*)", eq)
    if not m or "." in eq:
        return None
    return m.group(1), m.group(2), m.group(3)


def _matmul_operands(node: fx.Node):
    """(a, b, kind) for a 2-operand matmul-like node computing a @ b over the last two dims."""
    t = node.target
    if t in _ops("einsum"):
        eq, ops = node.args[0], node.args[1]
        if len(ops) != 2:
            return None
        return ops[0], ops[1], ("einsum", eq)
    if t in _ops("baddbmm"):
        return node.args[1], node.args[2], ("baddbmm", None)
    return node.args[0], node.args[1], ("matmul", None)


def match_attention(gm: fx.GraphModule, softmax: fx.Node, *, fully_masked_rows: str = "eager") -> AttentionMatch | MatchFailure:
    try:
        return _match(gm, softmax, fully_masked_rows)
    except ExtractionError as exc:
        return MatchFailure(exc.reason, exc.node.name if exc.node is not None else softmax.name)


def _match(gm, softmax: fx.Node, fully_masked_rows: str):
    x = softmax.args[0]
    rank = len(node_shape(softmax))
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    if dim is None or (dim % rank) != rank - 1:
        return MatchFailure(f"softmax over dim {dim}, not the key dimension (last dim of a rank-{rank} tensor)",
                            softmax.name)
    if rank not in (2, 3, 4):
        return MatchFailure(f"scores of rank {rank}; expected [B, H, Lq, Lk], [B*H, Lq, Lk] or [Lq, Lk]",
                            softmax.name)

    # ---- forward: P → (casts, eval dropout) → P·V
    last, users = _strip_forward(softmax)
    if len(users) != 1:
        others = ", ".join(u.name for u in users) or "nothing"
        return MatchFailure(f"attention probabilities are used by more than one consumer ({others}); "
                            "e.g. returned as attention weights (output_attentions) — they would have to be "
                            "materialized", last.name)
    pv = users[0]
    if pv.op == "call_function" and pv.target == aten.dropout.default:
        return MatchFailure("dropout with p > 0 in training on the attention probabilities "
                            "(in-kernel dropout is not implemented yet)", pv.name)
    if pv.op != "call_function" or pv.target not in MATMULS or pv.target in _ops("baddbmm"):
        return MatchFailure(f"attention probabilities feed `{pv.name}` ({pv.target}), not a P·V matmul", pv.name)
    a, v_node, kind = _matmul_operands(pv)
    if a is not last:
        return MatchFailure("probabilities are the right operand of the matmul (expected P·V)", pv.name)
    p_shape = node_shape(last)
    if kind[0] == "einsum":
        roles = _einsum_roles(kind[1])
        if roles is None:
            return MatchFailure(f"einsum '{kind[1]}' is not a two-operand contraction", pv.name)
        lhs, rhs, out = roles
        if not (len(lhs) == len(p_shape) and lhs[:-2] == out[:-2] == rhs[:-2] and rhs[-2] == lhs[-1]
                and out[-2] == lhs[-2] and out[-1] == rhs[-1]):
            return MatchFailure(f"einsum '{kind[1]}' is not P·V over the key dimension", pv.name)
    out_shape = node_shape(pv)
    if out_shape[:-1] != p_shape[:-1] or len(node_shape(v_node)) != len(p_shape):
        return MatchFailure("P·V broadcasts the probabilities or V over batch dims", pv.name)

    # ---- backward: find the Q·Kᵀ node
    sm_shape = node_shape(softmax)
    score_node = _find_score_node(x, sm_shape)
    if score_node is None:
        return MatchFailure("no Q·Kᵀ matmul found feeding the softmax", softmax.name)
    s_shape = node_shape(score_node)
    qa, kb, skind = _matmul_operands(score_node)

    # ---- kernel layout [B, H, L, D] from the softmax's leading dims
    B, Hq = {4: sm_shape[:2], 3: (sm_shape[0], 1), 2: (1, 1)}[rank]
    Lq, Lk = sm_shape[-2:]

    q_op, k_op, err = _qk_operands(qa, kb, skind, len(s_shape), score_node)
    if err:
        return err
    v_op = Operand(v_node)

    # scale folded into q or k: q * c, k / c
    q_op, q_scale = _normalize_operand(q_op)
    k_op, k_scale = _normalize_operand(k_op)
    v_op, _ = _normalize_operand(v_op, allow_scale=False)

    # GQA: un-repeat K and V
    q_op, k_op, v_op, group, err = _gqa(q_op, k_op, v_op, len(s_shape))
    if err:
        return err
    if Hq % group:
        return MatchFailure(f"{Hq} query heads are not a multiple of the GQA group {group}", score_node.name)
    Hkv = Hq // group
    D = _op_shape(q_op)[-1]
    Dv = _op_shape(v_op)[-1]
    q_shape, k_shape, v_shape = (B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv)
    for name, op, want in (("Q", q_op, q_shape), ("K", k_op, k_shape), ("V", v_op, v_shape)):
        have = _op_shape(op)
        if math.prod(have) != math.prod(want) or tuple(have[-2:]) != tuple(want[-2:]):
            return MatchFailure(f"{name} of shape {list(have)} does not reshape to the kernel's {list(want)} "
                                "(broadcast batch or heads)", score_node.name)

    # ---- the score expression, in the softmax index space
    index = {4: (E.b, E.h, E.q_idx, E.kv_idx), 3: (E.b, E.q_idx, E.kv_idx), 2: (E.q_idx, E.kv_idx)}[rank]
    ranges = {ix.name: (0, n - 1) for ix, n in zip(index, _index_extents(softmax, sm_shape))}
    score_index = tuple(index) if s_shape == sm_shape else reshape_index(s_shape, sm_shape, index)
    ex = Extractor(gm, score_node, score_index, E.score, index_ranges=ranges)
    if skind[0] == "baddbmm":
        beta = score_node.kwargs.get("beta", 1)
        alpha = score_node.kwargs.get("alpha", 1)
        bias = ex.operand(score_node.args[0], score_index, s_shape, "float32")
        ex.score_value = E.call("add", E.call("mul", E.call("to", bias, dtype="float32"), E.const(beta, "float32"),
                                              dtype="float32"),
                                E.call("mul", E.score, E.const(alpha, "float32"), dtype="float32"), dtype="float32")
        ex._memo.clear()
    full = ex.express(x, index)
    full = E.call("to", full, dtype="float32") if full.dtype != "float32" else full

    full = E.simplify(full, ranges)
    spec = _build_spec(full, q_scale * k_scale, group, len(ex.captured), fully_masked_rows)
    if isinstance(spec, MatchFailure):
        spec.node = spec.node or softmax.name
        return spec
    return AttentionMatch(
        softmax=softmax, output=pv, q=q_op, k=k_op, v=v_op, captured=list(ex.captured), spec=spec,
        out_shape=out_shape, q_shape=q_shape, k_shape=k_shape, v_shape=v_shape,
    )


#: the extent of an index whose size is symbolic: any length (Note [dynamic sizes] in backend.py)
UNBOUNDED = 1 << 62


def _index_extents(softmax: fx.Node, shape) -> tuple:
    """Each dim's extent for the range-based simplification of the score (``E.simplify``).

    A dim with a symbolic size (Dynamo's dynamic shapes) may take any length at run time, so its range is
    unbounded: a comparison such as ``q_idx - kv_idx < 64`` must not fold to True because it holds
    for the length the graph was traced at."""
    val = softmax.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return tuple(shape)
    return tuple(UNBOUNDED if isinstance(d, torch.SymInt) and not d.node.expr.is_number else n
                 for d, n in zip(val.shape, shape))


def _find_score_node(x: fx.Node, shape) -> fx.Node | None:
    """The closest matmul-like ancestor producing a tensor of the scores' shape."""
    seen, frontier = set(), [x]
    while frontier:
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            ns = node_shape(n)
            if (n.op == "call_function" and n.target in MATMULS and len(ns) >= 2 and ns[-2:] == tuple(shape[-2:])
                    and math.prod(ns) == math.prod(shape)):
                return n
            if n.op == "call_function":
                for a in n.all_input_nodes:
                    nxt.append(a)
        frontier = nxt
    return None


def _qk_operands(qa, kb, skind, rank, score_node):
    """Q as [.., Lq, D] and K as [.., Lk, D] operands (K is un-transposed)."""
    if skind[0] == "einsum":
        roles = _einsum_roles(skind[1])
        if roles is None:
            return None, None, MatchFailure(f"einsum '{skind[1]}' not understood", score_node.name)
        lhs, rhs, out = roles
        batch = out[:-2]
        qi, ki = out[-2], out[-1]
        contracted = [c for c in lhs if c not in out]
        if len(contracted) != 1 or len(lhs) != rank or len(rhs) != rank:
            return None, None, MatchFailure(f"einsum '{skind[1]}' is not Q·Kᵀ", score_node.name)
        d = contracted[0]
        if lhs != batch + qi + d:
            return None, None, MatchFailure(f"einsum '{skind[1]}': Q layout not understood", score_node.name)
        if rhs == batch + ki + d:
            return Operand(qa), Operand(kb), None
        if rhs == batch + d + ki:
            return Operand(qa), Operand(kb, True), None
        return None, None, MatchFailure(f"einsum '{skind[1]}': K layout not understood", score_node.name)
    if len(node_shape(qa)) != rank or len(node_shape(kb)) != rank:
        return None, None, MatchFailure("Q or Kᵀ is broadcast in the score matmul", score_node.name)
    return Operand(qa), Operand(kb, True), None


def _is_last_two_transpose(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    rank = len(node_shape(node))
    t = node.target
    if t in _ops("mT.default") or (t in _ops("t.default") and rank == 2):
        return True
    if t in _ops("transpose.int"):
        return {node.args[1] % rank, node.args[2] % rank} == {rank - 1, rank - 2}
    if t in _ops("permute.default"):
        perm = [p % rank for p in node.args[1]]
        return perm == list(range(rank - 2)) + [rank - 1, rank - 2]
    return False


def _normalize_operand(op: Operand, allow_scale: bool = True):
    """Strip last-two-dim transposes and python-number scales: (operand, scale)."""
    scale = 1.0
    node, transposed = op.node, op.transposed
    dtype = node_dtype(node)
    while isinstance(node, fx.Node) and node.op == "call_function":
        t, args = node.target, node.args
        if _is_last_two_transpose(node):
            transposed = not transposed
            node = args[0]
        elif not allow_scale:
            break
        elif t in _ops("mul.Scalar", "mul.Tensor") and len(args) == 2 and isinstance(args[1], (int, float)) \
                and node_dtype(args[0]) == dtype:
            scale *= float(args[1])
            node = args[0]
        elif t in _ops("mul.Tensor") and isinstance(args[0], (int, float)) and node_dtype(args[1]) == dtype:
            scale *= float(args[0])
            node = args[1]
        elif t in _ops("div.Scalar", "div.Tensor") and len(args) == 2 and isinstance(args[1], (int, float)) \
                and node_dtype(args[0]) == dtype:
            scale /= float(args[1])
            node = args[0]
        elif t in IDENTITY:
            node = args[0]
        else:
            break
    return Operand(node, transposed), scale


def _unrepeat(node: fx.Node, rank: int):
    """K/V repeated along heads: (source, group) or (node, 1)."""
    if rank != 4 or not isinstance(node, fx.Node) or node.op != "call_function":
        return node, 1
    t = node.target
    if t in _ops("repeat_interleave.self_int"):
        reps = node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if isinstance(reps, int) and dim is not None and dim % 4 == 1:
            return node.args[0], reps
    if t in _ops("reshape", "view", "_unsafe_view"):
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "call_function" and src.target in _ops("clone", "contiguous"):
            src = src.args[0]
        if isinstance(src, fx.Node) and src.op == "call_function" and src.target in _ops("expand"):
            e_in = src.args[0]
            e_shape = node_shape(src)
            out_shape = node_shape(node)
            if (len(e_shape) == 5 and isinstance(e_in, fx.Node) and e_in.op == "call_function"
                    and e_in.target in _ops("unsqueeze") and e_in.args[1] % 5 == 2
                    and out_shape == (e_shape[0], e_shape[1] * e_shape[2], e_shape[3], e_shape[4])):
                return e_in.args[0], e_shape[2]
            if len(e_shape) == 5 and out_shape == (e_shape[0], e_shape[1] * e_shape[2], e_shape[3], e_shape[4]):
                src_shape = node_shape(e_in)
                if len(src_shape) == 5 and src_shape[2] == 1:
                    return ("squeeze2", e_in), e_shape[2]
    return node, 1


def _gqa(q_op: Operand, k_op: Operand, v_op: Operand, rank: int):
    k_src, gk = _unrepeat(k_op.node, rank)
    v_src, gv = _unrepeat(v_op.node, rank)
    if gk == gv and gk > 1:
        k_op = Operand(k_src, k_op.transposed)
        v_op = Operand(v_src, v_op.transposed)
        return q_op, k_op, v_op, gk, None
    return q_op, k_op, v_op, 1, None


def _op_shape(op: Operand):
    node = op.node
    if isinstance(node, tuple):  # ("squeeze2", n)
        s = list(node_shape(node[1]))
        del s[2]
        shape = s
    else:
        shape = list(node_shape(node))
    if op.transposed:
        shape[-1], shape[-2] = shape[-2], shape[-1]
    return tuple(shape)


# ----------------------------------------------------------------------------- spec building

def _is_neg_inf(e: E.Expr) -> bool:
    return isinstance(e, E.Const) and isinstance(e.value, float) and math.isinf(e.value) and e.value < 0


def _is_soft_fill(e: E.Expr) -> bool:
    return (isinstance(e, E.Const) and isinstance(e.value, (int, float)) and not isinstance(e.value, bool)
            and math.isfinite(e.value) and e.value <= SOFT_MASK_THRESHOLD)


def _is_zero(e: E.Expr) -> bool:
    return isinstance(e, E.Const) and e.value == 0


def _strip_to(e: E.Expr) -> E.Expr:
    while isinstance(e, E.Call) and e.op == "to" and E.is_float(e.dtype) and E.is_float(e.args[0].dtype):
        e = e.args[0]
    return e


def _where_mask(term: E.Expr, kept_ok):
    """``where(c, a, b)`` with one branch a fill (-inf: hard, a finite minimum: soft) and the other
    accepted by ``kept_ok``: (kind, keep predicate, kept branch), else None."""
    if not (isinstance(term, E.Call) and term.op == "where") or E.uses_score(term.args[0]):
        return None
    c, a, b_ = term.args
    a, b_ = _strip_to(a), _strip_to(b_)
    for kind, is_fill in (("hard", _is_neg_inf), ("soft", _is_soft_fill)):
        if is_fill(b_) and kept_ok(a):
            return kind, c, a
        if is_fill(a) and kept_ok(b_):
            return kind, E.call("not", c, dtype=E.BOOL), b_
    return None


def split_masks(full: E.Expr):
    """Peel mask terms off the top of the modified score.

    Returns (score_live, hard, soft): ``full`` equals ``score_live`` where
    ``hard & soft`` holds, is -inf where ``hard`` fails, and a huge finite
    negative (plus bounded terms) where only ``soft`` fails.  Only terms that do
    not depend on the score are treated as masks (Note [soft masks]).
    """
    masks = {"hard": None, "soft": None}
    e = full
    changed = True
    while changed:
        changed = False
        e = _strip_to(e)
        found = _where_mask(e, lambda kept: True)        # where(c, x, -inf) / masked_fill
        if found is not None:
            kind, pred, e = found
            masks[kind] = E.and_(masks[kind], pred)
            changed = True
            continue
        if isinstance(e, E.Call) and e.op in ("add", "sub"):
            for keep_i, term_i in ((0, 1), (1, 0)) if e.op == "add" else ((0, 1),):
                term = _strip_to(e.args[term_i])
                if E.uses_score(term):
                    continue
                if e.op == "sub":
                    # x - where(c, 0, +inf) is a hard mask too
                    if isinstance(term, E.Call) and term.op == "where":
                        a, b_ = _strip_to(term.args[1]), _strip_to(term.args[2])
                        if _is_zero(a) and isinstance(b_, E.Const) and b_.value == math.inf:
                            masks["hard"], e, changed = E.and_(masks["hard"], term.args[0]), e.args[keep_i], True
                            break
                    continue
                found = _where_mask(term, _is_zero)          # x + where(c, 0, -inf | finfo.min)
                if found is not None:
                    kind, pred, _ = found
                    masks[kind], e, changed = E.and_(masks[kind], pred), e.args[keep_i], True
                    break
                # (1 - m) * MIN with m a bool cast to float: a soft mask
                c = _bool_times_fill(term)
                if c is not None:
                    masks["soft"], e, changed = E.and_(masks["soft"], c), e.args[keep_i], True
                    break
    return e, masks["hard"], masks["soft"]


def _bool_times_fill(term: E.Expr):
    """Recognise ``(1 - float(m)) * MIN`` / ``float(~m) * MIN`` / ``MIN * ...`` with m bool: returns keep-predicate."""
    if not (isinstance(term, E.Call) and term.op == "mul"):
        return None
    for i in (0, 1):
        fill, other = _strip_to(term.args[i]), _strip_to(term.args[1 - i])
        if not _is_soft_fill(fill):
            continue
        # other must be exactly 0/1 valued: float(bool) or 1 - float(bool)
        if isinstance(other, E.Call) and other.op == "to" and other.args[0].dtype == E.BOOL:
            return E.call("not", other.args[0], dtype=E.BOOL)
        if (isinstance(other, E.Call) and other.op == "sub" and isinstance(_strip_to(other.args[0]), E.Const)
                and _strip_to(other.args[0]).value == 1):
            inner = _strip_to(other.args[1])
            if isinstance(inner, E.Call) and inner.op == "to" and inner.args[0].dtype == E.BOOL:
                return inner.args[0]
    return None


def peel_scale(score_expr: E.Expr):
    """``g(score * c)`` → (g(score), c) when every use of score is multiplied by the same constant."""
    uses = []

    def find(e, parent=None):
        if isinstance(e, E.Score):
            uses.append(parent)
        for ch in e.children():
            find(ch, e)

    find(score_expr)
    if not uses or any(u is None for u in uses):
        return score_expr, 1.0
    consts = set()
    for u in uses:
        if isinstance(u, E.Call) and u.op == "mul":
            other = u.args[1] if isinstance(u.args[0], E.Score) else u.args[0]
            if isinstance(other, E.Const):
                consts.add(("mul", float(other.value)))
                continue
        if isinstance(u, E.Call) and u.op == "truediv" and isinstance(u.args[0], E.Score) and isinstance(u.args[1], E.Const):
            consts.add(("div", float(u.args[1].value)))
            continue
        return score_expr, 1.0
    if len(consts) != 1:
        return score_expr, 1.0
    kind, c = consts.pop()
    if c == 0 or not math.isfinite(c):
        return score_expr, 1.0
    scale = c if kind == "mul" else 1.0 / c
    mapping = {u: E.score for u in uses}
    return E.substitute(score_expr, mapping), scale


def _build_spec(full: E.Expr, operand_scale: float, group: int, num_captured: int, fully_masked_rows: str):
    live, hard, soft = split_masks(full)
    if not E.uses_score(live):
        return MatchFailure("the softmax input does not depend on Q·Kᵀ after masking")
    live, s1 = peel_scale(live)
    scale = operand_scale * s1
    score_full = None
    if soft is not None:
        # keep the exact eager expression for fully soft-masked rows, in the same scaled variable
        fl, s2 = peel_scale(_strip_to(full))
        if s2 == s1:
            score_full = fl
        else:
            score_full = E.substitute(full, {E.score: E.call("truediv", E.score, E.const(s1, "float32"), dtype="float32")}) \
                if s1 != 1.0 else full
        # the hard part of the mask is applied separately; strip -inf terms is unnecessary: entries failing
        # `hard` are -inf in both forms
    return AttentionSpec(score_live=live, mask=hard, soft_mask=soft, score_full=score_full, scale=scale,
                         gqa_group=group, num_captured=num_captured, fully_masked_rows=fully_masked_rows)
