"""IR -> Triton printer for the score/mask hooks: the only generated code.

``render_hooks(score, mask, captured_meta)`` prints a small module of
``@triton.jit`` functions from the expression trees (one visitor case per op,
never string pasting in lowering code), writes it to a cache directory under
the hash of its source, imports it and returns the functions.  The static
kernels (``attn_fwd.py``, ``attn_bwd.py``) receive them as ``tl.constexpr``
arguments and call them; captured tensors arrive as a tuple of pointers plus a
flat tuple of strides.  Both are ordinary kernel arguments since Triton 3.2
(tuple arguments; ``JITFunction`` arguments specialise as constexpr keyed by
the function's ``cache_key``) and run under the interpreter.

The hook signatures are fixed (the kernels rely on them)::

    score_mod(score, off_b, off_h, q_idx, kv_idx, q_ok, kv_ok, CAPTURED, STRIDES) -> fp32 tile
    mask_mod(off_b, off_h, q_idx, kv_idx, q_ok, kv_ok, CAPTURED, STRIDES)         -> bool (broadcastable)
    score_mod_grad(score, off_b, off_h, q_idx, kv_idx, q_ok, kv_ok, CAPTURED, STRIDES)
                                                       -> (score_mod, d(score_mod)/d(score))
    captured_grad(ds, score, off_b, off_h, q_idx, kv_idx, q_ok, kv_ok, live, CAPTURED, STRIDES,
                  GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES, KV_AXIS, MODE)

``q_idx``/``kv_idx`` are int32 tiles shaped to broadcast against each other
([M,1] and [1,N] in the forward; transposed in the dK/dV kernel), ``q_ok`` /
``kv_ok`` their bounds; ``off_b``/``off_h`` int32 scalars (``h`` is the query
head).  ``captured_grad`` adds ``ds * d(score_mod)/d(load)`` for every load of a
captured tensor that needs a gradient (Note [captured gradients] in hook_lib).

Numerics (the IR's dtypes are eager's):
- float maths in fp32 (fp64 for float64 nodes); a node typed fp16/bf16 is
  rounded to that type after it is computed, so casts and low-precision eager
  arithmetic are honoured; loads are widened exactly.
- integer maths in int32 where interval analysis over the index bounds proves
  every intermediate fits, else int64; a node whose eager dtype is narrower than
  its value range wraps as eager does (``to`` / ``trunc_to`` honoured).
- aten semantics where Triton's differ: floor division and remainder, NaN-
  propagating min/max, round-half-even.
- loads are masked by the bounds of the indices they depend on (padded rows and
  columns may compute out-of-range indices); loads that depend only on
  ``b``/``h`` are unmasked scalar loads.

What it does not do: integer ``pow``, integer-typed ``truediv`` (both raise
:class:`UnsupportedHook`), score-dependent ``pow`` exponents in the backward
(``E.diff`` refuses them).  Captured gradients accumulate in fp32 whatever the
tensor's dtype.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import _compat
from ..lowering import expr as E
from ..lowering.expr import Call, Const, Expr, Index, Load, Score

__all__ = ["CapturedMeta", "IndexBounds", "Hooks", "UnsupportedHook", "captured_meta_of", "render_source",
           "render_hooks", "hook_cache_dir"]

# The generated module's layout version: bump when the printed shape of hooks changes.
_FORMAT = 2
F16_MAX = 65504.0

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
_INT_RANGE = {
    "bool": (0, 1), "uint8": (0, 255), "int8": (-128, 127), "int16": (-(2**15), 2**15 - 1),
    "int32": (I32_MIN, I32_MAX), "int64": (I64_MIN, I64_MAX),
}
_TL_DTYPE = {
    "bool": "tl.int1", "uint8": "tl.uint8", "int8": "tl.int8", "int16": "tl.int16", "int32": "tl.int32",
    "int64": "tl.int64", "float16": "tl.float16", "bfloat16": "tl.bfloat16", "float32": "tl.float32",
    "float64": "tl.float64",
}
# compute types: what a value is held in inside the hook
I1, I32, I64, F32, F64 = "i1", "i32", "i64", "f32", "f64"
_CT_TL = {I1: "tl.int1", I32: "tl.int32", I64: "tl.int64", F32: "tl.float32", F64: "tl.float64"}

# op -> tl function for float unary ops that map one to one
_FLOAT_UNARY = {
    "exp": "tl.exp", "exp2": "tl.exp2", "log": "tl.log", "log2": "tl.log2", "sqrt": "tl.sqrt_rn",
    "rsqrt": "tl.rsqrt", "sin": "tl.sin", "cos": "tl.cos", "erf": "tl.erf", "floor": "tl.floor",
    "ceil": "tl.ceil", "sigmoid": "tl.sigmoid", "abs": "tl.abs",
    "tanh": "lib.tanh", "log1p": "lib.log1p", "expm1": "lib.expm1", "trunc": "lib.trunc", "round": "lib.rint",
    "sign": "lib.sign_float",
}
# with ``fast_math`` (16-bit inputs on the GPU: Note [fast transcendentals]) these replace the above
_FAST_UNARY = {"tanh": "lib.tanh_approx"}


class UnsupportedHook(NotImplementedError):
    """The expression uses something the Triton printer does not handle (message says what)."""


@dataclass(frozen=True)
class CapturedMeta:
    """What the printer needs to know about one captured tensor."""

    dtype: str                  # IR dtype name ("float32", "int64", "bool", ...)
    ndim: int
    needs_grad: bool = False
    wide_offsets: bool = False  # element offsets can exceed int32: index maths in int64


def captured_meta_of(captured: Sequence[torch.Tensor], needs_grad: Sequence[bool] | None = None
                     ) -> tuple[CapturedMeta, ...]:
    out = []
    for i, t in enumerate(captured):
        # the largest element offset into the tensor or into its contiguous gradient buffer
        extent = max(sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0), t.numel())
        out.append(CapturedMeta(E.dtype_name(t.dtype), t.dim(), bool(needs_grad[i]) if needs_grad else False,
                                extent > I32_MAX // 2))
    return tuple(out)


@dataclass(frozen=True)
class IndexBounds:
    """Exclusive upper bounds of b, h, q_idx, kv_idx as the kernel sees them (padded tiles included)."""

    b: int = 2**16
    h: int = 2**16
    q: int = 2**24
    kv: int = 2**24

    def of(self, name: str) -> int:
        return {"b": self.b, "h": self.h, "q_idx": self.q, "kv_idx": self.kv}[name]

    @staticmethod
    def bucketed(batch: int, heads: int, q_len: int, kv_len: int, pad: int = 256) -> "IndexBounds":
        """Powers of two above the padded sizes, so nearby shapes share one rendering."""
        p2 = lambda n: 1 << max(int(n) - 1, 1).bit_length()  # noqa: E731
        return IndexBounds(p2(batch), p2(heads), p2(q_len + pad), p2(kv_len + pad))


# ----------------------------------------------------------------------------- analysis


def _ranges(exprs: Sequence[Expr], bounds: IndexBounds) -> tuple[dict, dict]:
    """Value intervals of every integer/bool node: (after eager's wrap to its dtype, before it)."""
    memo: dict[Expr, tuple[int, int]] = {}
    exact: dict[Expr, tuple[int, int]] = {}

    def go(e: Expr) -> None:
        if e in memo:
            return
        for c in e.children():
            go(c)
        if E.is_int(e.dtype) or e.dtype == E.BOOL:
            lo, hi = _exact(e)
            exact[e] = (lo, hi)
            dlo, dhi = _INT_RANGE[e.dtype]
            memo[e] = (lo, hi) if dlo <= lo and hi <= dhi else (dlo, dhi)

    def arg(e: Expr) -> tuple[int, int]:
        if e.dtype == E.BOOL or E.is_int(e.dtype):
            return memo[e]
        return (I64_MIN, I64_MAX)  # a float converted to an integer: anything

    def _exact(e: Expr) -> tuple[int, int]:
        if e.dtype == E.BOOL:
            return (0, 1)
        if isinstance(e, Index):
            return (0, bounds.of(e.name) - 1)
        if isinstance(e, Const):
            return (int(e.value), int(e.value))
        if isinstance(e, Load):
            return _INT_RANGE[e.dtype]
        assert isinstance(e, Call)
        op = e.op
        if op in ("to", "trunc_to", "floor", "ceil", "trunc", "round"):
            return arg(e.args[0])
        if op == "neg":
            lo, hi = arg(e.args[0])
            return (-hi, -lo)
        if op == "abs":
            lo, hi = arg(e.args[0])
            return (0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), max(abs(lo), abs(hi)))
        if op == "sign":
            return (-1, 1)
        if op == "where":
            (alo, ahi), (blo, bhi) = arg(e.args[1]), arg(e.args[2])
            return (min(alo, blo), max(ahi, bhi))
        (alo, ahi), (blo, bhi) = arg(e.args[0]), arg(e.args[1])
        if op == "add":
            return (alo + blo, ahi + bhi)
        if op == "sub":
            return (alo - bhi, ahi - blo)
        if op == "mul":
            corners = [alo * blo, alo * bhi, ahi * blo, ahi * bhi]
            return (min(corners), max(corners))
        if op in ("minimum", "maximum"):
            f = min if op == "minimum" else max
            return (f(alo, blo), f(ahi, bhi))
        if op == "floordiv":
            if blo > 0 or bhi < 0:
                corners = [alo // blo, alo // bhi, ahi // blo, ahi // bhi]
                return (min(corners), max(corners))
            m = max(abs(alo), abs(ahi))
            return (-m, m)
        if op == "remainder":
            m = max(abs(blo), abs(bhi))
            if blo > 0 and alo >= 0:
                return (0, min(ahi, m - 1))
            return (-(m - 1), m - 1)
        return (I64_MIN - 1, I64_MAX + 1)  # pow and anything else: unknown

    for x in exprs:
        go(x)
    return memo, exact


def _deps(e: Expr, memo: dict) -> frozenset:
    """Which of q_idx / kv_idx / score a value varies with (loads included)."""
    if e in memo:
        return memo[e]
    if isinstance(e, Index):
        out = frozenset({e.name}) if e.name in ("q_idx", "kv_idx") else frozenset()
    elif isinstance(e, Score):
        out = frozenset({"score"})
    else:
        out = frozenset()
        for c in e.children():
            out |= _deps(c, memo)
    memo[e] = out
    return out


# ----------------------------------------------------------------------------- printer


def _fmt_float(v: float) -> str:
    if math.isinf(v):
        return 'float("inf")' if v > 0 else 'float("-inf")'
    if math.isnan(v):
        return 'float("nan")'
    return repr(float(v))


class _Printer:
    """Prints one hook body: a CSE'd sequence of assignments ``tN = ...``."""

    def __init__(self, metas: Sequence[CapturedMeta], stride_offsets: Sequence[int], ranges, deps_memo,
                 names: dict[str, str], fast_math: bool = False):
        self.fast_math = fast_math
        self.metas = metas
        self.stride_offsets = stride_offsets
        self.ranges, self.exact = ranges
        self.deps_memo = deps_memo
        self.names = names  # hook parameter names for score / indices / bounds
        self.lines: list[str] = []
        self.memo: dict[Expr, tuple[str, str]] = {}
        self.counter = 0

    # -- types -----------------------------------------------------------------
    def ct(self, e: Expr) -> str:
        """The compute type of a node."""
        if e.dtype == E.BOOL:
            return I1
        if E.is_int(e.dtype):
            lo, hi = self.ranges[e]
            return I32 if I32_MIN <= lo and hi <= I32_MAX else I64
        if e.dtype == "float64":
            return F64
        return F32

    def deps(self, e: Expr) -> frozenset:
        return _deps(e, self.deps_memo)

    def fresh(self) -> str:
        self.counter += 1
        return f"t{self.counter}"

    def assign(self, code: str) -> str:
        name = self.fresh()
        self.lines.append(f"{name} = {code}")
        return name

    # -- values ----------------------------------------------------------------
    def value(self, e: Expr, want: str | None = None, tensor: bool = False) -> str:
        """Code for ``e`` converted to compute type ``want`` (default: its own)."""
        want = want or self.ct(e)
        if isinstance(e, Const):
            return self.const(e.value, want, tensor)
        code, ct = self.emit(e)
        return self.convert(code, ct, want)

    def const(self, v, want: str, tensor: bool) -> str:
        if want == I1:
            lit = "True" if bool(v) else "False"
            return f"tl.full([], {int(bool(v))}, tl.int1)" if tensor else lit
        if want in (I32, I64):
            iv = int(v)
            if want == I64 or tensor or not (I32_MIN <= iv <= I32_MAX):
                return f"tl.full([], {iv}, {_CT_TL[want]})"
            return str(iv)
        fv = float(v)
        if want == F64 or tensor:
            return f"tl.full([], {_fmt_float(fv)}, {_CT_TL[want]})"
        return _fmt_float(fv)

    @staticmethod
    def convert(code: str, have: str, want: str) -> str:
        if have == want:
            return code
        if want == I1:
            return f"({code} != 0)"
        if have in (F32, F64) and want in (I32, I64):
            return f"{code}.to({_CT_TL[want]})"  # truncates toward zero, as Tensor.to(int)
        return f"{code}.to({_CT_TL[want]})"

    def emit(self, e: Expr) -> tuple[str, str]:
        hit = self.memo.get(e)
        if hit is not None:
            return hit
        if isinstance(e, Index):
            out = (self.names[e.name], I32)
        elif isinstance(e, Score):
            out = (self.names["score"], F32)
        elif isinstance(e, Const):
            ct = self.ct(e)
            out = (self.assign(self.const(e.value, ct, tensor=True)), ct)
        elif isinstance(e, Load):
            out = self.emit_load(e)
        else:
            assert isinstance(e, Call)
            out = self.emit_call(e)
        self.memo[e] = out
        return out

    def mask_for(self, deps: frozenset) -> str | None:
        """Bounds mask matching a value that varies with ``deps``."""
        q = "q_idx" in deps or "score" in deps
        kv = "kv_idx" in deps or "score" in deps
        if q and kv:
            return f"({self.names['q_ok']} & {self.names['kv_ok']})"
        if q:
            return self.names["q_ok"]
        if kv:
            return self.names["kv_ok"]
        return None

    def offsets(self, load: Load, strides_name: str) -> str:
        meta = self.metas[load.buffer]
        if len(load.indices) != meta.ndim:
            raise UnsupportedHook(f"load of buffer {load.buffer} has {len(load.indices)} indices, "
                                  f"tensor has {meta.ndim} dims")
        if not load.indices:
            return "0"
        terms = []
        base = self.stride_offsets[load.buffer]
        for d, idx in enumerate(load.indices):
            if not (E.is_int(idx.dtype) or idx.dtype == E.BOOL):
                raise UnsupportedHook(f"non-integer index into buffer {load.buffer}: {E.format_expr(idx)}")
            want = I64 if meta.wide_offsets else (I64 if self.ct(idx) == I64 else I32)
            code = self.value(idx, want)
            terms.append(f"{code} * {strides_name}[{base + d}]")
        return " + ".join(terms)

    def emit_load(self, e: Load) -> tuple[str, str]:
        ptr = self.assign(f"CAPTURED[{e.buffer}] + {self.offsets(e, 'STRIDES')}" if e.indices
                          else f"CAPTURED[{e.buffer}]")
        mask = self.mask_for(self.deps(e))
        raw = f"tl.load({ptr}, mask={mask}, other=0)" if mask else f"tl.load({ptr})"
        meta_dtype = self.metas[e.buffer].dtype
        if meta_dtype == E.BOOL:  # passed as uint8
            loaded, have = f"({raw} != 0)", I1
        elif E.is_float(meta_dtype):
            have = F64 if meta_dtype == "float64" else F32
            loaded = f"{raw}.to({_CT_TL[have]})"
        else:
            have = I64 if meta_dtype == "int64" else I32
            loaded = f"{raw}.to({_CT_TL[have]})"
        ct = self.ct(e)
        code = self.convert(loaded, have, ct)
        if meta_dtype != e.dtype:
            # the IR reads the tensor as another dtype (eager converted it): round/wrap to that dtype
            narrower_float = e.dtype in ("float16", "bfloat16") and meta_dtype in ("float32", "float64")
            if narrower_float or (E.is_int(e.dtype) and _INT_RANGE[e.dtype] != _INT_RANGE.get(meta_dtype)):
                code = self.round_to(e.dtype, code, ct)
        return self.assign(code), ct

    @staticmethod
    def round_to(dtype: str, code: str, ct: str) -> str:
        """Eager's rounding (fp16/bf16) or wrapping (narrow ints) of a value held in ``ct``."""
        if dtype == "float16":
            return f"lib.round_to_fp16({code})"
        if dtype == "bfloat16":
            return f"lib.round_to_bf16({code})"
        if dtype in ("int8", "int16", "uint8") or (dtype == "int32" and ct == I64):
            return f"{code}.to({_TL_DTYPE[dtype]}).to({_CT_TL[ct]})"
        return code

    def finish(self, e: Call, code: str, have: str) -> tuple[str, str]:
        """Name the result of ``e`` (computed in ``have``) in its compute type, wrapped/rounded as eager."""
        ct = self.ct(e)
        code = self.convert(code, have, ct)
        if E.is_float(e.dtype) and e.dtype in ("float16", "bfloat16"):
            code = self.round_to(e.dtype, code, ct)
        elif E.is_int(e.dtype) and self.needs_wrap(e):
            code = self.round_to(e.dtype, code, ct)
        return self.assign(code), ct

    def needs_wrap(self, e: Call) -> bool:
        """Does eager wrap this integer node (its exact value can leave its dtype)?"""
        lo, hi = _INT_RANGE[e.dtype]
        xlo, xhi = self.exact[e]
        return not (lo <= xlo and xhi <= hi)

    def widest(self, e: Call) -> str:
        """Integer ops run in the widest of the result's and the arguments' types."""
        cts = [self.ct(e)] + [self.ct(a) for a in e.args if E.is_int(a.dtype)]
        return I64 if I64 in cts else self.ct(e)

    def emit_call(self, e: Call) -> tuple[str, str]:
        op, args = e.op, e.args
        ct = self.ct(e)
        if op in ("to", "trunc_to"):
            (x,) = args
            src_ct = self.ct(x)
            if ct == I1:
                return self.finish(e, f"({self.value(x)} != 0)", I1)
            if ct in (I32, I64) and src_ct in (F32, F64):
                return self.finish(e, f"{self.value(x, tensor=True)}.to(tl.int64)", I64)
            if ct in (I32, I64):
                wide = I64 if I64 in (ct, src_ct) else I32
                return self.finish(e, self.value(x, wide), wide)
            return self.finish(e, self.value(x, ct, tensor=True), ct)
        if op in ("not",):
            return self.finish(e, f"({self.value(args[0], I1)} == 0)", I1)
        if op in E.LOGICAL:
            sym = {"and": "&", "or": "|", "xor": "^"}[op]
            return self.finish(e, f"({self.value(args[0], I1)} {sym} {self.value(args[1], I1)})", I1)
        if op in E.COMPARISONS:
            common = _common_ct(self.ct(args[0]), self.ct(args[1]))
            sym = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}[op]
            a, b = self.value(args[0], common), self.value(args[1], common)
            if isinstance(args[0], Const) and isinstance(args[1], Const):  # pragma: no cover - folded
                a = self.value(args[0], common, tensor=True)
            return self.finish(e, f"({a} {sym} {b})", I1)
        if op == "where":
            c = self.value(args[0], I1)
            x, y = self.value(args[1], ct), self.value(args[2], ct)
            return self.finish(e, f"tl.where({c}, {x}, {y})", ct)
        is_float = ct in (F32, F64)
        if not is_float:
            ct = self.widest(e)
        if op in E.UNARY_OPS:
            (x,) = args
            if not is_float:  # integer results
                if op in ("floor", "ceil", "trunc", "round"):
                    return self.finish(e, self.value(x, ct), ct)
                if op == "neg":
                    return self.finish(e, f"(-{self.value(x, ct, tensor=True)})", ct)
                if op == "abs":
                    return self.finish(e, f"tl.abs({self.value(x, ct, tensor=True)})", ct)
                if op == "sign":
                    return self.finish(e, f"lib.sign_int({self.value(x, ct, tensor=True)})", ct)
                raise UnsupportedHook(f"integer-valued {op}")
            xv = self.value(x, ct, tensor=True)
            if op == "neg":
                return self.finish(e, f"(-{xv})", ct)
            if op == "reciprocal":
                return self.finish(e, f"(1.0 / {xv})", ct)
            if self.fast_math and ct == F32 and op in _FAST_UNARY:
                return self.finish(e, f"{_FAST_UNARY[op]}({xv})", ct)
            if op in _FLOAT_UNARY:
                return self.finish(e, f"{_FLOAT_UNARY[op]}({xv})", ct)
            raise UnsupportedHook(f"unary op {op}")
        # binary arithmetic: eager computes in the result dtype
        a, b = args
        av, bv = self.value(a, ct), self.value(b, ct)
        if isinstance(a, Const) and isinstance(b, Const):  # pragma: no cover - folded by the builders
            av = self.value(a, ct, tensor=True)
        if op in ("add", "sub", "mul"):
            sym = {"add": "+", "sub": "-", "mul": "*"}[op]
            return self.finish(e, f"({av} {sym} {bv})", ct)
        if op == "truediv":
            if not is_float:
                raise UnsupportedHook("integer-typed truediv")
            if self.fast_math and ct == F32 and isinstance(b, Const) and math.isfinite(float(b.value)) \
                    and float(b.value) != 0.0:
                # Note [fast transcendentals] in hook_lib: x / c as x * (1/c), within 1.5 ulp; fp32 division
                # is a reciprocal on the MUFU plus a Newton step and a slow-path check per element
                recip = float(torch.tensor(1.0 / float(b.value), dtype=torch.float32))
                return self.finish(e, f"({av} * {_fmt_float(recip)})", ct)
            return self.finish(e, f"({av} / {bv})", ct)
        if op in ("floordiv", "remainder"):
            fn = f"lib.{op}_{'float' if is_float else 'int'}"
            # integer divisors stay literals (division by a constant folds); float helpers need tensors
            bv = self.value(b, ct, tensor=True) if is_float else bv
            return self.finish(e, f"{fn}({self.value(a, ct, tensor=True)}, {bv})", ct)
        if op in ("minimum", "maximum"):
            fn = "tl.minimum" if op == "minimum" else "tl.maximum"
            av = self.value(a, ct, tensor=True)
            nan = ", propagate_nan=tl.PropagateNan.ALL" if is_float else ""
            return self.finish(e, f"{fn}({av}, {bv}{nan})", ct)
        if op == "pow":
            if not is_float:
                raise UnsupportedHook("integer pow")
            return self.finish(e, f"lib.pow_float({self.value(a, ct, tensor=True)}, "
                                  f"{self.value(b, ct, tensor=True)})", ct)
        raise UnsupportedHook(f"op {op}")


def _common_ct(a: str, b: str) -> str:
    if F64 in (a, b):
        return F64
    if F32 in (a, b):
        return F32
    if I64 in (a, b):
        return I64
    if I32 in (a, b):
        return I32
    return I1


# ----------------------------------------------------------------------------- module


_HEADER = '''\
# Generated by attn_inductor.templates.hooks (format {fmt}); do not edit.
{comments}
import triton
import triton.language as tl

from attn_inductor.templates import hook_lib as lib
'''

_SIG_SCORE = "(score, off_b, off_h, q_idx, kv_idx, q_ok, kv_ok, CAPTURED, STRIDES)"
_SIG_MASK = "(off_b, off_h, q_idx, kv_idx, q_ok, kv_ok, CAPTURED, STRIDES)"
_SIG_CGRAD = ("(ds, score, off_b, off_h, q_idx, kv_idx, q_ok, kv_ok, live, CAPTURED, STRIDES,\n"
              "                  GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES,\n"
              "                  KV_AXIS: tl.constexpr, MODE: tl.constexpr)")
_NAMES = {"score": "score", "b": "off_b", "h": "off_h", "q_idx": "q_idx", "kv_idx": "kv_idx",
          "q_ok": "q_ok", "kv_ok": "kv_ok"}


@dataclass(frozen=True)
class _Rendered:
    source: str
    has_score_mod: bool
    has_mask: bool
    has_score_grad: bool
    has_captured_grad: bool
    grad_loads: tuple[int, ...]  # per captured tensor: how many loads contribute to its gradient
    has_loads: bool  # the score or mask reads a captured tensor
    kv_bounds: str | None = None  # the mask's closed-form bounds (masks/bounds.py), rendered as kv_lo / kv_hi
    score_grad_fits_f16: bool = False  # d(score_mod)/ds is proven within fp16's range (E.float_range)
    entry_gathers: bool = False  # a load indexed by both q_idx and kv_idx (a relative-position table)


def _function(name: str, sig: str, body: list[str], doc: str) -> str:
    lines = ["@triton.jit", f"def {name}{sig}:", f"    # {doc}"]
    lines += [f"    {line}" for line in body]
    return "\n".join(lines) + "\n"


def _value_body(expr: Expr, printer: _Printer, ret_ct: str, full_shape: bool) -> list[str]:
    if isinstance(expr, Const):
        ret = printer.const(expr.value, ret_ct, tensor=True)
    else:
        ret = printer.value(expr, ret_ct, tensor=True)
    if full_shape:
        ret = f"tl.broadcast_to({ret}, score.shape)"
    return printer.lines + [f"return {ret}"]


def render_source(score: Expr, mask: Expr | None, captured_meta: Sequence[CapturedMeta], *,
                  bounds: IndexBounds = IndexBounds(), backward: bool = False,
                  fast_math: bool = False) -> _Rendered:
    """Print the hook module for ``score``/``mask`` (pure: no files, no Triton import).

    ``fast_math``: hardware approximations of transcendentals (Note [fast transcendentals]).
    """
    metas = tuple(captured_meta)
    stride_offsets, off = [], 0
    for m in metas:
        stride_offsets.append(off)
        off += m.ndim
    for e in ([score] + ([mask] if mask is not None else [])):
        for ld in E.loads(e):
            if ld.buffer >= len(metas):
                raise UnsupportedHook(f"load of buffer {ld.buffer} but only {len(metas)} captured tensors")
    if mask is not None and mask.dtype != E.BOOL:
        raise UnsupportedHook(f"mask must be bool, got {mask.dtype}")
    if not E.is_float(score.dtype):
        score = E.call("to", score, dtype="float32")
    has_mask = mask is not None and not E.is_const(mask, True)
    has_score_mod = score != E.score

    from ..masks.bounds import kv_interval

    interval = kv_interval(mask) if has_mask else None
    exprs = [score] + ([mask] if mask is not None else [])
    if interval is not None:
        exprs += [interval.lo, interval.hi]
    grads: list[tuple[Load, Expr]] = []
    score_grad = None
    if backward:
        score_grad = E.diff(score, E.score)
        for ld in E.loads(score):
            meta = metas[ld.buffer]
            if meta.needs_grad and E.is_float(meta.dtype):
                g = E.diff(score, ld)
                if not E.is_const(g, 0.0):
                    grads.append((ld, g))
        exprs += [score_grad] + [g for _, g in grads]
    ranges = _ranges(exprs, bounds)
    deps_memo: dict = {}

    def printer() -> _Printer:
        return _Printer(metas, stride_offsets, ranges, deps_memo, _NAMES, fast_math)

    comments = [f"# score: {E.format_expr(score)}", f"# mask:  {E.format_expr(mask) if mask is not None else 'none'}"]
    comments += [f"# buf{i}: {m.dtype}, {m.ndim} dims{', needs grad' if m.needs_grad else ''}"
                 for i, m in enumerate(metas)]
    parts = [_HEADER.format(fmt=_FORMAT, comments="\n".join(comments))]

    p = printer()
    score_full = {"q_idx", "kv_idx"} <= _deps(score, deps_memo) or "score" in _deps(score, deps_memo)
    parts.append(_function("score_mod", _SIG_SCORE, _value_body(score, p, F32, not score_full),
                           "the modified score, fp32"))
    p = printer()
    if mask is None:
        body = ["return tl.full([], 1, tl.int1)"]
    else:
        body = _value_body(mask, p, I1, False)
    parts.append(_function("mask_mod", _SIG_MASK, body, "True where the entry takes part"))
    if interval is not None:  # Note [closed-form bounds] in masks/bounds.py
        for name, e, doc in (("kv_lo", interval.lo, "first kv index row q_idx attends (int64)"),
                             ("kv_hi", interval.hi, "one past its last (int64)")):
            p = printer()
            parts.append(_function(name, "(q_idx)", _value_body(e, p, I64, False), doc))

    has_score_grad = False
    grad_fits_f16 = False
    if backward:
        p = printer()
        has_score_grad = not E.is_const(score_grad, 1.0)
        grad_range = E.float_range(score_grad) if has_score_grad else None
        grad_fits_f16 = grad_range is not None and max(abs(grad_range[0]), abs(grad_range[1])) <= F16_MAX
        mod = p.value(score, F32, tensor=True)
        if not score_full:
            mod = f"tl.broadcast_to({mod}, score.shape)"
        grad = p.value(score_grad, F32, tensor=True)
        parts.append(_function("score_mod_grad", _SIG_SCORE, p.lines + [f"return {mod}, {grad}"],
                               "(score_mod, d(score_mod)/d(score)), sharing subexpressions"))
        p = printer()
        body: list[str] = []
        grad_loads = [0] * len(metas)
        for ld, g in grads:
            grad_loads[ld.buffer] += 1
            p.lines.append(f"# d(score)/d({E.format_expr(ld)})")
            gv = p.value(g, F32, tensor=True)
            contrib = p.assign(f"ds * {gv}")
            deps = frozenset().union(*(_deps(i, deps_memo) for i in ld.indices)) if ld.indices else frozenset()
            q, kv = ("q_idx" in deps or "score" in deps), ("kv_idx" in deps or "score" in deps)
            if q and kv:
                axis, mask_code = None, "live"
            elif q:
                axis, mask_code = "KV_AXIS", p.names["q_ok"]
            elif kv:
                axis, mask_code = "1 - KV_AXIS", p.names["kv_ok"]
            else:
                axis, mask_code = "2", "(off_b >= 0)"
            if axis is None:
                val, cnt = contrib, "live.to(tl.int64)"
                p.lines.append(f"{val} = tl.where(live, {val}, 0.0)")
                p.lines.append("if MODE == 2:")
                p.lines.append(f"    {val} = tl.where({val} == {val}, tl.abs({val}), float(\"inf\"))")
            else:
                val, cnt = p.fresh(), p.fresh()
                p.lines.append(f"{val}, {cnt} = lib.reduce_contribution({contrib}, live, {axis}, MODE)")
            offs = p.assign(p.offsets(ld, "GRAD_STRIDES")) if ld.indices else "0"
            b = ld.buffer
            p.lines.append(f"lib.accumulate(GRADS[{b}], GRAD_FIXED[{b}], GRAD_MAX[{b}], GRAD_COUNT[{b}], "
                           f"{offs}, {mask_code}, {val}, {cnt}, MODE)")
        body = p.lines + ["return"]
        parts.append(_function("captured_grad", _SIG_CGRAD, body,
                               "accumulate ds * d(score)/d(load) into captured gradients (hook_lib Note)"))
    else:
        grad_loads = [0] * len(metas)
    has_loads = bool(E.loads(score)) or (mask is not None and bool(E.loads(mask)))
    entry_gathers = any({"q_idx", "kv_idx"} <= frozenset().union(*(_deps(i, deps_memo) for i in ld.indices))
                        for e in exprs[:2] for ld in E.loads(e) if ld.indices)
    return _Rendered("\n\n".join(parts), has_score_mod, has_mask, has_score_grad, bool(grads), tuple(grad_loads),
                     has_loads, interval.describe() if interval is not None else None, grad_fits_f16,
                     entry_gathers)


# ----------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class Hooks:
    """The loaded hook module and what the kernels need to know about it."""

    key: str
    path: str
    source: str
    score_mod: object
    mask_mod: object
    score_mod_grad: object | None
    captured_grad: object | None
    has_score_mod: bool
    has_mask: bool
    has_score_grad: bool
    has_captured_grad: bool
    grad_loads: tuple[int, ...] = field(default=())
    has_loads: bool = False
    kv_lo: object | None = None  # closed-form bounds of the mask (Note [closed-form bounds] in masks/bounds.py)
    kv_hi: object | None = None
    kv_bounds: str | None = None
    score_grad_fits_f16: bool = False
    entry_gathers: bool = False

    @property
    def heavy(self) -> bool:
        """Hooks that add live tiles or gathers (configs.py picks register-lighter tiles)."""
        return self.has_score_mod or self.has_loads or self.has_captured_grad

_lock = threading.Lock()
_by_key: dict[tuple[str, bool], Hooks] = {}
_by_request: dict[tuple, Hooks] = {}


def hook_cache_dir() -> str:
    """``$ATTN_INDUCTOR_CACHE_DIR/hooks``, else ``~/.cache/attn_inductor/hooks``, else a temp dir."""
    root = os.environ.get("ATTN_INDUCTOR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                     "attn_inductor")
    path = os.path.join(root, "hooks")
    try:
        os.makedirs(path, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = os.path.join(tempfile.gettempdir(), f"attn_inductor_hooks_{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(path, exist_ok=True)
    return path


def _write_atomic(path: str, text: str) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _load(source: str, interpret: bool) -> tuple[str, str, object]:
    key = hashlib.sha256(source.encode()).hexdigest()[:20]
    name = f"attn_inductor_hooks_{key}"
    path = os.path.join(hook_cache_dir(), f"{name}.py")
    # ``triton.jit`` picks interpreted or compiled functions at import: one module object per mode
    mod_name = name + ("_interpreted" if interpret else "")
    if not os.path.exists(path) or open(path).read() != source:
        _write_atomic(path, source)
    dump = os.environ.get("ATTN_INDUCTOR_DUMP_DIR")
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, f"{name}.py"), "w") as f:
            f.write(source)
    module = sys.modules.get(mod_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # Triton reads the source back through the module
        spec.loader.exec_module(module)
    return key, path, module


def render_hooks(score: Expr, mask: Expr | None, captured_meta: Sequence[CapturedMeta], *,
                 bounds: IndexBounds = IndexBounds(), backward: bool = False, fast_math: bool = False) -> Hooks:
    """Print, cache and load the hooks for one (score, mask, captured layout).

    Raises :class:`UnsupportedHook` (or ``E.NotDifferentiable`` with ``backward``)
    for expressions the printer cannot express.
    """
    interpret = _compat.triton_interpret_enabled()
    request = (score, mask, tuple(captured_meta), bounds, backward, interpret, fast_math)
    hit = _by_request.get(request)
    if hit is not None:
        return hit
    rendered = render_source(score, mask, captured_meta, bounds=bounds, backward=backward, fast_math=fast_math)
    with _lock:
        key, path, module = _load(rendered.source, interpret)
        hooks = _by_key.get((key, interpret))
        if hooks is None:
            hooks = Hooks(key, path, rendered.source, module.score_mod, module.mask_mod,
                          getattr(module, "score_mod_grad", None), getattr(module, "captured_grad", None),
                          rendered.has_score_mod, rendered.has_mask, rendered.has_score_grad,
                          rendered.has_captured_grad, rendered.grad_loads, rendered.has_loads,
                          getattr(module, "kv_lo", None), getattr(module, "kv_hi", None), rendered.kv_bounds,
                          rendered.score_grad_fits_f16, rendered.entry_gathers)
            _by_key[(key, interpret)] = hooks
        _by_request[request] = hooks
    return hooks
