"""Spec semantics composed from the attention core, shared by the CPU and Triton paths.

A core (``cpu.py``, ``templates/launch.py``) only knows "softmax over entries
that pass one mask; a row with none gives out 0, lse -inf".  spec.py asks for
more, and this module builds it from core calls (Note [fully masked rows]):

1. live pass: ``score_live`` over ``live_mask`` (hard & soft), block sparsity of
   ``live_mask``.
2. soft-mask fallback (only when the spec has a soft mask): rows the live pass
   left empty (lse -inf) are recomputed with ``score_full`` over the hard mask,
   with ``row_select`` so an implementation may skip every other row; merged
   with ``torch.where``, no host sync.  This is eager's finfo.min behaviour: a
   row whose every entry got the huge negative averages over its hard entries.
3. rows with no hard entry at all (both lse are -inf): NaN, as eager gives, or
   zeros with ``fully_masked_rows="zeros"``.

The backward mirrors it: a live-pass backward with ``lse`` and a fallback-pass
backward on the rows where ``lse_fallback`` is finite, summed; each pass's lse
is -inf on the other's rows, which then contribute nothing.  The fallback rows
are first recomputed around a per-row shift (one extra forward over those rows
only, see ``_fallback_backward``).  For rows of step 3 under the "eager"
policy the backward reproduces what autograd through the naive additive-mask
graph gives: the row's dq is NaN, dk and dv of the whole (batch, kv head) the row attends are
NaN (every key receives P·dO and dS·q from a NaN row), and each captured
tensor that needs grad is NaN at the entries the row's ``score_full`` loads
(evaluated over all keys).  That last step needs the dead rows on the host, so
it syncs, only when such a captured gradient is requested.

Sparsity: None when the implementation reads no tables for the mask — no mask
(every tile FULL) or closed-form bounds (``impl.reads_no_tables``, Note
[closed-form bounds] in masks/bounds.py) — else a ``BlockSparsity`` built with
``impl.preferred_blocks``: dense FULL without a predicate, else
``get_block_sparsity``.  What it does not do: dropout.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from .lowering import expr as E
from .lowering.expr import Expr
from .lowering.spec import AttentionSpec
from .masks.block_sparsity import FULL, BlockSparsity, dense, get_block_sparsity

__all__ = ["attention_forward", "attention_backward", "block_sparsity_for"]


def block_sparsity_for(pred: Expr | None, q, k, captured, block_m: int, block_n: int) -> BlockSparsity:
    """Tile classes for ``pred`` (None: every tile FULL).  The one place that picks the analysis."""
    batch, heads, q_len = q.shape[0], q.shape[1], q.shape[2]
    kv_len = k.shape[2]
    if pred is None:
        return dense(block_m=block_m, block_n=block_n, q_len=q_len, kv_len=kv_len, device=q.device, kind=FULL)
    # a mask tensor that changes from call to call (padding) is not re-read on the host every call:
    # Note [changing mask tensors] in masks/block_sparsity.py
    return get_block_sparsity(pred, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, captured=captured,
                              block_m=block_m, block_n=block_n, device=q.device, on_change="unknown_loads")


def _sparsity(impl, pred, q, k, v, captured, backward: bool) -> BlockSparsity | None:
    reads_no_tables = getattr(impl, "reads_no_tables", None)
    if reads_no_tables is not None and reads_no_tables(pred):  # no mask, or Note [closed-form bounds]
        return None
    return _tables_for(impl, pred, q, k, v, captured, backward)


def _tables_for(impl, pred, q, k, v, captured, backward: bool) -> BlockSparsity:
    block_m, block_n = impl.preferred_blocks(q, k, v, backward=backward)
    return block_sparsity_for(pred, q, k, captured, block_m, block_n)


def _check(spec: AttentionSpec, q, k, v, captured):
    if spec.dropout_p:
        raise NotImplementedError("attention with dropout is not implemented by the runtime")
    if q.shape[1] != k.shape[1] * spec.gqa_group:
        raise ValueError(f"q has {q.shape[1]} heads, k has {k.shape[1]}, spec says gqa_group={spec.gqa_group}")
    if len(captured) != spec.num_captured:
        raise ValueError(f"spec captures {spec.num_captured} tensors, got {len(captured)}")


def _no_hard_entry(lse: torch.Tensor, lse_fallback: torch.Tensor) -> torch.Tensor:
    """Rows of step 3: neither pass found an entry."""
    dead = lse == -math.inf
    if lse_fallback.numel():
        dead = dead & (lse_fallback == -math.inf)
    return dead


def attention_forward(spec: AttentionSpec, q, k, v, captured: Sequence[torch.Tensor], impl):
    """-> (out [B,Hq,Lq,Dv] in v.dtype, lse [B,Hq,Lq] fp32, lse_fallback).

    ``lse`` is the live pass's (-inf on soft-masked and fully masked rows);
    ``lse_fallback`` is the fallback pass's lse on the rows it computed and -inf
    elsewhere, or an empty tensor when the spec has no soft mask.  Both are
    what ``attention_backward`` needs.
    """
    _check(spec, q, k, v, captured)
    common = dict(scale=spec.scale, gqa_group=spec.gqa_group)
    # without a soft mask, an empty row of the live pass is a row with no hard entry: the core writes
    # eager's NaN directly instead of a second pass over ``out``
    nan_in_core = spec.fully_masked_rows == "eager" and spec.mask is not None and not spec.has_soft_mask
    out, lse = impl.core_forward(
        q, k, v, captured, score=spec.score_live, mask=spec.live_mask,
        sparsity=_sparsity(impl, spec.live_mask, q, k, v, captured, backward=False),
        **({"empty_rows": "nan"} if nan_in_core else {}), **common)
    if spec.has_soft_mask:
        soft_rows = lse == -math.inf
        out_fb, lse_fb = impl.core_forward(
            q, k, v, captured, score=spec.full_score, mask=spec.mask,
            sparsity=_sparsity(impl, spec.mask, q, k, v, captured, backward=False),
            row_select=soft_rows, **common)
        out = torch.where(soft_rows.unsqueeze(-1), out_fb, out)
        lse_fallback = torch.where(soft_rows, lse_fb, -math.inf)
    else:
        lse_fallback = lse.new_empty(0)
    if spec.fully_masked_rows == "eager" and not nan_in_core and _may_have_empty_rows(spec, q, k):
        # only a hard mask can leave a row with no entry at all
        out = _poison_rows(out, _no_hard_entry(lse, lse_fallback))
    return out, lse, lse_fallback


def _rows_always_live(pred: Expr, q_len: int, kv_len: int, device) -> bool:
    """True when every query row has at least one entry passing ``pred`` (causal, sliding window,
    prefix-LM ...), so no row can be fully masked and the NaN-row bookkeeping can be skipped.

    Decided once per (predicate, lengths): exactly for predicates over ``q_idx``/``kv_idx`` only, and
    symbolically for any predicate that holds on the diagonal (document masks, ``_live_on_diagonal``);
    anything else (padding masks) answers False, which is always safe.  Deciding reads
    values on the host, which a CUDA stream capture forbids: a first ask under capture answers False."""
    key = (pred, q_len, kv_len, device)
    hit = _rows_live.get(key)
    if hit is None:
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        hit = _rows_live[key] = _decide_rows_always_live(pred, q_len, kv_len, device)
        while len(_rows_live) > 256:
            _rows_live.pop(next(iter(_rows_live)))
    return hit


_rows_live: dict[tuple, bool] = {}


def _decide_rows_always_live(pred: Expr, q_len: int, kv_len: int, device: torch.device) -> bool:
    if q_len <= kv_len and _live_on_diagonal(pred):  # every row has its diagonal entry, and it passes
        return True
    if not E.free_symbols(pred) <= {"q_idx", "kv_idx"}:
        return False
    kv = torch.arange(kv_len, device=device).view(1, -1)
    rows = max(1, (1 << 16) // max(kv_len, 1))  # bounded memory, like the tiles
    for q0 in range(0, q_len, rows):
        q = torch.arange(q0, min(q0 + rows, q_len), device=device).view(-1, 1)
        keep = E.evaluate(pred, {"q_idx": q, "kv_idx": kv})
        if not bool(torch.broadcast_to(keep, (q.shape[0], kv_len)).any(-1).all()):
            return False
    return True


def _live_on_diagonal(pred: Expr) -> bool:
    """``pred`` holds wherever ``kv_idx == q_idx``, whatever its loads read: ``doc[q_idx] == doc[kv_idx]``
    and ``q_idx >= kv_idx`` become comparisons of an integer with itself.  Proven symbolically (no value
    read), so document masks over any tensor qualify, in either spelling: a model that writes
    ``masked_fill((i < j) | (doc_i != doc_j), -inf)`` keeps ``~(q_idx < kv_idx | doc[q_idx] != doc[kv_idx])``,
    so negations are pushed through (De Morgan).  Anything unproven answers False."""
    def always(e: Expr, negated: bool) -> bool:
        """``e`` is always True (``negated``: always False) on the diagonal."""
        if E.is_const(e):
            return bool(e.value) != negated
        if not isinstance(e, E.Call):
            return False
        if e.op == "not":
            return always(e.args[0], not negated)
        if e.op in ("and", "or"):
            every = (e.op == "and") != negated  # not(a | b) == not a & not b
            parts = (always(a, negated) for a in e.args)
            return all(parts) if every else any(parts)
        if e.op in E.COMPARISONS and e.args[0] == e.args[1] and not E.is_float(e.args[0].dtype):
            # an integer or bool compared with itself (a float may be NaN, which equals nothing)
            return (e.op in ("eq", "le", "ge")) != negated
        return False

    return always(E.substitute(pred, {E.kv_idx: E.q_idx}), False)


def _may_have_empty_rows(spec: AttentionSpec, q, k) -> bool:
    return spec.mask is not None and not _rows_always_live(spec.mask, q.shape[2], k.shape[2], q.device)


def _poison_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """NaN on ``rows`` (a bool tensor of t's leading dims), t elsewhere.

    Adds a NaN/0 tensor of the rows' shape instead of a broadcast boolean
    ``where`` over all of ``t``, which is ~40x slower on CPU (torch 2.13).
    """
    poison = torch.where(rows, math.nan, 0.0).to(t.dtype)
    # in place: ``t`` is always a fresh result of this module, and a copy would double peak memory
    return t.add_(poison.view(*rows.shape, *([1] * (t.dim() - rows.dim()))))


def attention_backward(spec: AttentionSpec, q, k, v, out, lse, lse_fallback, grad_out,
                       captured: Sequence[torch.Tensor], captured_needs_grad: Sequence[bool], impl,
                       deterministic: bool = False):
    """-> (dq, dk, dv, dcaptured): input dtypes; dcaptured[i] is None where not needed.

    Rows with no hard entry: see the module docstring (NaN as eager's autograd
    gives, or no contribution under the "zeros" policy).
    """
    _check(spec, q, k, v, captured)
    common = dict(scale=spec.scale, gqa_group=spec.gqa_group, deterministic=deterministic)
    needs = list(captured_needs_grad)
    eager_nan = spec.fully_masked_rows == "eager" and _may_have_empty_rows(spec, q, k)
    # without a soft mask a dead row of the live pass is a row with no hard entry: the core writes its NaN
    # gradients itself (as the forward writes its NaN output) instead of three passes over dq, dk, dv here
    nan_in_core = eager_nan and not spec.has_soft_mask
    dq, dk, dv, dcap = impl.core_backward(
        q, k, v, out, lse, grad_out, captured, needs, score=spec.score_live, mask=spec.live_mask,
        sparsity=_sparsity(impl, spec.live_mask, q, k, v, captured, backward=True),
        **({"empty_rows": "nan"} if nan_in_core else {}), **common)
    if spec.has_soft_mask:
        fq, fk, fv, fcap = _fallback_backward(spec, q, k, v, lse_fallback, grad_out, captured, needs, impl,
                                              deterministic)
        dq, dk, dv = dq + fq, dk + fk, dv + fv
        dcap = [a if b is None else a + b for a, b in zip(dcap, fcap)]
    if eager_nan:
        dq, dk, dv, dcap = _nan_like_eager(spec, q, k, lse, lse_fallback, dq, dk, dv, dcap, captured, needs,
                                           tensors_done=nan_in_core)
    return dq, dk, dv, dcap


def _nan_loads(spec: AttentionSpec, needs) -> list:
    """The loads of captured tensors whose gradient a NaN row poisons (requested, and reached by the score)."""
    return [ld for ld in E.loads(spec.full_score)
            if needs[ld.buffer] and not E.is_const(E.diff(spec.full_score, ld), 0.0)]


# Note [call sites]
#     Per call, ``attention_forward`` re-derives what only depends on the spec and the tensors'
#     metadata (checks, the NaN-row policy, whether tables are read) and the core looks its launch plan
#     up by a key of some twenty values; on a GPU host that Python is most of what a small attention
#     costs beyond Flex's (docs/benchmarks.md).  ``forward_site`` / ``backward_site`` do it once for a
#     call site: they return a function that, for tensors of the same metadata, computes the sparsity
#     (when tables are read: the mask tensors' cache stays per call, Note [changing mask tensors]) and
#     runs the core's plan directly.  ops.py keys sites by spec, config, every tensor's shape, strides,
#     dtype and device, and the environment's policies, so a site only sees calls the slow path would
#     have planned the same way; a sparsity of another layout (a mask classified with loads unknown,
#     say) returns None and the call takes the slow path.  Specs whose semantics need host work per call
#     (soft masks; captured gradients poisoned by NaN rows) or cores without plans (the CPU path) get no
#     site.
def _site_sparsity(impl, pred, q, k, v, captured, backward: bool):
    """This call's sparsity, and the function giving a later call's: None when no tables are read, False
    when the call's tables have another layout than this one's (its plan does not fit them)."""
    first = _sparsity(impl, pred, q, k, v, captured, backward)
    if first is None:
        return None, lambda q, k, v, captured: None
    layout = impl.sparsity_layout(first)

    def per_call(q, k, v, captured):
        sp = _tables_for(impl, pred, q, k, v, captured, backward)
        return sp if impl.sparsity_layout(sp) == layout else False

    return first, per_call


def forward_site(spec: AttentionSpec, q, k, v, captured: Sequence[torch.Tensor], impl):
    """A function (q, k, v, captured) -> (out, lse, lse_fallback) or None (Note [call sites]); None when the
    spec or implementation has no fast path."""
    if spec.has_soft_mask or not hasattr(impl, "forward_plan"):
        return None
    _check(spec, q, k, v, captured)
    sparsity, sparsity_of = _site_sparsity(impl, spec.live_mask, q, k, v, captured, backward=False)
    nan_in_core = spec.fully_masked_rows == "eager" and spec.mask is not None
    plan = impl.forward_plan(q, k, v, captured, score=spec.score_live, mask=spec.live_mask,
                             gqa_group=spec.gqa_group, sparsity=sparsity, empty_rows="nan" if nan_in_core else "zero")
    scale = spec.scale

    def run(q, k, v, captured):
        sp = sparsity_of(q, k, v, captured)
        if sp is False:
            return None
        out, lse = impl.run_forward(plan, q, k, v, captured, scale=scale, sparsity=sp)
        return out, lse, lse.new_empty(0)

    return run


def backward_site(spec: AttentionSpec, q, k, v, out, lse, grad_out, captured: Sequence[torch.Tensor],
                  captured_needs_grad: Sequence[bool], impl, deterministic: bool = False):
    """A function (q, k, v, out, lse, grad_out, captured) -> (dq, dk, dv, dcaptured) or None (Note [call
    sites]); None when the spec or implementation has no fast path."""
    if spec.has_soft_mask or not hasattr(impl, "backward_plan"):
        return None
    _check(spec, q, k, v, captured)
    needs = [bool(n) for n in captured_needs_grad]
    eager_nan = spec.fully_masked_rows == "eager" and _may_have_empty_rows(spec, q, k)
    if eager_nan and _nan_loads(spec, needs):
        return None
    empty_rows = "nan" if eager_nan else "zero"
    sparsity, sparsity_of = _site_sparsity(impl, spec.live_mask, q, k, v, captured, backward=True)
    if grad_out.dtype != v.dtype:
        grad_out = grad_out.to(v.dtype)
    plan = impl.backward_plan(q, k, v, out, lse, grad_out, captured, needs, score=spec.score_live,
                              mask=spec.live_mask, gqa_group=spec.gqa_group, sparsity=sparsity,
                              deterministic=deterministic, empty_rows=empty_rows)
    scale = spec.scale

    def run(q, k, v, out, lse, grad_out, captured):
        sp = sparsity_of(q, k, v, captured)
        if sp is False:
            return None
        return impl.run_backward(plan, q, k, v, out, lse, grad_out, captured, needs, scale=scale, sparsity=sp,
                                 deterministic=deterministic, empty_rows=empty_rows)

    return run


def _fallback_backward(spec, q, k, v, lse_fallback, grad_out, captured, needs, impl, deterministic):
    """Backward of the soft-mask fallback rows, recomputed around a per-row shift.

    On those rows every score sits near the soft mask's huge negative (finfo.min
    + s rounds to finfo.min), so the fp32 ``lse_fallback`` cannot hold
    ``finfo.min + log(n)`` and ``exp(x - lse)`` would give P = 1, not 1/n.  The
    rows are recomputed with ``score_full - shift`` where ``shift`` is the stored
    ``lse_fallback`` (a captured per-row tensor): shift invariance keeps the
    softmax, the subtraction of two nearby floats is exact, and the new lse is
    small and exact.  ``row_select`` limits the extra forward to those rows.
    """
    rows = lse_fallback != -math.inf                          # NaN rows included: NaN must propagate
    shifted = _shifted_score(spec)
    shifted_captured = [*captured, torch.where(rows, lse_fallback, 0.0)]
    common = dict(scale=spec.scale, gqa_group=spec.gqa_group)
    out_shifted, lse_shifted = impl.core_forward(
        q, k, v, shifted_captured, score=shifted, mask=spec.mask,
        sparsity=_sparsity(impl, spec.mask, q, k, v, captured, backward=False), row_select=rows, **common)
    dq, dk, dv, dcap = impl.core_backward(
        q, k, v, out_shifted, lse_shifted, grad_out, shifted_captured, [*needs, False], score=shifted,
        mask=spec.mask, sparsity=_sparsity(impl, spec.mask, q, k, v, captured, backward=True),
        deterministic=deterministic, **common)
    return dq, dk, dv, dcap[:-1]


@functools.lru_cache(maxsize=256)
def _shifted_score(spec: AttentionSpec) -> Expr:
    """``score_full - shift[b, h, q_idx]`` (the shift is one more captured tensor), built once per spec:
    launch plans key expressions by identity (Note [launch plans] in templates/launch.py)."""
    full = spec.full_score
    shift = E.Load(spec.num_captured, (E.b, E.h, E.q_idx), full.dtype if E.is_float(full.dtype) else "float32")
    return E.call("sub", full, shift, dtype=shift.dtype)


def _nan_like_eager(spec, q, k, lse, lse_fallback, dq, dk, dv, dcap, captured, needs, tensors_done=False):
    """Poison the gradients a NaN row reaches in eager's autograd (module docstring).

    ``tensors_done``: the core already did dq, dk and dv (``empty_rows="nan"``); only captured
    gradients are left, and nothing is computed when none is requested.
    """
    batch, hq, q_len, _ = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    loads = _nan_loads(spec, needs)
    if tensors_done and not loads:
        return dq, dk, dv, dcap
    dead = _no_hard_entry(lse, lse_fallback)
    if not tensors_done:
        dq = _poison_rows(dq, dead)
        kv_heads_hit = dead.view(batch, hkv, spec.gqa_group * q_len).any(-1)
        dk = _poison_rows(dk, kv_heads_hit)
        dv = _poison_rows(dv, kv_heads_hit)
    if not loads or not bool(dead.any()):
        return dq, dk, dv, dcap
    dcap = list(dcap)
    rows = dead.nonzero()                                    # [N, 3]: b, h, q_idx
    chunk_rows, chunk_keys = 1024, 1024                      # bounded, like the tiles
    for r0 in range(0, rows.shape[0], chunk_rows):
        r = rows[r0:r0 + chunk_rows]
        for k0 in range(0, kv_len, chunk_keys):
            idx = {"b": r[:, 0:1], "h": r[:, 1:2], "q_idx": r[:, 2:3],
                   "kv_idx": torch.arange(k0, min(k0 + chunk_keys, kv_len), device=q.device).view(1, -1)}
            cache: dict = {}
            for ld in loads:
                if any(E.uses_score(ix) for ix in ld.indices):  # data-dependent gather: poison it all
                    dcap[ld.buffer] = torch.full_like(dcap[ld.buffer], math.nan)
                    continue
                at = torch.broadcast_tensors(*(E.evaluate(ix, idx, captured, None, cache).long()
                                               for ix in ld.indices)) if ld.indices else ()
                g = dcap[ld.buffer]
                if at:
                    g = g.index_put(tuple(at), torch.full((), math.nan, dtype=g.dtype, device=g.device))
                else:
                    g = torch.full_like(g, math.nan)
                dcap[ld.buffer] = g
    return dq, dk, dv, dcap
