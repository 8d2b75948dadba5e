"""CPU attention core: key-tiled online softmax in plain torch.

Why: the naive graph materialises (and for training keeps) a [B, H, Lq, Lk]
score tensor; this path never does.  Each step works on one (q block, kv block)
tile for every batch and head at once, with batched matmuls, so extra memory is
O(B·H·block_m·block_n) plus O(B·H·Lq·D) accumulators.  Scores and masks are
evaluated per tile by ``E.evaluate`` on the IR itself: the score/mask semantics
are the IR's, not a second copy of them.

Implements the core interface that ``runtime.py`` composes (the Triton path in
``templates/launch.py`` has the same three functions):
``core_forward``, ``core_backward``, ``preferred_blocks``.

Invariants
- ``s = scale * (q·k)``, the modified score, the softmax statistics and every
  accumulator are fp32 (fp64 for fp64 inputs, where float32-typed IR nodes are
  widened too); results are cast to the input dtypes once, at the end.
- Tiles follow ``sparsity``'s blocks: EMPTY tiles (for every batch and head)
  are never touched, FULL tiles (for every batch and head) skip the mask.  A
  PARTIAL tile evaluates the mask first and is skipped when nothing passes, so
  a dense-PARTIAL table still skips the causal upper triangle.
- A masked entry is -inf (``minimum`` with a ±inf cap, see ``_tile_mask_cap``);
  a row where nothing passes the mask (or every score is -inf) comes out as
  out = 0, lse = -inf, and contributes nothing to the backward.
- The backward rebuilds P from lse and uses delta = rowsum(dO * out), or
  recomputes both where they are too coarse (Note [backward statistics]).
- Deterministic by construction: tiles are visited in a fixed order and the
  scatter into captured gradients (``index_put_`` with accumulate) is serial on
  CPU, so ``deterministic`` changes nothing here.

What it does not do: dropout, or NaN/Inf in V on keys of skipped tiles (an
EMPTY tile is not read, so a NaN there does not propagate as it would in eager).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .lowering import expr as E
from .lowering.expr import Expr
from .masks.block_sparsity import EMPTY, FULL, PARTIAL, BlockSparsity, dense

__all__ = ["core_forward", "core_backward", "preferred_blocks"]


def preferred_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool = False) -> tuple[int, int]:
    """(block_m, block_n) for the tile loop, the same for forward and backward.

    256 x 256 measured best for causal attention at B=1, H=8, S=2048, D=64 on
    2 cores (128-wide tiles pay more Python per FLOP; 512-wide ones waste more
    of the diagonal).  A tile is [B, Hq, block_m, block_n] and about six of
    them are alive at once, so for large B·Hq the blocks shrink until a tile
    has at most 2**21 elements (8 MiB in fp32).
    """
    tile_rows = q.shape[0] * q.shape[1]
    block_m = min(256, max(q.shape[-2], 1))
    block_n = min(256, max(k.shape[-2], 1))
    while tile_rows * block_m * block_n > _TILE_ELEMENTS and max(block_m, block_n) > 16:
        if block_m >= block_n:
            block_m //= 2
        else:
            block_n //= 2
    return block_m, block_n


_TILE_ELEMENTS = 2 ** 21


# ----------------------------------------------------------------------------- tile plan


@dataclass(frozen=True)
class _Tile:
    kv_start: int
    kv_stop: int
    needs_mask: bool


def _tile_plan(sparsity: BlockSparsity | None, mask: Expr | None, q, k, v, backward: bool):
    """[(q_start, q_stop, [tiles])]: the kv tiles to visit for each q block.

    A kv block is visited when it is non-EMPTY for some (b, h); its mask is
    skipped only when it is FULL for every (b, h).
    """
    if sparsity is None:
        block_m, block_n = preferred_blocks(q, k, v, backward)
        sparsity = dense(block_m=block_m, block_n=block_n, q_len=q.shape[-2], kv_len=k.shape[-2],
                         kind=FULL if mask is None else PARTIAL)
    if (sparsity.q_len, sparsity.kv_len) != (q.shape[-2], k.shape[-2]):
        raise ValueError(f"sparsity is for {sparsity.q_len}x{sparsity.kv_len}, inputs are "
                         f"{q.shape[-2]}x{k.shape[-2]}")
    block_map = sparsity.block_map().cpu()
    visit = (block_map != EMPTY).flatten(0, 1).any(0).tolist()
    all_full = (block_map == FULL).flatten(0, 1).all(0).tolist()
    bm, bn = sparsity.block_m, sparsity.block_n
    lq, lk = sparsity.q_len, sparsity.kv_len
    plan = []
    for i in range(sparsity.num_q_blocks):
        tiles = [
            _Tile(j * bn, min((j + 1) * bn, lk), needs_mask=mask is not None and not all_full[i][j])
            for j in range(sparsity.num_kv_blocks)
            if visit[i][j]
        ]
        plan.append((i * bm, min((i + 1) * bm, lq), tiles))
    return plan


# ----------------------------------------------------------------------------- helpers


def _accumulation_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _widen_fp32(expr: Expr, acc_dtype: torch.dtype) -> Expr:
    """With fp64 accumulation, float32-typed nodes (the IR's native score type and
    every derivative ``E.diff`` returns) are computed in fp64; other dtypes stay."""
    if acc_dtype != torch.float64:
        return expr
    F32, F64 = "float32", "float64"
    memo: dict[Expr, Expr] = {}

    def go(e: Expr) -> Expr:
        if e in memo:
            return memo[e]
        if isinstance(e, E.Const):
            out: Expr = E.Const(e.value, F64) if e.dtype == F32 else e
        elif isinstance(e, E.Load):
            out = E.Load(e.buffer, tuple(go(i) for i in e.indices), F64 if e.dtype == F32 else e.dtype)
        elif isinstance(e, E.Call):
            out = E.Call(e.op, tuple(go(a) for a in e.args), F64 if e.dtype == F32 else e.dtype)
        else:
            out = e
        memo[e] = out
        return out

    return go(expr)


class _TileIndices:
    """Index tensors for one tile, shaped [B,1,1,1], [1,Hq,1,1], [1,1,bm,1], [1,1,1,bn]."""

    def __init__(self, batch: int, heads: int, device):
        self.b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
        self.h = torch.arange(heads, device=device).view(1, heads, 1, 1)
        self.device = device

    def __call__(self, q_start, q_stop, kv_start, kv_stop) -> dict[str, torch.Tensor]:
        return {
            "b": self.b,
            "h": self.h,
            "q_idx": torch.arange(q_start, q_stop, device=self.device).view(1, 1, -1, 1),
            "kv_idx": torch.arange(kv_start, kv_stop, device=self.device).view(1, 1, 1, -1),
        }


def _evaluate(expr: Expr, idx, captured, s4, cache, shape, dtype) -> torch.Tensor:
    if isinstance(expr, E.Score):
        return s4
    return torch.broadcast_to(E.evaluate(expr, idx, captured, s4, cache).to(dtype), shape)


def _tile_mask_cap(mask: Expr | None, tile: _Tile, idx, captured, cache):
    """The tile's mask as a cap for ``torch.minimum``: +inf where it passes, -inf where not.

    None when every entry passes, False when none does.  The cap keeps the
    mask's own (often [1, 1, bm, bn]) shape; ``minimum(x, cap)`` is how the
    score is masked because boolean ``where`` / ``masked_fill`` with a broadcast
    condition run ~40x slower on CPU (torch 2.13).  It gives -inf for every
    masked score but a NaN one, which stays NaN as under an additive -inf mask.
    """
    if not tile.needs_mask:
        return None
    keep = E.evaluate(mask, idx, captured, None, cache)
    if not bool(keep.any()):
        return False
    if bool(keep.all()):
        return None
    return (keep.to(torch.float32) * 2 - 1) * math.inf


def _grouped(t: torch.Tensor, hkv: int, group: int, start: int, stop: int) -> torch.Tensor:
    """[B, Hq, L, X] rows start:stop -> [B, Hkv, group*(stop-start), X] (a copy of the block)."""
    b, _, _, x = t.shape
    return t[:, :, start:stop].reshape(b, hkv, group * (stop - start), x)


@dataclass
class _ScoreTile:
    kv: slice
    s4: torch.Tensor          # scale * q·k, [B, Hq, bm, bn], a view of the [B, Hkv, G*bm, bn] product
    x: torch.Tensor           # modified score, -inf where the mask fails
    idx: dict
    cache: dict               # E.evaluate cache shared by every expression of this tile


def _score_tiles(q_blk, kf, q_start, q_stop, tiles, *, score, mask, scale, captured, tile_indices):
    """Yield the modified score of each visited tile of one q block (skipping tiles the mask empties)."""
    batch, hkv, rows, _ = q_blk.shape
    hq, bm = tile_indices.h.shape[1], q_stop - q_start
    acc = q_blk.dtype
    for tile in tiles:
        idx = tile_indices(q_start, q_stop, tile.kv_start, tile.kv_stop)
        cache: dict = {}
        cap = _tile_mask_cap(mask, tile, idx, captured, cache)
        if cap is False:
            continue
        kv = slice(tile.kv_start, tile.kv_stop)
        s = torch.matmul(q_blk, kf[:, :, kv].transpose(-1, -2)).mul_(scale)
        s4 = s.view(batch, hq, bm, tile.kv_stop - tile.kv_start)
        x = _evaluate(score, idx, captured, s4, cache, s4.shape, acc)
        if cap is not None:
            x = torch.minimum(x, cap)
        yield _ScoreTile(kv, s4, x, idx, cache)


class _OnlineSoftmax:
    """Running row max / row sum over kv tiles; ``update`` returns exp(x - max) and the rescale factor."""

    def __init__(self, shape, dtype, device):
        self.row_max = torch.full(shape, -math.inf, dtype=dtype, device=device)
        self.row_sum = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, x):
        new_max = torch.maximum(self.row_max, x.amax(-1))
        # rows with nothing live so far keep max -inf; shift them by 0 so exp gives 0, not NaN
        shift = torch.where(new_max == -math.inf, 0.0, new_max)
        p = torch.exp(x - shift.unsqueeze(-1))
        correction = torch.exp(self.row_max - shift)
        self.row_sum = self.row_sum * correction + p.sum(-1)
        self.row_max = new_max
        return p, correction

    @property
    def empty(self):
        return self.row_sum == 0

    def lse(self):
        return torch.where(self.empty, -math.inf, self.row_max + torch.log(self.row_sum))


# ----------------------------------------------------------------------------- forward


@torch.no_grad()
def core_forward(q, k, v, captured, *, score, mask, scale, gqa_group, sparsity, row_select=None,
                 empty_rows: str = "zero"):
    """q [B,Hq,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv] (any strides), captured: list of tensors.

    score: Expr (uses E.score = scale*q·k in fp32), mask: bool Expr or None, sparsity: BlockSparsity or None.
    row_select: optional bool [B,Hq,Lq]; unselected rows may be skipped and must come out as out=0, lse=-inf.
    Returns out [B,Hq,Lq,Dv] in v.dtype and lse [B,Hq,Lq] fp32 (natural log).
    A row where no entry passes `mask` gives out = 0 and lse = -inf (NaN out with empty_rows="nan").
    """
    out, lse = _core_forward(q, k, v, captured, score=score, mask=mask, scale=scale, gqa_group=gqa_group,
                             sparsity=sparsity, row_select=row_select)
    if empty_rows == "nan":
        out = out.masked_fill((lse == -math.inf).unsqueeze(-1), math.nan)
    return out, lse


def _core_forward(q, k, v, captured, *, score, mask, scale, gqa_group, sparsity, row_select=None):
    batch, hq, lq, _ = q.shape
    hkv, dv = v.shape[1], v.shape[-1]
    group = gqa_group
    if hq != hkv * group:
        raise ValueError(f"Hq={hq} is not Hkv={hkv} x gqa_group={group}")
    acc = _accumulation_dtype(q)
    score = _widen_fp32(score, acc)
    out = torch.zeros(batch, hq, lq, dv, dtype=acc, device=q.device)
    lse = torch.full((batch, hq, lq), -math.inf, dtype=torch.float32, device=q.device)
    if row_select is not None and not bool(row_select.any()):
        return out.to(v.dtype), lse

    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    tile_indices = _TileIndices(batch, hq, q.device)
    for q_start, q_stop, tiles in _tile_plan(sparsity, mask, q, k, v, backward=False):
        if row_select is not None and not bool(row_select[:, :, q_start:q_stop].any()):
            continue
        bm = q_stop - q_start
        q_blk = _grouped(qf, hkv, group, q_start, q_stop)           # [B, Hkv, G*bm, D]
        softmax = _OnlineSoftmax((batch, hq, bm), acc, q.device)
        acc_blk = torch.zeros(batch, hkv, group * bm, dv, dtype=acc, device=q.device)
        for t in _score_tiles(q_blk, kf, q_start, q_stop, tiles, score=score, mask=mask, scale=scale,
                              captured=captured, tile_indices=tile_indices):
            p, correction = softmax.update(t.x)
            acc_blk.view(batch, hq, bm, dv).mul_(correction.unsqueeze(-1))
            acc_blk.add_(torch.matmul(p.view(batch, hkv, group * bm, -1), vf[:, :, t.kv]))
        acc4 = acc_blk.view(batch, hq, bm, dv)
        # an empty row has acc 0 and sum 0: divide by 1 there (a NaN sum still propagates)
        out[:, :, q_start:q_stop] = acc4 / torch.where(softmax.empty, 1.0, softmax.row_sum).unsqueeze(-1)
        lse[:, :, q_start:q_stop] = softmax.lse().float()
    if row_select is not None:
        out = torch.where(row_select.unsqueeze(-1), out, 0.0)
        lse = torch.where(row_select, lse, -math.inf)
    return out.to(v.dtype), lse


# ----------------------------------------------------------------------------- backward


def core_backward(q, k, v, out, lse, grad_out, captured, captured_needs_grad, *, score, mask, scale,
                  gqa_group, sparsity, deterministic=False, empty_rows: str = "zero"):
    """See ``_core_backward``; ``empty_rows="nan"`` gives eager's NaN gradients for rows whose lse is -inf
    (their dq, and dk/dv of their (batch, kv head)), as the Triton kernels do."""
    dq, dk, dv, dcap = _core_backward(q, k, v, out, lse, grad_out, captured, captured_needs_grad, score=score,
                                      mask=mask, scale=scale, gqa_group=gqa_group, sparsity=sparsity)
    if empty_rows == "nan":
        dead = lse == -math.inf
        batch, hkv = k.shape[0], k.shape[1]
        dq = dq.masked_fill(dead.unsqueeze(-1), math.nan)
        hit = dead.reshape(batch, hkv, -1).any(-1)[:, :, None, None]
        dk, dv = dk.masked_fill(hit, math.nan), dv.masked_fill(hit, math.nan)
    return dq, dk, dv, dcap


@torch.no_grad()
def _core_backward(q, k, v, out, lse, grad_out, captured, captured_needs_grad, *, score, mask, scale,
                   gqa_group, sparsity):
    """Rows whose lse is -inf contribute nothing. Returns dq, dk, dv (input dtypes) and a list with, for each
    captured tensor, its gradient (same shape/dtype) or None where captured_needs_grad[i] is False.

    P is recomputed per tile; dS = P * (dP - delta), chained through d(score)/d(s) and, for captured
    tensors, d(score)/d(load) scattered (accumulated in fp32/fp64) at each Load's indices.  See
    Note [backward statistics] for where lse and delta come from.
    """
    batch, hq, lq, d = q.shape
    hkv, dv = v.shape[1], v.shape[-1]
    group = gqa_group
    acc = _accumulation_dtype(q)
    score = _widen_fp32(score, acc)
    dscore_ds = _widen_fp32(E.diff(score, E.score), acc)
    load_grads = []  # (buffer, Load node, d score / d load) for every Load that needs a gradient
    for load in E.loads(score):
        if captured_needs_grad[load.buffer]:
            dexpr = _widen_fp32(E.diff(score, load), acc)
            if not E.is_const(dexpr, 0.0):
                load_grads.append((load.buffer, load, dexpr))

    dq = torch.zeros(batch, hq, lq, d, dtype=acc, device=q.device)
    dk = torch.zeros(batch, hkv, k.shape[2], d, dtype=acc, device=q.device)
    dvv = torch.zeros(batch, hkv, k.shape[2], dv, dtype=acc, device=q.device)
    dcaptured = [
        torch.zeros(t.shape, dtype=acc, device=t.device) if need else None
        for t, need in zip(captured, captured_needs_grad)
    ]

    dead = lse == -math.inf
    if not bool((~dead).any()):
        return _finish(q, k, v, captured, dq, dk, dvv, dcaptured, scale)
    # dead rows: P is 0 there (lse +inf), and a NaN grad_out/out must not leak through 0 * NaN
    go = grad_out.to(acc)
    if bool(dead.any()):
        go = torch.where(dead.unsqueeze(-1), 0.0, go)
    # Note [absorbed rows]: a row whose scores all sit near finfo.min stores lse = max, with ln(l) lost
    recompute = _stored_statistics_too_coarse(out.dtype, acc) or bool(((lse.abs() >= 4096) & ~dead).any())
    if not recompute:
        lse_all = torch.where(dead, math.inf, lse).to(acc)
        delta_all = torch.where(dead, 0.0, (go * out.to(acc)).sum(-1))
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    tile_indices = _TileIndices(batch, hq, q.device)
    visit = dict(score=score, mask=mask, scale=scale, captured=captured, tile_indices=tile_indices)

    for q_start, q_stop, tiles in _tile_plan(sparsity, mask, q, k, v, backward=True):
        dead_blk = dead[:, :, q_start:q_stop]
        if bool(dead_blk.all()):
            continue
        bm = q_stop - q_start
        q_blk = _grouped(qf, hkv, group, q_start, q_stop)            # [B, Hkv, G*bm, D]
        go_blk = _grouped(go, hkv, group, q_start, q_stop)           # [B, Hkv, G*bm, Dv]
        if recompute:
            # max and log-sum kept apart: exp((x - max) - log_sum) stays exact on absorbed rows
            max_blk, log_sum_blk, delta_blk = _recompute_statistics(
                q_blk, go_blk, kf, vf, q_start, q_stop, tiles, visit)
            max_blk = torch.where(dead_blk, math.inf, max_blk)
            log_sum_blk = torch.where(dead_blk, 0.0, log_sum_blk)
            delta_blk = torch.where(dead_blk, 0.0, delta_blk)
        else:
            max_blk, delta_blk = lse_all[:, :, q_start:q_stop], delta_all[:, :, q_start:q_stop]
            log_sum_blk = torch.zeros_like(max_blk)
        max_blk, log_sum_blk, delta_blk = max_blk.unsqueeze(-1), log_sum_blk.unsqueeze(-1), delta_blk.unsqueeze(-1)
        dq_blk = torch.zeros_like(q_blk)
        for t in _score_tiles(q_blk, kf, q_start, q_stop, tiles, **visit):
            p = torch.exp((t.x - max_blk) - log_sum_blk)                           # [B, Hq, bm, bn]
            dp = torch.matmul(go_blk, vf[:, :, t.kv].transpose(-1, -2)).view(p.shape)
            dx = p * (dp - delta_blk)                                              # d loss / d score
            ds = dx if E.is_const(dscore_ds, 1.0) else dx * _evaluate(
                dscore_ds, t.idx, captured, t.s4, t.cache, p.shape, acc)          # d loss / d s
            ds3 = ds.reshape(batch, hkv, group * bm, -1)
            dq_blk.add_(torch.matmul(ds3, kf[:, :, t.kv]))
            dk[:, :, t.kv].add_(torch.matmul(ds3.transpose(-1, -2), q_blk))
            dvv[:, :, t.kv].add_(torch.matmul(p.view(ds3.shape).transpose(-1, -2), go_blk))
            for i, load, dexpr in load_grads:
                g = dx * _evaluate(dexpr, t.idx, captured, t.s4, t.cache, p.shape, acc)
                at = [torch.broadcast_to(E.evaluate(ix, t.idx, captured, t.s4, t.cache).long(), g.shape)
                      for ix in load.indices]
                if at:
                    dcaptured[i].index_put_(tuple(at), g, accumulate=True)
                else:
                    dcaptured[i].add_(g.sum())
        dq[:, :, q_start:q_stop] = dq_blk.view(batch, hq, bm, d)
    return _finish(q, k, v, captured, dq, dk, dvv, dcaptured, scale)


# Note [backward statistics]
# The backward needs each row's lse (to rebuild P) and delta = rowsum(P * dP)
# = rowsum(grad_out * out).  The stored ones are exact enough when they are as
# fine as the accumulation: fp32 lse and an fp32 out under fp32 accumulation.
# They are not (a) for half-precision out: delta from a rounded out is off by
# ~|out|·2^-9, and a captured gradient weighted by a large, one-signed factor
# (ALiBi's kv_idx - q_idx) multiplies that by the sequence length, since the
# true rowsum of dS is 0; (b) under fp64 accumulation, where the fp32 lse of a
# row with |lse| ~ 100 carries ~4e-6 relative error into P.  Then a first sweep
# over the row block's tiles recomputes lse and delta = rowsum(P * dP) in the
# accumulation dtype (two extra matmuls per tile); rows the caller marked dead
# (lse = -inf) stay dead.


def _stored_statistics_too_coarse(out_dtype: torch.dtype, acc: torch.dtype) -> bool:
    return acc == torch.float64 or torch.finfo(out_dtype).bits < torch.finfo(acc).bits


def _recompute_statistics(q_blk, go_blk, kf, vf, q_start, q_stop, tiles, visit):
    """(row max, log row sum, delta) of one q block in the accumulation dtype; Note [backward statistics].

    Note [absorbed rows]: where every score of a row is near finfo.min (an additive mask the
    matcher could not see into), ``max + log(sum)`` rounds back to ``max`` in fp32, so P rebuilt from
    the stored lse is 1 instead of 1/n.  Keeping the two apart avoids it."""
    batch, hq, bm = q_blk.shape[0], visit["tile_indices"].h.shape[1], q_stop - q_start
    softmax = _OnlineSoftmax((batch, hq, bm), q_blk.dtype, q_blk.device)
    weighted = torch.zeros(batch, hq, bm, dtype=q_blk.dtype, device=q_blk.device)  # sum exp(x - max) * dP
    for t in _score_tiles(q_blk, kf, q_start, q_stop, tiles, **visit):
        p, correction = softmax.update(t.x)
        dp = torch.matmul(go_blk, vf[:, :, t.kv].transpose(-1, -2)).view(p.shape)
        weighted = weighted * correction + (p * dp).sum(-1)
    delta = torch.where(softmax.empty, 0.0, weighted / softmax.row_sum)
    row_max = torch.where(softmax.empty, -math.inf, softmax.row_max)
    log_sum = torch.where(softmax.empty, 0.0, torch.log(softmax.row_sum))
    return row_max, log_sum, delta


def _finish(q, k, v, captured, dq, dk, dv, dcaptured, scale):
    dq = (dq * scale).to(q.dtype)
    dk = (dk * scale).to(k.dtype)
    dcaptured = [None if g is None else g.to(t.dtype) for g, t in zip(dcaptured, captured)]
    return dq, dk, dv.to(v.dtype), dcaptured
