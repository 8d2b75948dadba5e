"""Closed-form kv bounds of index-only masks, for kernels that need no sparsity tables.

Many masks say, row by row, "keys from lo(q) up to hi(q)": causal
(``kv_idx <= q_idx``), sliding windows, causal with an offset (Lq != Lk),
prefix-LM (``kv_idx < P | kv_idx <= q_idx``), chunked/local attention
(``q_idx // C == kv_idx // C``).  ``kv_interval`` proves a predicate equal to

    lo(q) <= kv < hi(q)        lo, hi: integer expressions of q_idx alone,
                               both non-decreasing in q_idx

by rewriting it symbolically (Note [closed-form bounds]); the kernels then get
``lo``/``hi`` as two tiny generated functions and work out, per tile, which
tiles to visit and which are FULL, with no metadata tensor, for any sequence
length.  Predicates it cannot prove that for get ``None`` and the tables of
``block_sparsity.py``.

Note [closed-form bounds]
    With lo, hi non-decreasing, a q tile with rows [m0, m1] touches only kv in
    [lo(m0), hi(m1)), and a kv tile [n0, n1] is FULL for it exactly when
    lo(m1) <= n0 and n1 < hi(m0): every row's interval contains the tile.
    Seen from a kv tile [n0, n1] (the dK/dV programs), the rows that can touch
    it are those with hi(q) > n0 and lo(q) <= n1, a contiguous range, and the
    FULL q tiles are those whose rows all have lo(q) <= n0 and hi(q) > n1;
    each boundary is the first row where a monotone function passes a value,
    found by binary search over the rows (32 scalar steps per program).
    Everything in the visited range that is not FULL is PARTIAL (mask
    evaluated per entry), so an interval that is exact but has gaps between
    rows (``kv == 2 q``) costs time, never correctness.  Soundness rests on the
    rewrite being an equivalence: every rule below is one (atoms over integers;
    ``or`` only when both sides share a bound, where the union is exact).

What it does not do: masks reading tensors (document ids, padding), masks
depending on ``b``/``h``, ``!=``, conditions on q alone (``q_idx < 100``),
decreasing bounds (``kv_idx >= -q_idx``), unions with a gap.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..lowering import expr as E
from ..lowering.expr import Call, Const, Expr, Index

__all__ = ["KvInterval", "kv_interval", "forward_walk", "backward_walk", "walk_block_map", "UNBOUNDED"]

I64 = E.INT64
UNBOUNDED = 1 << 30  # hi of a mask with no upper bound: past any sequence length the kernels take


@dataclass(frozen=True)
class KvInterval:
    """``pred(q, kv) <=> lo(q) <= kv < hi(q)``; ``lo``/``hi`` are int64 expressions of ``q_idx``."""

    lo: Expr
    hi: Expr

    def describe(self) -> str:
        return f"{E.format_expr(self.lo)} <= kv_idx < {E.format_expr(self.hi)}"


# ----------------------------------------------------------------------------- linear forms


def _c(v: int) -> Const:
    return E.const(v, I64)


def _add(a: Expr | None, b: Expr | None) -> Expr | None:
    if a is None:
        return b
    if b is None:
        return a
    return E.call("add", a, b, dtype=I64)


def _neg(a: Expr | None) -> Expr | None:
    if a is None:
        return None
    if isinstance(a, Call) and a.op == "neg":
        return a.args[0]
    if isinstance(a, Call) and a.op == "sub":
        return E.call("sub", a.args[1], a.args[0], dtype=I64)
    return E.call("neg", a, dtype=I64)


def _as_i64(e: Expr) -> Expr:
    return E.call("to", e, dtype=I64) if e.dtype != I64 else e


def _widening(e: Expr) -> bool:
    """A cast between int32 and int64: value-preserving for index arithmetic (indices < 2^24, see
    hooks.IndexBounds).  Narrower casts wrap (``kv_idx.to(uint8)`` repeats every 256) and stop the rewrite."""
    return isinstance(e, Call) and e.op == "to" and e.dtype in (E.INT32, I64) and e.args[0].dtype in (E.INT32, I64)


def _kv_free(e: Expr) -> bool:
    return E.free_symbols(e) <= {"q_idx"} and not E.uses_score(e) and not E.loads(e)


def _linear(e: Expr) -> tuple[int, Expr | None] | None:
    """``e = coef * kv_idx + rest`` with coef in {-1, 0, 1} and rest a kv-free expression (None = 0)."""
    if not (E.is_int(e.dtype)):
        return None
    if isinstance(e, Index):
        if e.name == "kv_idx":
            return 1, None
        return (0, e) if e.name == "q_idx" else None
    if isinstance(e, Const):
        return 0, (None if e.value == 0 else _c(int(e.value)))
    if not isinstance(e, Call):
        return None
    if _kv_free(e):
        return 0, _as_i64(e)
    op, args = e.op, e.args
    if _widening(e):
        return _linear(args[0])
    if op in ("add", "sub"):
        a, b = _linear(args[0]), _linear(args[1])
        if a is None or b is None:
            return None
        if op == "sub":
            b = (-b[0], _neg(b[1]))
        coef = a[0] + b[0]
        return (coef, _add(a[1], b[1])) if coef in (-1, 0, 1) else None
    if op == "neg":
        a = _linear(args[0])
        return None if a is None else (-a[0], _neg(a[1]))
    if op == "mul":
        for x, k in ((args[0], args[1]), (args[1], args[0])):
            if isinstance(k, Const):
                a = _linear(x)
                if a is None or a[0] * int(k.value) not in (-1, 0, 1):
                    return None
                return a[0] * int(k.value), (None if a[1] is None else E.call("mul", a[1], _c(int(k.value)),
                                                                              dtype=I64))
    return None


# ----------------------------------------------------------------------------- predicates -> intervals

_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}
_NOT = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt"}


def _max(a: Expr | None, b: Expr | None) -> Expr | None:
    if a is None or b is None:
        return a if b is None else b
    return a if a == b else E.call("maximum", a, b, dtype=I64)


def _min(a: Expr | None, b: Expr | None) -> Expr | None:
    if a is None or b is None:
        return a if b is None else b
    return a if a == b else E.call("minimum", a, b, dtype=I64)


Interval = tuple  # (lo | None, hi | None): None is no bound on that side


def _interval(e: Expr) -> Interval | None:
    if isinstance(e, Const):
        return (None, None) if bool(e.value) else None
    if not isinstance(e, Call) or e.dtype != E.BOOL:
        return None
    op, args = e.op, e.args
    if op == "and":
        a, b = _interval(args[0]), _interval(args[1])
        if a is None or b is None:
            return None
        return _max(a[0], b[0]), _min(a[1], b[1])
    if op == "or":
        a, b = _interval(args[0]), _interval(args[1])
        if a is None or b is None:
            return None
        if a[0] == b[0]:  # [lo, h1) | [lo, h2) = [lo, max(h1, h2)), empty parts included
            return a[0], (None if a[1] is None or b[1] is None else _max(a[1], b[1]))
        if a[1] == b[1]:
            return (None if a[0] is None or b[0] is None else _min(a[0], b[0])), a[1]
        return None
    if op == "not":
        x = args[0]
        if isinstance(x, Call) and x.op in _NOT and all(E.is_int(a.dtype) for a in x.args):
            return _interval(Call(_NOT[x.op], x.args, E.BOOL))
        if isinstance(x, Call) and x.op in ("and", "or"):  # De Morgan
            inner = "or" if x.op == "and" else "and"
            return _interval(E.call(inner, E.call("not", x.args[0], dtype=E.BOOL),
                                    E.call("not", x.args[1], dtype=E.BOOL), dtype=E.BOOL))
        return None
    if op in ("lt", "le", "gt", "ge", "eq") and all(E.is_int(a.dtype) for a in args):
        return _comparison(op, args[0], args[1])
    return None


def _comparison(op: str, a: Expr, b: Expr) -> Interval | None:
    # |x| < r  <=>  -r < x < r (and <= alike), with abs on either side
    for x, r, o in ((a, b, op), (b, a, _FLIP[op])):
        if isinstance(x, Call) and x.op == "abs" and o in ("lt", "le"):
            inner = x.args[0]
            return _interval(E.call("and", E.call(o, inner, r, dtype=E.BOOL),
                                    E.call(_FLIP[o], inner, E.call("neg", r, dtype=r.dtype), dtype=E.BOOL),
                                    dtype=E.BOOL))
    # floordiv(X, C) cmp g with X holding kv_idx and g free of it: compare X with multiples of C
    for x, g, o in ((a, b, op), (b, a, _FLIP[op])):
        if isinstance(x, Call) and x.op == "floordiv" and isinstance(x.args[1], Const) and int(x.args[1].value) > 0 \
                and not _kv_free(x.args[0]) and _kv_free(g):
            num, c = x.args[0], _c(int(x.args[1].value))
            g = _as_i64(g)
            low = E.call("mul", g, c, dtype=I64)                                          # C * g
            high = E.call("mul", E.call("add", g, _c(1), dtype=I64), c, dtype=I64)        # C * (g + 1)
            atoms = {"ge": [("ge", low)], "gt": [("ge", high)], "le": [("lt", high)], "lt": [("lt", low)],
                     "eq": [("ge", low), ("lt", high)]}.get(o)
            if atoms is None:
                return None
            out: Interval = (None, None)
            for aop, bound in atoms:
                part = _comparison(aop, num, bound)
                if part is None:
                    return None
                out = (_max(out[0], part[0]), _min(out[1], part[1]))
            return out
    la, lb = _linear(a), _linear(b)
    if la is None or lb is None:
        return None
    coef = la[0] - lb[0]
    rest = _add(la[1], _neg(lb[1]))                       # a - b = coef * kv + rest
    if coef == 0:
        if rest is None or isinstance(rest, Const):        # a constant truth value
            value = 0 if rest is None else int(rest.value)
            truth = {"lt": value < 0, "le": value <= 0, "gt": value > 0, "ge": value >= 0, "eq": value == 0}[op]
            return (None, None) if truth else None
        return None                                        # a condition on q alone
    if coef == 1:                                          # kv + rest cmp 0  <=>  kv cmp -rest
        r, o = _neg(rest), op
    else:                                                  # -kv + rest cmp 0  <=>  kv flip(cmp) rest
        r, o = rest, _FLIP[op]
    r = _c(0) if r is None else r
    one = lambda x: E.call("add", x, _c(1), dtype=I64)  # noqa: E731
    return {"ge": (r, None), "gt": (one(r), None), "le": (None, one(r)), "lt": (None, r),
            "eq": (r, one(r))}.get(o)


# ----------------------------------------------------------------------------- monotonicity


def _monotone(e: Expr, up: bool) -> bool:
    """Is ``e`` non-decreasing (``up``) / non-increasing in q_idx?  Sound, not complete."""
    if not E.free_symbols(e):
        return not E.loads(e)
    if isinstance(e, Index):
        return e.name == "q_idx" and up
    if not isinstance(e, Call) or not E.is_int(e.dtype):
        return False
    op, args = e.op, e.args
    if op == "to":
        return _widening(e) and _monotone(args[0], up)
    if op in ("add", "maximum", "minimum"):
        return _monotone(args[0], up) and _monotone(args[1], up)
    if op == "sub":
        return _monotone(args[0], up) and _monotone(args[1], not up)
    if op == "neg":
        return _monotone(args[0], not up)
    if op == "mul":
        for x, k in ((args[0], args[1]), (args[1], args[0])):
            if isinstance(k, Const):
                return _monotone(x, up if int(k.value) >= 0 else not up)
        return False
    if op == "floordiv":
        return isinstance(args[1], Const) and int(args[1].value) > 0 and _monotone(args[0], up)
    return False


def _affine(e: Expr) -> tuple[int, int] | None:
    """``e = a * q_idx + b`` with integer a, b, or None."""
    if isinstance(e, Const):
        return 0, int(e.value)
    if isinstance(e, Index):
        return (1, 0) if e.name == "q_idx" else None
    if not isinstance(e, Call):
        return None
    if _widening(e):
        return _affine(e.args[0])
    if e.op == "neg":
        x = _affine(e.args[0])
        return None if x is None else (-x[0], -x[1])
    if e.op in ("add", "sub"):
        x, y = _affine(e.args[0]), _affine(e.args[1])
        if x is None or y is None:
            return None
        sign = 1 if e.op == "add" else -1
        return x[0] + sign * y[0], x[1] + sign * y[1]
    if e.op == "mul":
        x, y = _affine(e.args[0]), _affine(e.args[1])
        if x is None or y is None or (x[0] and y[0]):
            return None
        return x[0] * y[1] + y[0] * x[1], x[1] * y[1]
    return None


def _tidy(e: Expr) -> Expr:
    """Affine pieces written as ``q_idx * a + b`` (what explain prints); the value is unchanged."""
    aff = _affine(e)
    if aff is not None:
        a, b = aff
        out: Expr = _c(b)
        if a:
            term = E.q_idx if a == 1 else E.call("mul", E.q_idx, _c(a), dtype=I64)
            out = term if b == 0 else E.call("add" if b > 0 else "sub", term, _c(abs(b)), dtype=I64)
        return out
    if isinstance(e, Call):
        return E.call(e.op, *(_tidy(x) for x in e.args), dtype=e.dtype)
    return e


@functools.lru_cache(maxsize=512)
def kv_interval(pred: Expr | None) -> KvInterval | None:
    """The closed-form bounds of ``pred`` (module docstring), or None where they are not proven."""
    if pred is None or pred.dtype != E.BOOL or not E.free_symbols(pred) <= {"q_idx", "kv_idx"} or E.loads(pred) \
            or E.uses_score(pred):
        return None
    iv = _interval(pred)
    if iv is None:
        return None
    lo = _c(0) if iv[0] is None else _as_i64(iv[0])
    hi = _c(UNBOUNDED) if iv[1] is None else _as_i64(iv[1])
    lo, hi = _tidy(lo), _tidy(hi)
    if not (_monotone(lo, True) and _monotone(hi, True)):
        return None
    return KvInterval(lo, hi)


# ----------------------------------------------------------------------------- the kernels' walks, in Python
# The same arithmetic as ``bounded_kv_walk`` / ``bounded_q_walk`` in the Triton templates: explain's block
# map, and the reference the tests compare with a dense evaluation of the predicate.


def _at(e: Expr, q: int) -> int:
    return int(E.evaluate(e, {"q_idx": torch.tensor(q, dtype=torch.int64)}))


def _clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(x, hi))


def _tile_range(first: int, end: int, full_lo: int, full_end: int, length: int, block: int) -> tuple:
    """Tiles (first, first FULL, end of FULL, end) of a walk over [first, end) whose FULL tiles are those
    inside [full_lo, full_end) (full_end >= length: up to the last, partial tile)."""
    t_lo = first // block
    t_hi = t_lo if first >= end else max(-(-end // block), t_lo)
    f_lo = _clamp(-(-full_lo // block), t_lo, t_hi)
    f_hi = _clamp(-(-length // block) if full_end >= length else full_end // block, f_lo, t_hi)
    return t_lo, f_lo, f_hi, t_hi


def forward_walk(iv: KvInterval, m0: int, m1: int, kv_len: int, block_n: int) -> tuple[int, int, int, int]:
    """For q rows [m0, m1]: kv tiles (first, first FULL, end of FULL, end), as the kernels compute them."""
    lo_first, lo_last = _clamp(_at(iv.lo, m0), 0, kv_len), _clamp(_at(iv.lo, m1), 0, kv_len)
    hi_first, hi_last = _clamp(_at(iv.hi, m0), 0, kv_len), _clamp(_at(iv.hi, m1), 0, kv_len)
    return _tile_range(lo_first, hi_last, lo_last, hi_first, kv_len, block_n)


def _first_row_above(e: Expr, value: int, q_len: int) -> int:
    """The first q in [0, q_len) with e(q) > value, or q_len: binary search (e non-decreasing)."""
    lo, hi = 0, q_len
    for _ in range(32):
        mid = (lo + hi) // 2
        active = lo < hi
        above = _at(e, mid) > value
        hi = mid if (active and above) else hi
        lo = mid + 1 if (active and not above) else lo
    return lo


def backward_walk(iv: KvInterval, n0: int, n1: int, q_len: int, block_m: int) -> tuple[int, int, int, int]:
    """For kv columns [n0, n1]: q tiles (first, first FULL, end of FULL, end), as the dK/dV programs compute."""
    first = _first_row_above(iv.hi, n0, q_len)             # rows before it end before n0
    end = _first_row_above(iv.lo, n1, q_len)               # rows from it start after n1
    full_from = _first_row_above(iv.hi, n1, q_len)         # rows from it reach past n1
    full_to = _first_row_above(iv.lo, n0, q_len)           # rows before it start at or before n0
    return _tile_range(first, end, full_from, full_to, q_len, block_m)


def walk_block_map(iv: KvInterval, q_len: int, kv_len: int, block_m: int, block_n: int,
                   backward: bool = False) -> torch.Tensor:
    """int8 [NQ, NK]: EMPTY / PARTIAL / FULL as the forward (or the dK/dV) walk visits the tiles."""
    from .block_sparsity import EMPTY, FULL, PARTIAL

    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    out = torch.full((nq, nk), EMPTY, dtype=torch.int8)
    if not backward:
        for i in range(nq):
            t_lo, f_lo, f_hi, t_hi = forward_walk(iv, i * block_m, min((i + 1) * block_m, q_len) - 1, kv_len,
                                                  block_n)
            out[i, t_lo:t_hi] = PARTIAL
            out[i, f_lo:f_hi] = FULL
    else:
        for j in range(nk):
            t_lo, f_lo, f_hi, t_hi = backward_walk(iv, j * block_n, min((j + 1) * block_n, kv_len) - 1, q_len,
                                                   block_m)
            out[t_lo:t_hi, j] = PARTIAL
            out[f_lo:f_hi, j] = FULL
    return out
