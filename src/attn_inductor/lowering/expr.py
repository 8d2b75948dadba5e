"""Expression IR for score modifications and mask predicates.

An attention site's ``mods`` are recovered from the FX graph as a small tree of
:class:`Expr` nodes over the index symbols ``b, h, q_idx, kv_idx``, the scaled
dot product ``score`` and loads from *captured tensors* (bias tables, slopes,
document ids, padding masks).  Every node carries the dtype that eager PyTorch
computes it in, so the CPU evaluator reproduces eager arithmetic exactly and the
Triton printer knows where integer and float arithmetic live.

Invariants
- Nodes are frozen and hashable; structurally equal trees compare equal, which
  is what makes an ``AttentionSpec`` a cache key.
- ``Call.op`` is one of :data:`OPS`; semantics follow the aten op of that name
  (``floordiv`` floors, ``remainder`` takes the sign of the divisor, ``trunc_to``
  casts a float to an integer dtype by truncation as ``Tensor.to(long)`` does).
- Builders fold constants and drop identities, nothing cleverer: the tree stays
  close to the user's code so ``explain`` prints something recognisable.

What it does not do: broadcasting or shapes.  Loads take one index expression
per dimension of the captured tensor, already broadcast-resolved by the
extractor.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch

# dtype names used in the IR (strings keep specs JSON-serialisable)
BOOL, INT32, INT64 = "bool", "int32", "int64"
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INT_DTYPES = ("uint8", "int8", "int16", "int32", "int64")

INDEX_NAMES = ("b", "h", "q_idx", "kv_idx")
SCORE = "score"

UNARY_OPS = (
    "neg", "abs", "exp", "exp2", "log", "log2", "log1p", "expm1", "tanh", "sqrt", "rsqrt",
    "sigmoid", "sin", "cos", "floor", "ceil", "trunc", "round", "sign", "not", "to", "trunc_to",
    "erf", "reciprocal",
)
BINARY_OPS = (
    "add", "sub", "mul", "truediv", "floordiv", "remainder", "pow", "minimum", "maximum",
    "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor",
)
TERNARY_OPS = ("where",)
OPS = UNARY_OPS + BINARY_OPS + TERNARY_OPS
COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")
LOGICAL = ("and", "or", "xor", "not")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def is_int(dtype: str) -> bool:
    return dtype in INT_DTYPES


class Expr:
    """Base of the IR.  Subclasses are frozen dataclasses with a ``dtype``."""

    dtype: str

    def children(self) -> tuple["Expr", ...]:
        return ()

    def walk(self) -> Iterator["Expr"]:
        """Pre-order traversal (duplicates included)."""
        yield self
        for c in self.children():
            yield from c.walk()

    def __str__(self) -> str:  # readable infix, see format_expr
        return format_expr(self)


@dataclass(frozen=True, eq=True, repr=True)
class Index(Expr):
    """One of ``b, h, q_idx, kv_idx`` (int64, as eager ``arange`` gives)."""

    name: str
    dtype: str = INT64

    def __post_init__(self):
        assert self.name in INDEX_NAMES, self.name


@dataclass(frozen=True, eq=True, repr=True)
class Score(Expr):
    """``q·k * scale`` accumulated in fp32 (the kernel's native score)."""

    dtype: str = "float32"


@dataclass(frozen=True, eq=True, repr=True)
class Const(Expr):
    value: float | int | bool
    dtype: str

    def __post_init__(self):
        if isinstance(self.value, float) and math.isnan(self.value):
            raise ValueError("NaN constants are not representable in the IR")


@dataclass(frozen=True, eq=True, repr=True)
class Load(Expr):
    """``captured[buffer][indices...]``; one index per dimension of that tensor."""

    buffer: int
    indices: tuple[Expr, ...]
    dtype: str

    def children(self):
        return self.indices


@dataclass(frozen=True, eq=True, repr=True)
class Call(Expr):
    op: str
    args: tuple[Expr, ...]
    dtype: str

    def __post_init__(self):
        assert self.op in OPS, self.op
        n = 1 if self.op in UNARY_OPS else 2 if self.op in BINARY_OPS else 3
        assert len(self.args) == n, (self.op, self.args)

    def children(self):
        return self.args


def _memoise_hash(cls):
    """Keep a node's structural hash once computed.

    Expressions key many per-call caches (hooks, block sparsity, launch
    plans); a frozen dataclass rehashes its whole tree on every lookup, which
    showed in the host time of small attentions.  Children cache theirs too,
    so hashing a new parent costs one level.  The cached value stays out of
    pickles: string hashes differ between processes.
    """
    structural = cls.__hash__
    structural_eq = cls.__eq__

    def __hash__(self):
        h = self.__dict__.get("_hash")
        if h is None:
            h = structural(self)
            object.__setattr__(self, "_hash", h)
        return h

    def __eq__(self, other):  # identity, then the cached hashes, before walking two trees
        if self is other:
            return True
        if other.__class__ is not self.__class__:
            return NotImplemented
        if __hash__(self) != __hash__(other):
            return False
        return structural_eq(self, other)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    cls.__hash__ = __hash__
    cls.__eq__ = __eq__
    cls.__getstate__ = __getstate__
    return cls


for _node in (Load, Call):
    _memoise_hash(_node)


_CANONICAL_MAX = 4096
_canonical: dict = {}


def canonical(e: Expr | None) -> Expr | None:
    """The first-seen expression equal to ``e`` (``e`` itself the first time).

    Per-call caches key expressions (lru caches, the sparsity cache, launch plans); a cache
    filled at compile time holds the compile-time object, and the op's spec parsed from its
    JSON at run time holds an equal but distinct one, so every later lookup would walk both
    trees to compare them.  Specs keep canonical expressions, so those lookups stop at
    identity."""
    if e is None:
        return None
    got = _canonical.get(e)
    if got is None:
        if len(_canonical) >= _CANONICAL_MAX:
            _canonical.clear()
        got = _canonical[e] = e
    return got


# ----------------------------------------------------------------------------- builders

b, h, q_idx, kv_idx = (Index(n) for n in INDEX_NAMES)
score = Score()


def const(value, dtype: str) -> Const:
    if dtype == BOOL:
        value = bool(value)
    elif is_int(dtype):
        value = int(value)
    else:
        value = float(value)
    return Const(value, dtype)


def is_const(e: Expr, value=None) -> bool:
    return isinstance(e, Const) and (value is None or e.value == value)


def _fold(op: str, args: Sequence[Expr], dtype: str) -> Expr | None:
    """Evaluate an all-constant call with torch so folding matches eager rounding."""
    if not all(isinstance(a, Const) for a in args):
        return None
    env_args = [torch.tensor(a.value, dtype=torch_dtype(a.dtype)) for a in args]
    out = _apply(op, env_args, dtype)
    v = out.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return const(v, dtype)


def call(op: str, *args: Expr, dtype: str) -> Expr:
    """Make ``Call(op, args, dtype)``, folding constants and trivial identities."""
    args = tuple(args)
    folded = _fold(op, args, dtype)
    if folded is not None:
        return folded
    if op == "to":
        (x,) = args
        if x.dtype == dtype:
            return x
        # to(to(x, wider), narrower) chains are kept: they round.
    if op in ("add", "sub") and is_int(dtype) and is_const(args[1]) and isinstance(args[0], Call) \
            and args[0].op in ("add", "sub") and is_const(args[0].args[1]) and args[0].dtype == dtype:
        # (x ± c1) ± c2 → x + (±c1 ± c2): keeps index arithmetic readable
        inner = args[0]
        c = (inner.args[1].value if inner.op == "add" else -inner.args[1].value)
        c = c + (args[1].value if op == "add" else -args[1].value)
        return call("add", inner.args[0], const(c, dtype), dtype=dtype) if c >= 0 else \
            call("sub", inner.args[0], const(-c, dtype), dtype=dtype)
    if op in ("add", "sub") and is_const(args[1], 0) and args[0].dtype == dtype:
        return args[0]
    if op == "add" and is_const(args[0], 0) and args[1].dtype == dtype:
        return args[1]
    if op in ("mul", "truediv") and is_const(args[1], 1) and args[0].dtype == dtype:
        return args[0]
    if op == "mul" and is_const(args[0], 1) and args[1].dtype == dtype:
        return args[1]
    if op == "and":
        if is_const(args[0], True):
            return args[1]
        if is_const(args[1], True):
            return args[0]
        if is_const(args[0], False) or is_const(args[1], False):
            return const(False, BOOL)
        if args[0] == args[1]:
            return args[0]
    if op == "or":
        if is_const(args[0], False):
            return args[1]
        if is_const(args[1], False):
            return args[0]
        if is_const(args[0], True) or is_const(args[1], True):
            return const(True, BOOL)
    if op == "not" and isinstance(args[0], Call) and args[0].op == "not":
        return args[0].args[0]
    if op == "not" and isinstance(args[0], Call) and args[0].op in _NEGATED:
        inner = args[0]
        # with NaN, ~(x < y) is not x >= y; only eq/ne are exact complements for floats
        if inner.op in ("eq", "ne") or not any(is_float(a.dtype) for a in inner.args):
            return Call(_NEGATED[inner.op], inner.args, BOOL)
    if op == "where" and is_const(args[0]):
        return args[1] if args[0].value else args[2]
    if op == "where" and dtype == BOOL and is_const(args[1]) and is_const(args[2]):
        if args[1].value and not args[2].value:
            return args[0]
        if not args[1].value and args[2].value:
            return call("not", args[0], dtype=BOOL)
    if op == "where" and args[1] == args[2]:
        return args[1]
    if op in COMPARISONS:
        # cmp(where(c, K1, K2), K) and cmp(float(bool), K): push the comparison into the branches
        for i in (0, 1):
            x, k = args[i], args[1 - i]
            if not is_const(k):
                continue
            if isinstance(x, Call) and x.op == "to" and x.args[0].dtype == BOOL:
                x = Call("where", (x.args[0], const(1, x.dtype), const(0, x.dtype)), x.dtype)
            if isinstance(x, Call) and x.op == "where" and is_const(x.args[1]) and is_const(x.args[2]):
                lhs = lambda branch: (branch, k) if i == 0 else (k, branch)  # noqa: E731
                return call("where", x.args[0], call(op, *lhs(x.args[1]), dtype=BOOL),
                            call(op, *lhs(x.args[2]), dtype=BOOL), dtype=BOOL)
    return Call(op, args, dtype)


_NEGATED = {"eq": "ne", "ne": "eq", "lt": "ge", "ge": "lt", "gt": "le", "le": "gt"}


def and_(x: Expr | None, y: Expr | None) -> Expr | None:
    """Conjunction where ``None`` means "always true"."""
    if x is None:
        return y
    if y is None:
        return x
    return call("and", x, y, dtype=BOOL)


def int_range(expr: Expr, ranges: Mapping[str, tuple[int, int]]) -> tuple[int, int] | None:
    """Conservative [lo, hi] of an integer expression given index ranges; None when unknown."""
    if isinstance(expr, Index):
        return ranges.get(expr.name)
    if isinstance(expr, Const):
        return (int(expr.value), int(expr.value)) if not isinstance(expr.value, float) else None
    if not isinstance(expr, Call) or not (is_int(expr.dtype) or expr.dtype == BOOL):
        return None
    if expr.op == "to":
        return int_range(expr.args[0], ranges) if not is_float(expr.args[0].dtype) else None
    rs = [int_range(a, ranges) for a in expr.args if not (expr.op == "where" and a is expr.args[0])]
    if any(r is None for r in rs):
        return None
    if expr.op == "where":
        return (min(rs[0][0], rs[1][0]), max(rs[0][1], rs[1][1]))
    if expr.op == "add":
        return (rs[0][0] + rs[1][0], rs[0][1] + rs[1][1])
    if expr.op == "sub":
        return (rs[0][0] - rs[1][1], rs[0][1] - rs[1][0])
    if expr.op == "neg":
        return (-rs[0][1], -rs[0][0])
    if expr.op == "mul":
        c = [a * b for a in rs[0] for b in rs[1]]
        return (min(c), max(c))
    if expr.op == "abs":
        lo, hi = rs[0]
        return (0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), max(abs(lo), abs(hi)))
    if expr.op in ("minimum", "maximum"):
        f = min if expr.op == "minimum" else max
        return (f(rs[0][0], rs[1][0]), f(rs[0][1], rs[1][1]))
    if expr.op == "floordiv" and rs[1][0] == rs[1][1] and rs[1][0] > 0:
        d = rs[1][0]
        return (rs[0][0] // d, rs[0][1] // d)
    if expr.op == "remainder" and rs[1][0] == rs[1][1] and rs[1][0] > 0:
        return (0, rs[1][0] - 1)
    return None


def _split_multiple(x: Expr, c: int):
    """x = a*c + y → (a, y); None when x has no such syntactic form."""
    def is_mul_c(e):
        if isinstance(e, Call) and e.op == "mul":
            for i in (0, 1):
                if is_const(e.args[i], c):
                    return e.args[1 - i]
        return None
    a = is_mul_c(x)
    if a is not None:
        return a, const(0, x.dtype)
    if isinstance(x, Call) and x.op == "add":
        for i in (0, 1):
            a = is_mul_c(x.args[i])
            if a is not None:
                return a, x.args[1 - i]
    return None


def simplify(expr: Expr, ranges: Mapping[str, tuple[int, int]]) -> Expr:
    """Fold what the index ranges decide: tautological comparisons (``q_idx >= 0``) and
    ``(b*H + h) // H``, ``(b*H + h) % H`` when ``0 <= h < H``.  Semantics-preserving on the index box."""
    memo: dict[Expr, Expr] = {}

    def go(e: Expr) -> Expr:
        if e in memo:
            return memo[e]
        if isinstance(e, Load):
            out: Expr = Load(e.buffer, tuple(go(i) for i in e.indices), e.dtype)
        elif isinstance(e, Call):
            args = tuple(go(a) for a in e.args)
            out = call(e.op, *args, dtype=e.dtype)
            out = _fold_by_range(out, ranges) if isinstance(out, Call) else out
        else:
            out = e
        memo[e] = out
        return out

    return go(expr)


def _fold_by_range(e: Call, ranges) -> Expr:
    if e.op in COMPARISONS and not any(is_float(a.dtype) for a in e.args):
        ra, rb = int_range(e.args[0], ranges), int_range(e.args[1], ranges)
        if ra is not None and rb is not None:
            (alo, ahi), (blo, bhi) = ra, rb
            decided = {
                "ge": (alo >= bhi, ahi < blo), "gt": (alo > bhi, ahi <= blo),
                "le": (ahi <= blo, alo > bhi), "lt": (ahi < blo, alo >= bhi),
                "eq": (alo == ahi == blo == bhi, ahi < blo or bhi < alo),
                "ne": (ahi < blo or bhi < alo, alo == ahi == blo == bhi),
            }[e.op]
            if decided[0]:
                return const(True, BOOL)
            if decided[1]:
                return const(False, BOOL)
    if e.op in ("floordiv", "remainder") and is_int(e.dtype) and is_const(e.args[1]) and e.args[1].value > 0:
        c = int(e.args[1].value)
        x = e.args[0]
        rx = int_range(x, ranges)
        if rx is not None and 0 <= rx[0] and rx[1] < c:
            return const(0, e.dtype) if e.op == "floordiv" else x
        split = _split_multiple(x, c)
        if split is not None:
            a, y = split
            ry = int_range(y, ranges)
            if ry is not None and 0 <= ry[0] and ry[1] < c:
                return a if e.op == "floordiv" else y
    return e


# ----------------------------------------------------------------------------- evaluation


def _apply(op: str, args: list[torch.Tensor], dtype: str) -> torch.Tensor:
    """Apply ``op`` with eager semantics; ``args`` are tensors in their own dtypes."""
    td = torch_dtype(dtype)
    if op == "to":
        return args[0].to(td)
    if op == "trunc_to":
        return args[0].trunc().to(td) if args[0].is_floating_point() else args[0].to(td)
    if op == "where":
        c, x, y = args
        return torch.where(c, x, y).to(td)
    fn: Callable = {
        "neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "exp2": torch.exp2,
        "log": torch.log, "log2": torch.log2, "log1p": torch.log1p, "expm1": torch.expm1,
        "tanh": torch.tanh, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
        "sigmoid": torch.sigmoid, "sin": torch.sin, "cos": torch.cos, "floor": torch.floor,
        "ceil": torch.ceil, "trunc": torch.trunc, "round": torch.round, "sign": torch.sign,
        "not": torch.logical_not, "erf": torch.erf, "reciprocal": torch.reciprocal,
        "add": torch.add, "sub": torch.sub, "mul": torch.mul, "truediv": torch.true_divide,
        "floordiv": torch.floor_divide, "remainder": torch.remainder, "pow": torch.pow,
        "minimum": torch.minimum, "maximum": torch.maximum, "eq": torch.eq, "ne": torch.ne,
        "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
        "and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor,
    }[op]
    if op in UNARY_OPS and args[0].dtype != td and op not in ("not",) and td.is_floating_point:
        # unary float maths on an int/bool input: eager promotes first
        args = [args[0].to(td)]
    if op in BINARY_OPS and op not in COMPARISONS and op not in LOGICAL:
        # eager computes binary arithmetic in the promoted (= result) dtype
        args = [a.to(td) for a in args]
    out = fn(*args)
    return out.to(td)


def evaluate(
    expr: Expr,
    indices: Mapping[str, torch.Tensor],
    captured: Sequence[torch.Tensor] = (),
    score_value: torch.Tensor | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """Evaluate ``expr`` with torch on broadcastable index tensors.

    ``indices`` maps ``b, h, q_idx, kv_idx`` to int64 tensors that broadcast
    against each other (e.g. shapes [B,1,1,1], [1,H,1,1], [1,1,Lq,1], [1,1,1,Lk]).
    The result broadcasts to their common shape.  Shared subtrees are
    evaluated once per call.
    """
    cache = {} if cache is None else cache

    def go(e: Expr) -> torch.Tensor:
        hit = cache.get(e)
        if hit is not None:
            return hit
        if isinstance(e, Index):
            out = indices[e.name]
        elif isinstance(e, Score):
            if score_value is None:
                raise ValueError("expression uses `score` but no score was given")
            out = score_value
        elif isinstance(e, Const):
            dev = next(iter(indices.values())).device if indices else None
            out = torch.full((), e.value, dtype=torch_dtype(e.dtype), device=dev)
        elif isinstance(e, Load):
            t = captured[e.buffer]
            idx = [go(i).long() for i in e.indices]
            if not idx:
                out = t.reshape(())
            else:
                idx = torch.broadcast_tensors(*idx)
                out = t[tuple(idx)]
            out = out.to(torch_dtype(e.dtype))
        elif isinstance(e, Call):
            out = _apply(e.op, [go(a) for a in e.args], e.dtype)
        else:  # pragma: no cover - closed hierarchy
            raise TypeError(type(e))
        cache[e] = out
        return out

    return go(expr)


# ----------------------------------------------------------------------------- queries


def free_symbols(expr: Expr) -> set[str]:
    """Index names and ``score`` that ``expr`` depends on (``buffer:N`` for loads)."""
    out: set[str] = set()
    for e in expr.walk():
        if isinstance(e, Index):
            out.add(e.name)
        elif isinstance(e, Score):
            out.add(SCORE)
        elif isinstance(e, Load):
            out.add(f"buffer:{e.buffer}")
    return out


def uses_score(expr: Expr) -> bool:
    return any(isinstance(e, Score) for e in expr.walk())


def loads(expr: Expr) -> list[Load]:
    """The distinct loads of ``expr`` in walk order (a fresh list; the walk is cached per expression:
    the runtime asks on every call)."""
    return list(_loads(expr))


@functools.lru_cache(maxsize=1024)
def _loads(expr: Expr) -> tuple[Load, ...]:
    seen: dict[Load, None] = {}
    for e in expr.walk():
        if isinstance(e, Load):
            seen[e] = None
    return tuple(seen)


def substitute(expr: Expr, mapping: Mapping[Expr, Expr]) -> Expr:
    """Replace subtrees (structural match), rebuilding with the folding builders."""
    memo: dict[Expr, Expr] = {}

    def go(e: Expr) -> Expr:
        if e in mapping:
            return mapping[e]
        if e in memo:
            return memo[e]
        if isinstance(e, Load):
            out: Expr = Load(e.buffer, tuple(go(i) for i in e.indices), e.dtype)
        elif isinstance(e, Call):
            out = call(e.op, *(go(a) for a in e.args), dtype=e.dtype)
        else:
            out = e
        memo[e] = out
        return out

    return go(expr)


# ----------------------------------------------------------------------------- differentiation

_NOT_DIFFERENTIABLE = ("floor", "ceil", "trunc", "round", "sign", "trunc_to", "floordiv") + COMPARISONS + LOGICAL


class NotDifferentiable(ValueError):
    pass


def float_range(expr: Expr) -> tuple[float, float] | None:
    """A proven ``[lo, hi]`` for a float expression, or None when it may be unbounded.

    Interval arithmetic over constants, ``tanh``/``sigmoid``/``sin``/``cos``
    (bounded whatever their argument), ``+ - *``, ``neg``, ``abs``, float
    casts and ``where``; anything else (the score, loads, division) is
    unbounded.  Used to keep a derivative such as softcap's 1 - tanh² in a
    16-bit register (Note [backward register pressure] in attn_bwd.py).
    """
    if isinstance(expr, Const):
        if isinstance(expr.value, bool) or not math.isfinite(float(expr.value)):
            return None
        return float(expr.value), float(expr.value)
    if not isinstance(expr, Call) or not is_float(expr.dtype):
        return None
    op, a = expr.op, expr.args
    if op == "tanh":
        return -1.0, 1.0
    if op == "sigmoid":
        return 0.0, 1.0
    if op in ("sin", "cos"):
        return -1.0, 1.0
    if op == "where":
        x, y = float_range(a[1]), float_range(a[2])
        return None if x is None or y is None else (min(x[0], y[0]), max(x[1], y[1]))
    if op == "to":
        return float_range(a[0]) if is_float(a[0].dtype) else None
    x = float_range(a[0])
    if x is None:
        return None
    if op == "neg":
        return -x[1], -x[0]
    if op == "abs":
        return (0.0 if x[0] <= 0.0 <= x[1] else min(abs(x[0]), abs(x[1]))), max(abs(x[0]), abs(x[1]))
    if op not in ("add", "sub", "mul"):
        return None
    y = float_range(a[1])
    if y is None:
        return None
    if op == "add":
        return x[0] + y[0], x[1] + y[1]
    if op == "sub":
        return x[0] - y[1], x[1] - y[0]
    products = [i * j for i in x for j in y]
    return min(products), max(products)


def _round_f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def diff(expr: Expr, wrt: Expr) -> Expr:
    """Symbolic d(expr)/d(wrt) in fp32, where ``wrt`` is ``score`` or a ``Load``.

    Piecewise-constant ops (floor, comparisons, integer casts) have derivative
    zero almost everywhere, as autograd says; ``where`` differentiates each
    branch.  Raises :class:`NotDifferentiable` for ops with no rule.
    """
    F = "float32"
    zero, one = const(0.0, F), const(1.0, F)
    memo: dict[Expr, Expr] = {}

    def f32(e: Expr) -> Expr:
        return call("to", e, dtype=F)

    def mul(x, y):
        if is_const(x, 0.0) or is_const(y, 0.0):
            return zero
        if is_const(x) and not is_const(y):
            x, y = y, x
        if is_const(y) and isinstance(x, Call) and x.op == "mul" and x.dtype == F and is_const(x.args[1]) \
                and is_float(x.args[1].dtype) and is_float(y.dtype):
            # (x * c1) * c2 -> x * fp32(c1 * c2): chain rules through scaled arguments (softcap's
            # tanh(s / cap) * cap) multiply constants that cancel; one rounding instead of two
            return mul(x.args[0], const(_round_f32(float(x.args[1].value) * float(y.value)), F))
        return call("mul", x, y, dtype=F)

    def add(x, y):
        return call("add", x, y, dtype=F)

    def go(e: Expr) -> Expr:
        if e == wrt:
            return one
        if e in memo:
            return memo[e]
        if isinstance(e, (Index, Const, Score, Load)):
            out: Expr = zero
        else:
            assert isinstance(e, Call)
            if not any(a == wrt or _contains(a, wrt) for a in e.args):
                out = zero
            elif e.op in _NOT_DIFFERENTIABLE:
                out = zero
            else:
                out = _rule(e)
        memo[e] = out
        return out

    def _rule(e: Call) -> Expr:
        a = e.args
        x = f32(a[0])
        dx = go(a[0])
        op = e.op
        if op == "to":
            return dx if is_float(e.dtype) else zero
        if op == "neg":
            return call("neg", dx, dtype=F)
        if op == "abs":
            return mul(call("sign", x, dtype=F), dx)
        if op == "exp":
            return mul(call("exp", x, dtype=F), dx)
        if op == "exp2":
            return mul(mul(call("exp2", x, dtype=F), const(math.log(2.0), F)), dx)
        if op == "log":
            return mul(call("reciprocal", x, dtype=F), dx)
        if op == "log2":
            return mul(call("reciprocal", mul(x, const(math.log(2.0), F)), dtype=F), dx)
        if op == "log1p":
            return mul(call("reciprocal", add(x, one), dtype=F), dx)
        if op == "expm1":
            return mul(call("exp", x, dtype=F), dx)
        if op == "tanh":
            t = call("tanh", x, dtype=F)
            return mul(call("sub", one, mul(t, t), dtype=F), dx)
        if op == "sigmoid":
            s = call("sigmoid", x, dtype=F)
            return mul(mul(s, call("sub", one, s, dtype=F)), dx)
        if op == "sqrt":
            return mul(call("truediv", const(0.5, F), call("sqrt", x, dtype=F), dtype=F), dx)
        if op == "rsqrt":
            r = call("rsqrt", x, dtype=F)
            return mul(mul(const(-0.5, F), mul(r, mul(r, r))), dx)
        if op == "reciprocal":
            r = call("reciprocal", x, dtype=F)
            return mul(call("neg", mul(r, r), dtype=F), dx)
        if op == "sin":
            return mul(call("cos", x, dtype=F), dx)
        if op == "cos":
            return mul(call("neg", call("sin", x, dtype=F), dtype=F), dx)
        if op == "erf":
            g = mul(const(2.0 / math.sqrt(math.pi), F), call("exp", call("neg", mul(x, x), dtype=F), dtype=F))
            return mul(g, dx)
        if op == "where":
            return call("where", a[0], go(a[1]), go(a[2]), dtype=F)
        y = f32(a[1])
        dy = go(a[1])
        if op == "add":
            return add(dx, dy)
        if op == "sub":
            return call("sub", dx, dy, dtype=F)
        if op == "mul":
            return add(mul(dx, y), mul(x, dy))
        if op == "truediv":
            return call("sub", call("truediv", dx, y, dtype=F),
                        mul(dy, call("truediv", x, mul(y, y), dtype=F)), dtype=F)
        if op == "pow":
            if not is_const(dy, 0.0):
                raise NotDifferentiable("pow with a score-dependent exponent")
            return mul(mul(y, call("pow", x, call("sub", y, one, dtype=F), dtype=F)), dx)
        if op in ("minimum", "maximum"):
            pick_x = call("le" if op == "minimum" else "ge", x, y, dtype=BOOL)
            return call("where", pick_x, dx, dy, dtype=F)
        if op == "remainder":
            return dx
        raise NotDifferentiable(op)

    return go(expr)


def _contains(e: Expr, target: Expr) -> bool:
    return any(n == target for n in e.walk())


# ----------------------------------------------------------------------------- printing

_INFIX = {
    "add": ("+", 4), "sub": ("-", 4), "mul": ("*", 5), "truediv": ("/", 5),
    "floordiv": ("//", 5), "remainder": ("%", 5), "pow": ("**", 7),
    "eq": ("==", 3), "ne": ("!=", 3), "lt": ("<", 3), "le": ("<=", 3), "gt": (">", 3), "ge": (">=", 3),
    "and": ("&", 2), "xor": ("^", 1), "or": ("|", 0),
}


_NON_ASSOCIATIVE = ("sub", "truediv", "floordiv", "remainder", "pow")


def _fmt_const(c: Const) -> str:
    v = c.value
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "-inf" if v < 0 else "inf"
        if c.dtype in FLOAT_DTYPES and v == torch.finfo(torch_dtype(c.dtype)).min:
            return f"finfo({c.dtype}).min"
        if v == -torch.finfo(torch.float32).max:
            return "finfo(float32).min"
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.6g}"
    return str(v)


def format_expr(expr: Expr, names: Sequence[str] | None = None) -> str:
    """Readable infix form; ``names`` labels captured tensors (default ``buf0``...)."""

    def go(e: Expr, parent_prec: int = -1) -> str:
        if isinstance(e, Index):
            return e.name
        if isinstance(e, Score):
            return "score"
        if isinstance(e, Const):
            return _fmt_const(e)
        if isinstance(e, Load):
            name = names[e.buffer] if names and e.buffer < len(names) else f"buf{e.buffer}"
            return f"{name}[{', '.join(go(i) for i in e.indices)}]"
        assert isinstance(e, Call)
        if e.op in ("to", "trunc_to"):
            inner = go(e.args[0], parent_prec)
            if e.op == "trunc_to" and is_float(e.args[0].dtype):
                return f"int({go(e.args[0])})"
            return inner
        if e.op in _INFIX:
            sym, prec = _INFIX[e.op]
            child_prec = prec + 0.5 if e.op in COMPARISONS else prec
            left = go(e.args[0], child_prec)
            right = go(e.args[1], prec + 1 if e.op in _NON_ASSOCIATIVE else child_prec)
            s = f"{left} {sym} {right}"
            return f"({s})" if prec < parent_prec else s
        if e.op == "neg":
            return f"-{go(e.args[0], 6)}"
        if e.op == "not":
            return f"~{go(e.args[0], 6)}"
        if e.op == "where":
            return f"where({go(e.args[0])}, {go(e.args[1])}, {go(e.args[2])})"
        if e.op in ("minimum", "maximum"):
            return f"{e.op[:3]}({go(e.args[0])}, {go(e.args[1])})"
        return f"{e.op}({', '.join(go(a) for a in e.args)})"

    return go(expr)


# ----------------------------------------------------------------------------- serialisation


def to_json(expr: Expr) -> list | dict:
    if isinstance(expr, Index):
        return {"index": expr.name}
    if isinstance(expr, Score):
        return {"score": True}
    if isinstance(expr, Const):
        v = expr.value
        if isinstance(v, float) and math.isinf(v):
            v = "inf" if v > 0 else "-inf"
        return {"const": v, "dtype": expr.dtype}
    if isinstance(expr, Load):
        return {"load": expr.buffer, "idx": [to_json(i) for i in expr.indices], "dtype": expr.dtype}
    assert isinstance(expr, Call)
    return {"op": expr.op, "args": [to_json(a) for a in expr.args], "dtype": expr.dtype}


def from_json(data) -> Expr:
    if "index" in data:
        return Index(data["index"])
    if "score" in data:
        return Score()
    if "const" in data:
        v = data["const"]
        if v in ("inf", "-inf"):
            v = float(v)
        return Const(v, data["dtype"])
    if "load" in data:
        return Load(int(data["load"]), tuple(from_json(i) for i in data["idx"]), data["dtype"])
    return Call(data["op"], tuple(from_json(a) for a in data["args"]), data["dtype"])
