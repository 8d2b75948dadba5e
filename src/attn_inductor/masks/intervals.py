"""Sound interval bounds of the expression IR over boxes of indices.

Block classification asks, for every (q block, kv block) tile at once: is the
mask predicate True on every entry, False on every entry, or neither?  We
answer by evaluating the IR on *boxes* instead of points: ``b`` and ``h`` are
exact points, ``q_idx`` / ``kv_idx`` range over a tile's in-range part.  All
tiles are evaluated together with broadcasting torch ops, so the cost is a few
elementwise passes over the [Bm, Hm, NQ, NK] tile grid, never a loop over tiles.

Values
- numeric node -> :class:`Interval` ``(lo, hi, nan)``: every non-NaN value eager
  could compute lies in ``[lo, hi]``; ``nan`` says NaN is possible.  Integers
  are held in int64 whatever their IR dtype (the range check against the IR
  dtype is explicit); floats are held in the IR dtype, so endpoint arithmetic
  rounds exactly as eager does.
- bool node -> :class:`Truth` ``(must, may)``: three-valued logic.

Soundness argument, in one line per family (see Note [monotone rounding]):
- add/sub/mul/div/sqrt, casts, floor/ceil/round: eager's result is a monotone
  function of each argument, so the same op applied to endpoints bounds it.
- transcendental functions (exp, log, tanh, ...): libm is accurate to a few
  ulps but not guaranteed monotone, so endpoints are widened by several ulps.
- integer overflow wraps in eager; wherever it is possible the interval becomes
  the full range of the dtype.  NaN, division by an interval holding 0, ``pow``,
  anything not understood: the widest interval.  Wider is always sound.

Loads read the captured tensor at run time: exact gathers for point indices,
min/max over the index box otherwise (block-wise window reductions, a sparse
table for overlapping ranges, the whole dimension as the fallback).

What it does not do: relational reasoning.  ``q_idx - q_idx`` is an interval of
width 2·block, not 0, so predicates that only cancel symbolically come out
PARTIAL (sound, not tight).

Note [monotone rounding]
  Round-to-nearest is monotone, and a composition of monotone maps is monotone.
  If x ≤ x' then fl(x ⊕ y) ≤ fl(x' ⊕ y) for IEEE-correctly-rounded ⊕, so the
  eager op evaluated at interval corners bounds eager's result at any point of
  the box.  half/bfloat16 CPU kernels compute in float32 and round again: still
  a composition of monotone maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..lowering import expr as E
from ..lowering.expr import Call, Const, Expr, Index, Load, Score

# widening for functions whose libm implementation is accurate but not monotone
_TRANSCENDENTAL_ULPS = 8
# bound on the number of elements a Load reduction may materialise at once
LOAD_REDUCTION_BUDGET = 1 << 24
# int64 endpoints below this magnitude cannot overflow when added or subtracted
_INT_SAFE = 1 << 62


@dataclass(frozen=True)
class Interval:
    """Bounds of a numeric node; tensors broadcast against the tile grid."""

    lo: torch.Tensor
    hi: torch.Tensor
    nan: torch.Tensor  # bool: NaN may occur
    dtype: torch.dtype  # eager dtype (int dtypes are stored as int64)

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


@dataclass(frozen=True)
class Truth:
    """Three-valued bool: ``must`` ⇒ True everywhere, ``~may`` ⇒ False everywhere."""

    must: torch.Tensor
    may: torch.Tensor


Bounds = Interval | Truth


# ----------------------------------------------------------------------------- constructors


def _scalar(value, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.full((), value, dtype=dtype, device=device)  # a fill, not a host-to-device copy (a sync)


def _storage(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point else torch.int64


def _int_limits(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dtype)
    return info.min, info.max


def widest(dtype: torch.dtype, device) -> Bounds:
    """The always-sound answer: every value of ``dtype`` (NaN included)."""
    if dtype == torch.bool:
        return Truth(_scalar(False, torch.bool, device), _scalar(True, torch.bool, device))
    if dtype.is_floating_point:
        return Interval(_scalar(-math.inf, dtype, device), _scalar(math.inf, dtype, device),
                        _scalar(True, torch.bool, device), dtype)
    mn, mx = _int_limits(dtype)
    return Interval(_scalar(mn, torch.int64, device), _scalar(mx, torch.int64, device),
                    _scalar(False, torch.bool, device), dtype)


def point(value: torch.Tensor, dtype: torch.dtype | None = None) -> Bounds:
    """The exact bounds of a known tensor of values."""
    dtype = value.dtype if dtype is None else dtype
    if dtype == torch.bool:
        v = value.to(torch.bool)
        return Truth(v, v)
    v = value.to(_storage(dtype))
    nan = torch.isnan(v) if dtype.is_floating_point else torch.zeros((), dtype=torch.bool, device=v.device)
    return _settle(Interval(v, v, nan, dtype))


def _settle(iv: Interval) -> Interval:
    """Where NaN is possible (or an endpoint is NaN), forget the range: NaN ⇒ unknown."""
    if not iv.is_float:
        return iv
    nan = iv.nan | torch.isnan(iv.lo) | torch.isnan(iv.hi)
    lo = torch.where(nan, _scalar(-math.inf, iv.dtype, iv.lo.device), iv.lo)
    hi = torch.where(nan, _scalar(math.inf, iv.dtype, iv.lo.device), iv.hi)
    return Interval(lo, hi, nan, iv.dtype)


def _fit_int(lo: torch.Tensor, hi: torch.Tensor, ok: torch.Tensor | None, dtype: torch.dtype) -> Interval:
    """Exact int64 endpoints, widened to the dtype's full range wherever eager could wrap."""
    mn, mx = _int_limits(dtype)
    fits = (lo >= mn) & (hi <= mx)
    if ok is not None:
        fits = fits & ok
    lo = torch.where(fits, lo, _scalar(mn, torch.int64, lo.device))
    hi = torch.where(fits, hi, _scalar(mx, torch.int64, hi.device))
    return Interval(lo, hi, torch.zeros((), dtype=torch.bool, device=lo.device), dtype)


def _int_small(*ts: torch.Tensor) -> torch.Tensor:
    ok = None
    for t in ts:
        c = (t > -_INT_SAFE) & (t < _INT_SAFE)
        ok = c if ok is None else ok & c
    return ok


def _widen_ulps(iv: Interval, steps: int) -> Interval:
    lo, hi = iv.lo, iv.hi
    down = torch.full_like(lo, -math.inf)
    up = torch.full_like(hi, math.inf)
    for _ in range(steps):
        lo = torch.nextafter(lo, down)
        hi = torch.nextafter(hi, up)
    return Interval(lo, hi, iv.nan, iv.dtype)


# ----------------------------------------------------------------------------- conversions


def convert(v: Bounds, dtype: torch.dtype) -> Bounds:
    """Bounds of ``x.to(dtype)`` (truncation toward zero for float → int)."""
    if isinstance(v, Truth):
        if dtype == torch.bool:
            return v
        lo, hi = v.must.to(torch.int64), v.may.to(torch.int64)
        zero = torch.zeros((), dtype=torch.bool, device=lo.device)
        return convert(Interval(lo, hi, zero, torch.uint8), dtype)
    if dtype == torch.bool:  # nonzero test; NaN is truthy
        must = (v.lo > 0) | (v.hi < 0)
        may = (v.lo != 0) | (v.hi != 0) | v.nan
        return Truth(must, may)
    if dtype.is_floating_point:
        return _settle(Interval(v.lo.to(dtype), v.hi.to(dtype), v.nan, dtype))
    mn, mx = _int_limits(dtype)
    if not v.is_float:
        return _fit_int(v.lo, v.hi, None, dtype)
    lo64, hi64 = v.lo.to(torch.float64), v.hi.to(torch.float64)
    ok = ~v.nan & (lo64 > mn - 1.0) & (hi64 < mx + 1.0)
    # the clamp leaves every `ok` endpoint alone and keeps the rest convertible
    top = float((1 << 63) - 1024)  # largest float64 below 2**63
    lo = torch.nan_to_num(lo64).clamp(-top, top).trunc().to(torch.int64)
    hi = torch.nan_to_num(hi64).clamp(-top, top).trunc().to(torch.int64)
    return _fit_int(lo, hi, ok, dtype)


def _as_interval(v: Bounds, dtype: torch.dtype) -> Interval:
    out = convert(v, dtype)
    assert isinstance(out, Interval)
    return out


def _as_truth(v: Bounds) -> Truth:
    out = convert(v, torch.bool)
    assert isinstance(out, Truth)
    return out


# ----------------------------------------------------------------------------- arithmetic


def _hull(parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lo = hi = parts[0]
    for p in parts[1:]:
        lo, hi = torch.minimum(lo, p), torch.maximum(hi, p)
    return lo, hi


def _has_inf(iv: Interval) -> torch.Tensor:
    return torch.isinf(iv.lo) | torch.isinf(iv.hi)


def _holds_zero(iv: Interval) -> torch.Tensor:
    return (iv.lo <= 0) & (iv.hi >= 0)


def _binary_int(op: str, a: Interval, b: Interval, dtype: torch.dtype) -> Interval:
    dev = a.lo.device
    one = _scalar(1, torch.int64, dev)
    if op in ("add", "sub", "mul"):
        if op == "mul":
            mag = lambda iv: torch.maximum(iv.lo.double().abs(), iv.hi.double().abs())  # noqa: E731
            ok = mag(a) * mag(b) < float(1 << 61)
        else:
            ok = _int_small(a.lo, a.hi, b.lo, b.hi)
        # zero the endpoints that could overflow so no wrapped value is ever computed
        alo, ahi, blo, bhi = (torch.where(ok, t, 0) for t in (a.lo, a.hi, b.lo, b.hi))
        if op == "add":
            return _fit_int(alo + blo, ahi + bhi, ok, dtype)
        if op == "sub":
            return _fit_int(alo - bhi, ahi - blo, ok, dtype)
        lo, hi = _hull([alo * blo, alo * bhi, ahi * blo, ahi * bhi])
        return _fit_int(lo, hi, ok, dtype)
    if op in ("minimum", "maximum"):
        f = torch.minimum if op == "minimum" else torch.maximum
        return _fit_int(f(a.lo, b.lo), f(a.hi, b.hi), None, dtype)
    if op in ("floordiv", "remainder"):
        # integer division by zero raises in eager; stay away from it and from INT_MIN // -1
        nonzero = (b.lo > 0) | (b.hi < 0)
        ok = nonzero & _int_small(a.lo, a.hi)
        blo, bhi = torch.where(nonzero, b.lo, one), torch.where(nonzero, b.hi, one)
        alo, ahi = torch.where(ok, a.lo, one), torch.where(ok, a.hi, one)
        if op == "floordiv":
            lo, hi = _hull([torch.floor_divide(x, y) for x in (alo, ahi) for y in (blo, bhi)])
            return _fit_int(lo, hi, ok, dtype)
        return _remainder_int(a, alo, ahi, blo, bhi, ok, nonzero, dtype)
    return _as_interval(widest(dtype, dev), dtype)


def _remainder_int(a, alo, ahi, blo, bhi, ok, nonzero, dtype) -> Interval:
    """``remainder`` takes the sign of the divisor: [0, d-1] or [d+1, 0], tighter within one period."""
    positive = blo > 0
    lo = torch.where(positive, torch.zeros_like(blo), blo + 1)
    hi = torch.where(positive, bhi - 1, torch.zeros_like(bhi))
    # a non-negative dividend below a positive divisor is returned unchanged
    small = positive & ok & (alo >= 0)
    hi = torch.where(small, torch.minimum(hi, ahi), hi)
    unchanged = small & (ahi < blo)
    lo = torch.where(unchanged, alo, lo)
    # a constant divisor and a dividend inside one period: remainder is monotone there
    one_period = ok & (blo == bhi) & (torch.floor_divide(alo, blo) == torch.floor_divide(ahi, blo))
    lo = torch.where(one_period, torch.remainder(alo, blo), lo)
    hi = torch.where(one_period, torch.remainder(ahi, blo), hi)
    return _fit_int(lo, hi, nonzero, dtype)


def _binary_float(op: str, a: Interval, b: Interval, dtype: torch.dtype) -> Interval:
    dev = a.lo.device
    nan = a.nan | b.nan
    inf = math.inf
    if op == "add":
        nan = nan | ((a.hi == inf) & (b.lo == -inf)) | ((a.lo == -inf) & (b.hi == inf))
        return _settle(Interval(a.lo + b.lo, a.hi + b.hi, nan, dtype))
    if op == "sub":
        nan = nan | ((a.hi == inf) & (b.hi == inf)) | ((a.lo == -inf) & (b.lo == -inf))
        return _settle(Interval(a.lo - b.hi, a.hi - b.lo, nan, dtype))
    if op == "mul":
        corners = [a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]
        nan = nan | (_holds_zero(a) & _has_inf(b)) | (_holds_zero(b) & _has_inf(a))
        for c in corners:
            nan = nan | torch.isnan(c)
        lo, hi = _hull(corners)
        return _settle(Interval(lo, hi, nan, dtype))
    if op in ("truediv", "floordiv"):
        nan = nan | _holds_zero(b)
        f = torch.true_divide if op == "truediv" else torch.floor_divide
        corners = [f(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
        for c in corners:
            nan = nan | torch.isnan(c)
        lo, hi = _hull(corners)
        out = Interval(lo, hi, nan, dtype)
        if op == "floordiv":
            # aten's float floor_divide goes through fmod and may land one off floor(a/b)
            # (corners included), so allow that slack twice
            out = _widen_ulps(Interval(lo - 2, hi + 2, nan, dtype), 4)
        return _settle(out)
    if op == "remainder":
        positive, negative = b.lo > 0, b.hi < 0
        nan = nan | ~(positive | negative) | _has_inf(a)
        zero = torch.zeros_like(b.lo)
        lo = torch.where(positive, zero, b.lo)
        hi = torch.where(positive, b.hi, zero)
        unchanged = positive & (a.lo >= 0) & (a.hi < b.lo)
        lo, hi = torch.where(unchanged, a.lo, lo), torch.where(unchanged, a.hi, hi)
        return _settle(Interval(lo, hi, nan, dtype))
    if op in ("minimum", "maximum"):
        f = torch.minimum if op == "minimum" else torch.maximum
        return _settle(Interval(f(a.lo, b.lo), f(a.hi, b.hi), nan, dtype))
    return _as_interval(widest(dtype, dev), dtype)


# unary float maths: (torch fn, increasing?, lowest argument without NaN, exact?)
_MONOTONE = {
    "exp": (torch.exp, True, None, False),
    "exp2": (torch.exp2, True, None, False),
    "expm1": (torch.expm1, True, None, False),
    "log": (torch.log, True, 0.0, False),
    "log2": (torch.log2, True, 0.0, False),
    "log1p": (torch.log1p, True, -1.0, False),
    "sqrt": (torch.sqrt, True, 0.0, True),
    "tanh": (torch.tanh, True, None, False),
    "sigmoid": (torch.sigmoid, True, None, False),
    "erf": (torch.erf, True, None, False),
    "floor": (torch.floor, True, None, True),
    "ceil": (torch.ceil, True, None, True),
    "trunc": (torch.trunc, True, None, True),
    "round": (torch.round, True, None, True),
    "sign": (torch.sign, True, None, True),
    "neg": (torch.neg, False, None, True),
}


def _unary(op: str, x: Bounds, dtype: torch.dtype) -> Bounds:
    dev = (x.lo if isinstance(x, Interval) else x.must).device
    if op == "not":
        t = _as_truth(x)
        return convert(Truth(~t.may, ~t.must), dtype)
    if op in ("to", "trunc_to"):
        return convert(x, dtype)  # .to(int) truncates toward zero, as trunc_to does
    if dtype == torch.bool:
        return widest(dtype, dev)
    if isinstance(x, Truth):
        x = convert(x, torch.int64)
    if dtype.is_floating_point and x.dtype != dtype:
        x = _as_interval(x, dtype)  # eager promotes an integer input first
    if x.is_float:
        out = _unary_float(op, x)
    else:
        out = _unary_int(op, x)
    return convert(out, dtype) if out is not None else widest(dtype, dev)


def _unary_int(op: str, x: Interval) -> Interval | None:
    if op in ("floor", "ceil", "trunc", "round"):
        return x
    if op == "sign":
        return Interval(torch.sign(x.lo), torch.sign(x.hi), x.nan, x.dtype)
    ok = _int_small(x.lo, x.hi)
    xlo, xhi = torch.where(ok, x.lo, 0), torch.where(ok, x.hi, 0)  # never negate INT_MIN
    if op == "neg":
        return _fit_int(-xhi, -xlo, ok, x.dtype)
    if op == "abs":
        lo = torch.where(xlo >= 0, xlo, torch.where(xhi <= 0, -xhi, torch.zeros_like(xlo)))
        return _fit_int(lo, torch.maximum(-xlo, xhi), ok, x.dtype)
    return None


def _unary_float(op: str, x: Interval) -> Interval | None:
    if op == "abs":
        zero = torch.zeros_like(x.lo)
        lo = torch.where(x.lo >= 0, x.lo, torch.where(x.hi <= 0, -x.hi, zero))
        hi = torch.maximum(-x.lo, x.hi)
        return _settle(Interval(lo, hi, x.nan, x.dtype))
    if op in ("sin", "cos"):
        one = torch.ones_like(x.lo)
        return _settle(Interval(-one, one, x.nan | _has_inf(x), x.dtype))
    if op in ("reciprocal", "rsqrt"):
        # decreasing on each side of 0; ±0 maps to ±inf, so demand 0 be excluded
        ok = (x.lo > 0) | ((x.hi < 0) & (op == "reciprocal"))
        f = torch.reciprocal if op == "reciprocal" else torch.rsqrt
        out = Interval(f(x.hi), f(x.lo), x.nan | ~ok, x.dtype)
        return _settle(_widen_ulps(out, _TRANSCENDENTAL_ULPS))
    if op not in _MONOTONE:
        return None
    fn, increasing, domain_lo, exact = _MONOTONE[op]
    nan = x.nan
    if domain_lo is not None:
        nan = nan | (x.lo < domain_lo)
    flo, fhi = fn(x.lo), fn(x.hi)
    out = Interval(flo, fhi, nan, x.dtype) if increasing else Interval(fhi, flo, nan, x.dtype)
    if not exact:
        out = _widen_ulps(out, _TRANSCENDENTAL_ULPS)
    return _settle(out)


# ----------------------------------------------------------------------------- logic and comparisons


def _compare(op: str, a: Bounds, b: Bounds, promoted: torch.dtype) -> Truth:
    if promoted == torch.bool:
        promoted = torch.uint8  # compare bools as 0/1
    x, y = _as_interval(a, promoted), _as_interval(b, promoted)
    clean = ~(x.nan | y.nan)
    if op == "lt":
        return Truth(clean & (x.hi < y.lo), x.lo < y.hi)
    if op == "le":
        return Truth(clean & (x.hi <= y.lo), x.lo <= y.hi)
    if op == "gt":
        return Truth(clean & (x.lo > y.hi), x.hi > y.lo)
    if op == "ge":
        return Truth(clean & (x.lo >= y.hi), x.hi >= y.lo)
    single = (x.lo == x.hi) & (y.lo == y.hi) & (x.lo == y.lo)
    overlap = (x.lo <= y.hi) & (y.lo <= x.hi)
    disjoint = (x.hi < y.lo) | (y.hi < x.lo)
    if op == "eq":
        return Truth(clean & single, overlap)
    assert op == "ne"  # NaN != anything is True
    return Truth(disjoint, ~single | ~clean)


def _logical(op: str, a: Bounds, b: Bounds) -> Truth:
    x, y = _as_truth(a), _as_truth(b)
    if op == "and":
        return Truth(x.must & y.must, x.may & y.may)
    if op == "or":
        return Truth(x.must | y.must, x.may | y.may)
    assert op == "xor"
    return Truth((x.must & ~y.may) | (~x.may & y.must), (x.may & ~y.must) | (~x.must & y.may))


def _where(c: Bounds, x: Bounds, y: Bounds, dtype: torch.dtype) -> Bounds:
    cond = _as_truth(c)
    always, never = cond.must, ~cond.may
    if dtype == torch.bool:
        tx, ty = _as_truth(x), _as_truth(y)
        must = torch.where(always, tx.must, torch.where(never, ty.must, tx.must & ty.must))
        may = torch.where(always, tx.may, torch.where(never, ty.may, tx.may | ty.may))
        return Truth(must, may)
    ix, iy = _as_interval(x, dtype), _as_interval(y, dtype)

    def pick(fx, fy, both):
        return torch.where(always, fx, torch.where(never, fy, both))

    return _settle(Interval(pick(ix.lo, iy.lo, torch.minimum(ix.lo, iy.lo)),
                            pick(ix.hi, iy.hi, torch.maximum(ix.hi, iy.hi)),
                            pick(ix.nan, iy.nan, ix.nan | iy.nan), dtype))


# ----------------------------------------------------------------------------- loads


def _wrap_and_clamp(iv: Interval, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index bounds as eager resolves them: negatives count from the end, out of range raises.

    Out-of-range indices would have made eager raise, so clamping to
    ``[0, size-1]`` cannot hide a value eager could read.
    """
    lo, hi = iv.lo, iv.hi
    negative = hi < 0
    straddles = (lo < 0) & (hi >= 0)  # both ends of the tensor are reachable
    lo = torch.where(negative, lo + size, torch.where(straddles, torch.zeros_like(lo), lo))
    hi = torch.where(negative, hi + size, torch.where(straddles, torch.full_like(hi, size - 1), hi))
    return lo.clamp(0, size - 1), hi.clamp(0, size - 1)


def _reduce_ranges(x: torch.Tensor, dim: int, starts: torch.Tensor, stops: torch.Tensor,
                   reduce: str, budget: int) -> torch.Tensor | None:
    """``reduce`` of ``x`` along ``dim`` over each inclusive range; None if over budget.

    Ranges of one length (aligned blocks, the common case) cost one gather of
    about ``x``'s size; overlapping ranges use a sparse table.
    """
    count = starts.numel()
    rest = x.numel() // max(x.shape[dim], 1)
    lengths = stops - starts + 1
    width = int(lengths.max())
    amin_or_amax = torch.amin if reduce == "min" else torch.amax
    pairwise = torch.minimum if reduce == "min" else torch.maximum
    if width == 1:
        return x.index_select(dim, starts)
    if count * width * rest <= budget:
        offsets = torch.arange(width, device=x.device)
        window = torch.minimum(starts[:, None] + offsets, stops[:, None])  # repeats are harmless
        gathered = x.index_select(dim, window.reshape(-1)).unflatten(dim, (count, width))
        return amin_or_amax(gathered, dim=dim + 1)
    levels = width.bit_length()
    if levels * x.numel() + count * rest > budget:
        return None
    # sparse table: table[k][i] reduces x[i : i + 2**k]; a range is two overlapping lookups
    table = [x]
    for k in range(1, levels):
        prev, half = table[-1], 1 << (k - 1)
        n = prev.shape[dim] - half
        table.append(pairwise(prev.narrow(dim, 0, n), prev.narrow(dim, half, n)))
    level = torch.zeros_like(lengths)
    for k in range(1, levels):
        level = torch.where(lengths >= (1 << k), k, level)
    shape = list(x.shape)
    shape[dim] = count
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    for k in torch.unique(level).tolist():
        sel = (level == k).nonzero().flatten()
        left = table[k].index_select(dim, starts[sel])
        right = table[k].index_select(dim, stops[sel] - (1 << k) + 1)
        out.index_copy_(dim, sel, pairwise(left, right))
    return out


def load_bounds(tensor: torch.Tensor, indices: Sequence[Interval], *, budget: int | None = None) -> Interval:
    """Bounds of ``tensor[i0, i1, ...]`` for index intervals broadcast over the tile grid.

    Exact where every index is a point; otherwise the min/max of the tensor over
    each tile's index box (exact too), except that a dimension whose ranges
    would cost more than ``budget`` elements is reduced whole (sound, looser).
    """
    budget = LOAD_REDUCTION_BUDGET if budget is None else budget
    t = tensor.detach()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    dev = t.device
    if len(indices) != t.dim():
        raise ValueError(f"a load needs one index per dimension: {len(indices)} for shape {tuple(t.shape)}")
    if t.dim() == 0:
        return _as_interval(point(t), t.dtype)
    if t.numel() == 0:  # any read raises in eager
        return _as_interval(widest(t.dtype, dev), t.dtype)
    spans = [_wrap_and_clamp(iv, size) for iv, size in zip(indices, t.shape)]
    if all(bool((lo == hi).all()) for lo, hi in spans):
        return _as_interval(point(t[tuple(lo for lo, _ in spans)]), t.dtype)

    # one entry per distinct range in each dimension, then a single gather per tile
    uniques, inverses = [], []
    for (lo, hi), size in zip(spans, t.shape):
        lo, hi = torch.broadcast_tensors(lo, hi)
        codes, inverse = torch.unique(lo * size + hi, return_inverse=True)
        uniques.append((codes // size, codes % size))
        inverses.append(inverse)
    order = sorted(range(t.dim()), key=lambda d: uniques[d][0].numel() / t.shape[d])
    low = high = t
    for d in order:
        starts, stops = uniques[d]
        reduced = [_reduce_ranges(x, d, starts, stops, how, budget) for x, how in ((low, "min"), (high, "max"))]
        if reduced[0] is None or reduced[1] is None:
            # too many distinct ranges to tabulate: the whole dimension bounds every one of them
            reduced = [torch.amin(low, dim=d, keepdim=True), torch.amax(high, dim=d, keepdim=True)]
            inverses[d] = torch.zeros_like(inverses[d])
        low, high = reduced
    where = tuple(inverses)
    lo, hi = low[where], high[where]
    nan = torch.isnan(lo) | torch.isnan(hi) if t.is_floating_point() else torch.zeros((), dtype=torch.bool, device=dev)
    return _settle(Interval(lo.to(_storage(t.dtype)), hi.to(_storage(t.dtype)), nan, t.dtype))


# ----------------------------------------------------------------------------- the evaluator


def _dimensioned(e: Expr, memo: dict) -> bool:
    """Whether eager's value for ``e`` has dimensions (0-dim tensors promote differently)."""
    hit = memo.get(e)
    if hit is None:
        hit = isinstance(e, (Index, Score)) or any(_dimensioned(c, memo) for c in e.children())
        memo[e] = hit
    return hit


def _proxy(e: Expr, memo: dict) -> torch.Tensor:
    shape = (1,) if _dimensioned(e, memo) else ()
    return torch.zeros(shape, dtype=E.torch_dtype(e.dtype))


def bound(expr: Expr, box: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
          captured: Sequence[torch.Tensor] = (), *, device=None, budget: int | None = None,
          unknown_loads: bool = False) -> Bounds:
    """Sound bounds of ``expr`` with each index in ``box[name] = (lo, hi)`` (int64, inclusive).

    Captured tensors are moved to ``device`` (default: the box's device).  ``unknown_loads``: every
    load is bounded by its dtype's whole range, without reading the tensor (no device sync).
    """
    if device is None:
        device = next(iter(box.values()))[0].device if box else torch.device("cpu")
    return _Bounder(box, captured, device, budget, unknown_loads).bound(expr)


class _Bounder:
    """One evaluation's memo.  A class, not nested closures: recursive closures form a
    reference cycle that would keep every intermediate tensor (and the captured
    tensors) alive until the garbage collector runs."""

    def __init__(self, box, captured, device, budget, unknown_loads=False):
        self.box, self.captured, self.device, self.budget = box, captured, device, budget
        self.unknown_loads = unknown_loads
        self.memo: dict[Expr, Bounds] = {}
        self.dims: dict[Expr, bool] = {}

    def bound(self, e: Expr) -> Bounds:
        hit = self.memo.get(e)
        if hit is not None:
            return hit
        td = E.torch_dtype(e.dtype)
        if isinstance(e, Index):
            lo, hi = self.box[e.name]
            out: Bounds = convert(Interval(lo, hi, torch.zeros((), dtype=torch.bool, device=self.device),
                                           torch.int64), td)
        elif isinstance(e, Const):
            out = point(_scalar(e.value, td, self.device))
        elif isinstance(e, Load) and self.unknown_loads:
            out = widest(td, self.device)
        elif isinstance(e, Load):
            tensor = self.captured[e.buffer].to(self.device)
            aligned = _tile_load_bounds(tensor, e.indices, getattr(self.box, "geometry", None))
            if aligned is not None:
                out = convert(aligned, td)
            else:
                idx = [_as_interval(self.bound(i), torch.int64) for i in e.indices]
                out = convert(load_bounds(tensor, idx, budget=self.budget), td)
        elif isinstance(e, Call):
            out = self.call(e, td)
        else:  # Score and anything new: unknown
            out = widest(td, self.device)
        self.memo[e] = out
        return out

    def promoted(self, x: Expr, y: Expr) -> torch.dtype:
        """The dtype eager's type promotion picks for a comparison or ``where``."""
        return torch.result_type(_proxy(x, self.dims), _proxy(y, self.dims))

    def call(self, e: Call, td: torch.dtype) -> Bounds:
        op, args, go = e.op, e.args, self.bound
        if op == "where":
            c, x, y = args
            promoted = self.promoted(x, y)
            return _where(go(c), convert(go(x), promoted), convert(go(y), promoted), td)
        if op in E.UNARY_OPS:
            return _unary(op, go(args[0]), td)
        if op in E.COMPARISONS:
            return convert(_compare(op, go(args[0]), go(args[1]), self.promoted(*args)), td)
        if op in E.LOGICAL:
            return convert(_logical(op, go(args[0]), go(args[1])), td)
        if td == torch.bool:
            return widest(td, self.device)
        a, b = (_as_interval(go(x), td) for x in args)  # eager computes in the result dtype
        if td.is_floating_point:
            return _binary_float(op, a, b, td)
        return _binary_int(op, a, b, td)


def bound_predicate(pred: Expr, box: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                    captured: Sequence[torch.Tensor] = (), **kwargs) -> Truth:
    """``(must, may)`` of a bool predicate over the box."""
    with torch.no_grad():
        return _as_truth(bound(pred, box, captured, **kwargs))


class TileBox(dict):
    """``tile_box``'s index boxes, plus ``geometry``: per index, (block, extent, grid dim), which lets a
    load indexed by plain indices be bounded per tile by a reshape and a min/max (``_tile_load_bounds``)."""

    geometry: dict


def tile_box(*, batch: int, heads: int, q_len: int, kv_len: int, block_m: int, block_n: int,
             device) -> TileBox:
    """Index boxes of every tile, shaped to broadcast to [batch, heads, NQ, NK].

    ``b``/``h`` are points; ``q_idx``/``kv_idx`` cover only the in-range part of a block.
    """
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    bs = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    hs = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q0 = torch.arange(nq, device=device).view(1, 1, -1, 1) * block_m
    k0 = torch.arange(nk, device=device).view(1, 1, 1, -1) * block_n
    box = TileBox({
        "b": (bs, bs),
        "h": (hs, hs),
        "q_idx": (q0, torch.clamp(q0 + block_m, max=q_len) - 1),
        "kv_idx": (k0, torch.clamp(k0 + block_n, max=kv_len) - 1),
    })
    box.geometry = {"b": (1, batch, 0), "h": (1, heads, 1), "q_idx": (block_m, q_len, 2),
                    "kv_idx": (block_n, kv_len, 3)}
    return box


def at_plain_indices(indices) -> bool:
    """Each index of a load is a distinct plain index (``pad[b, kv_idx]``, ``doc[q_idx]``): the loads
    ``_tile_load_bounds`` bounds without a host sync."""
    return all(isinstance(i, Index) for i in indices) and len({i.name for i in indices}) == len(indices)


def _tile_load_bounds(tensor: torch.Tensor, indices, geometry: dict | None) -> Interval | None:
    """Exact per-tile bounds of ``tensor[i0, i1, ...]`` for a load ``at_plain_indices``: the tensor cut to
    each index's extent, its tiled dims reshaped to (tiles, block) and reduced, with no value read on the
    host (no device sync: Note [changing mask tensors] in block_sparsity.py).  None where this does not
    apply: ``load_bounds`` handles it."""
    if geometry is None or not at_plain_indices(indices) or len(indices) != tensor.dim() or tensor.dim() == 0:
        return None
    names = [i.name for i in indices]
    if any(n not in geometry or tensor.shape[d] < geometry[n][1] for d, n in enumerate(names)):
        return None  # a shorter dim would make eager raise (or wrap): the general path decides
    t = tensor.detach()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    for d, name in enumerate(names):
        t = t.narrow(d, 0, geometry[name][1])
    low, high = t, t
    for d, name in enumerate(names):
        block, extent, _ = geometry[name]
        if block == 1:
            continue
        tiles = -(-extent // block)
        pad = tiles * block - extent
        if pad:  # repeat the last entry: the last tile's min/max stay those of its in-range part
            edge = t.narrow(d, extent - 1, 1)
            low = torch.cat([low, edge.expand(*low.shape[:d], pad, *low.shape[d + 1:])], d)
            high = torch.cat([high, edge.expand(*high.shape[:d], pad, *high.shape[d + 1:])], d)
        shape = (*low.shape[:d], tiles, block, *low.shape[d + 1:])
        low = torch.amin(low.reshape(shape), dim=d + 1)
        high = torch.amax(high.reshape(shape), dim=d + 1)
    order = sorted(range(len(names)), key=lambda d: geometry[names[d]][2])
    grid = [1, 1, 1, 1]
    for d in order:
        grid[geometry[names[d]][2]] = low.shape[d]
    low, high = low.permute(order).reshape(grid), high.permute(order).reshape(grid)
    if t.is_floating_point():
        nan = torch.isnan(low) | torch.isnan(high)
    else:
        nan = torch.zeros((), dtype=torch.bool, device=t.device)
    return _settle(Interval(low.to(_storage(t.dtype)), high.to(_storage(t.dtype)), nan, t.dtype))
