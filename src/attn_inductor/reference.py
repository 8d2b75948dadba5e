"""The oracle: AttentionSpec semantics computed densely, and the naive eager maths.

``reference_attention`` reads spec.py's contract literally — live entries,
the soft-mask fallback, rows with no hard entry — on a materialised
[B, Hq, Lq, Lk] score in ``compute_dtype`` (fp64 by default, every float node
of the IR widened to it).  It shares no code with the tiled implementations
and is differentiable, so autograd on it is the gradient oracle for q, k, v
and every captured tensor.

``eager_in_dtype`` is what an unmodified model computes: one softmax over
``where(hard, score_full, -inf)`` in fp32, matmuls in the input dtype.  Its
error against the fp64 oracle is the yardstick of the numerics rule in
``testing/numerics.py``.

What it does not do: dropout, or anything at scale (it is O(Lq·Lk) memory).
Autograd through a row with no hard entry gives zero gradients here (the row
is a constant NaN); eager's NaN gradients for such rows are emulated by
``runtime.attention_backward`` and tested against a plain eager function.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .lowering import expr as E
from .lowering.expr import Expr
from .lowering.spec import AttentionSpec

__all__ = ["reference_attention", "eager_in_dtype"]


def _in_dtype(expr: Expr, dtype: torch.dtype) -> Expr:
    """Every float-typed node of ``expr`` computed in ``dtype`` (int/bool nodes unchanged)."""
    name = E.dtype_name(dtype)

    def go(e: Expr) -> Expr:
        if isinstance(e, E.Const):
            return E.Const(e.value, name) if E.is_float(e.dtype) else e
        if isinstance(e, E.Load):
            return E.Load(e.buffer, tuple(go(i) for i in e.indices), name if E.is_float(e.dtype) else e.dtype)
        if isinstance(e, E.Call):
            return E.Call(e.op, tuple(go(a) for a in e.args), name if E.is_float(e.dtype) else e.dtype)
        return e

    return go(expr)


def _full_indices(batch: int, heads: int, q_len: int, kv_len: int, device) -> dict[str, torch.Tensor]:
    return {
        "b": torch.arange(batch, device=device).view(batch, 1, 1, 1),
        "h": torch.arange(heads, device=device).view(1, heads, 1, 1),
        "q_idx": torch.arange(q_len, device=device).view(1, 1, q_len, 1),
        "kv_idx": torch.arange(kv_len, device=device).view(1, 1, 1, kv_len),
    }


def _predicate(pred: Expr | None, idx, captured, shape) -> torch.Tensor:
    device = idx["b"].device
    if pred is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return torch.broadcast_to(E.evaluate(pred, idx, captured), shape)


def _repeat_kv(spec: AttentionSpec, k: torch.Tensor, v: torch.Tensor):
    if spec.gqa_group == 1:
        return k, v
    return k.repeat_interleave(spec.gqa_group, dim=1), v.repeat_interleave(spec.gqa_group, dim=1)


def reference_attention(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    captured: Sequence[torch.Tensor],
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B,Hq,Lq,Dv], lse [B,Hq,Lq]) in ``compute_dtype``, by spec.py's semantics.

    ``lse`` is the log-sum-exp of the entries the row's softmax used (live
    entries, or hard entries for a soft-masked row) and -inf for a row with no
    hard entry, whose out is NaN (``fully_masked_rows="eager"``) or 0.
    """
    if spec.dropout_p:
        raise NotImplementedError("reference_attention has no dropout")
    cd = compute_dtype
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    captured = [t.to(cd) if t.is_floating_point() else t for t in captured]
    k, v = _repeat_kv(spec, k, v)
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    shape = (batch, heads, q_len, kv_len)
    idx = _full_indices(batch, heads, q_len, kv_len, q.device)

    s = spec.scale * (q @ k.transpose(-1, -2))
    score_live = torch.broadcast_to(E.evaluate(_in_dtype(spec.score_live, cd), idx, captured, s), shape)
    score_full = torch.broadcast_to(E.evaluate(_in_dtype(spec.full_score, cd), idx, captured, s), shape)
    hard = _predicate(spec.mask, idx, captured, shape)
    live = hard & _predicate(spec.soft_mask, idx, captured, shape)

    row_has_live = live.any(-1, keepdim=True)
    row_has_hard = hard.any(-1, keepdim=True)
    neg_inf = torch.full((), -math.inf, dtype=cd, device=q.device)
    logits = torch.where(
        row_has_live,
        torch.where(live, score_live, neg_inf),   # softmax over live entries of score_live
        torch.where(hard, score_full, neg_inf),   # soft-masked row: hard entries of score_full
    )
    # a row with no hard entry is a constant; 0 logits keep autograd finite through it
    logits = torch.where(row_has_hard, logits, torch.zeros((), dtype=cd, device=q.device))
    out = torch.softmax(logits, dim=-1) @ v
    lse = torch.logsumexp(logits, dim=-1)

    dead_value = math.nan if spec.fully_masked_rows == "eager" else 0.0
    out = torch.where(row_has_hard, out, torch.full((), dead_value, dtype=cd, device=q.device))
    lse = torch.where(row_has_hard.squeeze(-1), lse, neg_inf)
    return out, lse


def eager_in_dtype(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    captured: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in v.dtype, lse fp32 or fp64): the naive model's maths in the input dtype.

    ``q @ kᵀ * scale`` in the input dtype, the score expression in the IR's own
    dtypes, one softmax in fp32 (fp64 for fp64 inputs) over ``where(hard, score_full, -inf)`` (a row of
    finfo.min entries averages its hard entries, a row of -inf gives NaN, as
    eager does), probabilities cast back and multiplied with V in the input dtype.
    """
    if spec.dropout_p:
        raise NotImplementedError("eager_in_dtype has no dropout")
    k, v = _repeat_kv(spec, k, v)
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    shape = (batch, heads, q_len, kv_len)
    idx = _full_indices(batch, heads, q_len, kv_len, q.device)

    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    s = ((q @ k.transpose(-1, -2)) * spec.scale).to(softmax_dtype)
    score_full = torch.broadcast_to(E.evaluate(spec.full_score, idx, captured, s), shape).to(softmax_dtype)
    hard = _predicate(spec.mask, idx, captured, shape)
    logits = score_full.masked_fill(~hard, -math.inf)
    p = torch.softmax(logits, dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    if spec.fully_masked_rows == "zeros":
        p = torch.nan_to_num(p, nan=0.0)
    out = p.to(v.dtype) @ v
    return out, lse
