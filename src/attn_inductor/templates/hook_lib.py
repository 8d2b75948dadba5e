"""Static Triton helpers that generated hooks and the kernels call.

Nothing here is generated.  Three groups:

- aten-semantics arithmetic the Triton operators do not give directly:
  ``floordiv_int`` / ``remainder_int`` (Triton's ``//`` and ``%`` truncate like C,
  aten floors), their float forms, ``sign``, rounding through fp16/bf16;
- transcendental functions with no ``tl`` primitive (``tanh``, ``log1p``, ...):
  libdevice in compiled kernels, portable ``tl`` formulas under the interpreter,
  which cannot call libdevice (the gate is ``_compat.triton_libdevice``);
- gradient accumulation into captured tensors (Note [captured gradients]).

Note [captured gradients]
    A captured tensor ``T`` read as ``T[idx(b, h, q, kv)]`` in the score gets
    ``sum over live entries of dS * d(score)/d(T[idx])`` at ``idx``.  The hook
    first reduces a tile's contributions over the axes ``idx`` does not depend on
    (one atomic per head for ALiBi slopes, one per row for a q-only index), then
    adds them with atomics.  Modes (the kernels' ``GRAD_MODE``):

    1  fp32 ``atomic_add`` into a zeroed fp32 buffer (fast, order-dependent).
    2  deterministic, first pass (dK/dV kernel): per element, ``atomic_max`` of
       the bits of ``|c|`` over the *unreduced* contributions (NaN counts as
       +inf) and an int64 ``atomic_add`` of how many entries contributed.
    3  deterministic, second pass (dQ kernel): each reduced contribution is
       rounded toward zero to a fixed-point int64 whose scale leaves room for
       ``count * max`` (plus two guard bits), then ``atomic_add``-ed.  Integer
       addition is associative, so the sum is bitwise independent of the order
       the hardware runs the atomics in.  Elements whose max is not finite add
       the raw fp32 values instead: once an inf or NaN is present, the result
       (inf, -inf or NaN) no longer depends on the order either.
    ``fixed_point_exponent`` is the one formula for the scale; ``launch.py``
    decodes with the same integer arithmetic on the host.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import _compat

_LIBDEVICE = _compat.triton_libdevice()
USE_LIBDEVICE = tl.constexpr(_LIBDEVICE is not None)
libdevice = _LIBDEVICE  # None under the interpreter; only referenced on the compiled branch

FIXED_POINT_GUARD_BITS = tl.constexpr(2)  # slack for the two passes computing dS in different tile orders


# ----------------------------------------------------------------------------- integer arithmetic


@triton.jit
def floordiv_int(a, b):
    """aten ``floor_divide`` on integers (Triton's ``//`` truncates toward zero)."""
    q = a // b
    r = a - q * b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), q - 1, q)


@triton.jit
def remainder_int(a, b):
    """aten ``remainder`` on integers: the result takes the divisor's sign."""
    r = a - (a // b) * b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def sign_int(x):
    return tl.where(x > 0, 1, 0) - tl.where(x < 0, 1, 0)


# ----------------------------------------------------------------------------- float arithmetic


@triton.jit
def sign_float(x):
    # keeps NaN (x * 0) and maps +-0 to 0 as torch.sign does
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x * 0.0))


@triton.jit
def trunc(x):
    if USE_LIBDEVICE:
        return libdevice.trunc(x)
    else:
        return tl.where(x < 0, tl.ceil(x), tl.floor(x))


@triton.jit
def fmod(a, b):
    if USE_LIBDEVICE:
        return libdevice.fmod(a, b)
    else:
        return a - trunc(a / b) * b


@triton.jit
def remainder_float(a, b):
    """aten ``remainder`` on floats: ``fmod`` moved to the divisor's sign."""
    m = fmod(a, b)
    return tl.where((m != 0) & ((m < 0) != (b < 0)), m + b, m)


@triton.jit
def floordiv_float(a, b):
    """aten ``floor_divide`` on floats (``div_floor_floating``: exact through ``fmod``)."""
    m = fmod(a, b)
    d = (a - m) / b
    d = tl.where((m != 0) & ((b < 0) != (m < 0)), d - 1.0, d)
    f = tl.floor(d)
    f = tl.where(d - f > 0.5, f + 1.0, f)
    return tl.where(b == 0, a / b, tl.where(d == 0, d * 0.0, f))


@triton.jit
def rint(x):
    """Round half to even, as ``torch.round``."""
    if USE_LIBDEVICE:
        return libdevice.rint(x)
    else:
        r = tl.floor(x + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0
        r = tl.where(((r - x) == 0.5) & odd, r - 1.0, r)
        # already integral (|x| >= 2**23 in fp32, 2**52 in fp64): x + 0.5 would round
        big = 4503599627370496.0 if x.dtype == tl.float64 else 8388608.0
        return tl.where(tl.abs(x) >= big, x, r)


@triton.jit
def expm1(x):
    if USE_LIBDEVICE:
        return libdevice.expm1(x)
    else:
        # Kahan's correction of exp(x) - 1 for small |x|
        u = tl.exp(x)
        um1 = u - 1.0
        safe = tl.where((u == 1.0) | (um1 == -1.0) | (u == float("inf")), 1.0, tl.log(u))
        r = um1 * x / safe
        return tl.where(u == 1.0, x, tl.where((um1 == -1.0) | (u == float("inf")), um1, r))


@triton.jit
def log1p(x):
    if USE_LIBDEVICE:
        return libdevice.log1p(x)
    else:
        u = 1.0 + x
        d = tl.where((u == 1.0) | (u == float("inf")), 1.0, u - 1.0)
        r = tl.log(u) * x / d
        return tl.where(u == 1.0, x, tl.where(u == float("inf"), u, r))


@triton.jit
def tanh(x):
    if USE_LIBDEVICE:
        return libdevice.tanh(x)
    else:
        e = expm1(-2.0 * tl.abs(x))
        t = -e / (2.0 + e)
        return tl.where(x < 0, -t, t)


# Note [fast transcendentals]
#     libdevice's tanh is accurate to ~1 ulp of fp32 but costs a dozen
#     instructions; with a softcap it runs on every score of every tile, in the
#     forward and in both backward recomputations, and dominates the kernel
#     (FlexAttention's softcap forward runs at half its causal speed).  PTX's
#     ``tanh.approx.f32`` is one MUFU instruction with a relative error of about
#     2^-11.  Inputs in fp16/bf16 carry scores already rounded to 2^-9 (eager) or
#     from 16-bit products, so the approximation is well inside the numerics
#     rule there (checked against fp64 on the GPU: benchmarks/gpu_check.py);
#     fp32 inputs keep libdevice.  The interpreter has no PTX and uses ``tanh``.
#     The same mode prints a division by a constant (softcap's ``s / 30``) as a
#     multiplication by the fp32 reciprocal: an fp32 ``/`` is a MUFU reciprocal
#     plus a Newton step and a slow-path check, a third MUFU operation per score
#     next to tanh and exp2; the product is within 1.5 ulp of the quotient.
@triton.jit
def tanh_approx(x):
    if USE_LIBDEVICE:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tanh(x)


@triton.jit
def pow_float(a, b):
    if USE_LIBDEVICE:
        return libdevice.pow(a, b)
    else:
        r = tl.exp2(b * tl.log2(tl.abs(a)))
        b_mod_2 = b - 2.0 * tl.floor(b * 0.5)  # 0 or 1 for integral exponents
        sign = tl.where(b_mod_2 == 1.0, -1.0, tl.where(b_mod_2 == 0.0, 1.0, float("nan")))
        r = tl.where(a < 0, r * sign, r)
        return tl.where(b == 0, 1.0, r)


@triton.jit
def round_to_bf16(x):
    """fp32 -> nearest bf16 (ties to even), returned as fp32."""
    if USE_LIBDEVICE:
        return x.to(tl.bfloat16).to(tl.float32)
    else:
        # Triton 3.9's interpreter truncates fp32 -> bf16; round the bits by hand
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to_fp16(x):
    return x.to(tl.float16).to(tl.float32)


# ----------------------------------------------------------------------------- dot operands


@triton.jit
def as_dot_operand(x, DTYPE: tl.constexpr, FP32_OPERANDS: tl.constexpr):
    """Round an fp32 tile to the MMA input dtype (see ``_compat.triton_dot_needs_fp32_operands``)."""
    if FP32_OPERANDS:
        if DTYPE == tl.bfloat16:
            return round_to_bf16(x)
        elif DTYPE == tl.float16:
            return round_to_fp16(x)
        else:
            return x
    else:
        return x.to(DTYPE)


# Note [rounding to tf32]
#     With TF32 allowed, ``tl.dot`` on fp32 operands feeds them to the tensor
#     cores as they are, and the hardware drops the low 13 mantissa bits:
#     truncation, whose error is twice round-to-nearest's and always toward
#     zero.  cuBLAS rounds to nearest first, so eager's TF32 matmuls are the
#     more accurate ones (on an H200 our causal fp32 error was 2.07x eager's).
#     ``mma`` rounds fp32 operands with ``cvt.rna.tf32.f32`` before the dot, as
#     cuBLAS does.  The interpreter multiplies in exact fp32 and needs nothing.
@triton.jit
def round_to_tf32(x):
    if USE_LIBDEVICE:
        return tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return x


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """``tl.dot(a, b, acc)`` with fp32 operands rounded to nearest tf32 when TF32 is on (Note [rounding to tf32])."""
    if INPUT_PRECISION == "tf32":
        if a.dtype == tl.float32:
            a = round_to_tf32(a)
        if b.dtype == tl.float32:
            b = round_to_tf32(b)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def widen_for_dot(x, FP32_OPERANDS: tl.constexpr):
    """A loaded Q/K/V/dO tile as an MMA operand (exact fp32 copy when FP32_OPERANDS)."""
    if FP32_OPERANDS:
        return x.to(tl.float32)
    else:
        return x


# ----------------------------------------------------------------------------- captured gradients


@triton.jit
def reduce_contribution(c, live, AXIS: tl.constexpr, MODE: tl.constexpr):
    """Reduce a tile's contributions over AXIS (0, 1, or 2 = both) for Note [captured gradients].

    Returns (value, count): the sum (modes 1, 3) or the max of |c| with NaN as +inf
    (mode 2), and the number of live entries reduced (used by mode 2 only).
    """
    if MODE == 2:
        v = tl.where(c == c, tl.abs(c), float("inf"))
        v = tl.where(live, v, 0.0)
    else:
        v = tl.where(live, c, 0.0)
    n = live.to(tl.int64)
    if AXIS == 2:
        if MODE == 2:
            return tl.max(tl.max(v, 1), 0), tl.sum(tl.sum(n, 1), 0)
        else:
            return tl.sum(tl.sum(v, 1), 0), tl.sum(tl.sum(n, 1), 0)
    else:
        if MODE == 2:
            return tl.expand_dims(tl.max(v, AXIS), AXIS), tl.expand_dims(tl.sum(n, AXIS), AXIS)
        else:
            return tl.expand_dims(tl.sum(v, AXIS), AXIS), tl.expand_dims(tl.sum(n, AXIS), AXIS)


@triton.jit
def fixed_point_exponent(max_bits, count):
    """k such that ``count * max * 2**k < 2**(63 - FIXED_POINT_GUARD_BITS)``; int32.

    ``max_bits`` are the int32 bits of a finite non-negative fp32, ``count`` int64.
    floor(log2(max)) + 1 bounds the max, the fp32 exponent of ``count`` + 1 bounds
    the count (rounding to fp32 can only reach a power of two from above).
    """
    e_max = ((max_bits >> 23) & 0xFF) - 126
    e_cnt = ((count.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
    return 62 - FIXED_POINT_GUARD_BITS - e_max - e_cnt


@triton.jit
def accumulate(GRAD, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, offs, mask, value, count, MODE: tl.constexpr):
    """Add one reduced contribution at ``offs`` (Note [captured gradients])."""
    if MODE == 1:
        tl.atomic_add(GRAD + offs, value, mask=mask, sem="relaxed")
    elif MODE == 2:
        tl.atomic_max(GRAD_MAX + offs, value.to(tl.int32, bitcast=True), mask=mask, sem="relaxed")
        tl.atomic_add(GRAD_COUNT + offs, count, mask=mask, sem="relaxed")
    elif MODE == 3:
        max_bits = tl.load(GRAD_MAX + offs, mask=mask, other=0)
        cnt = tl.load(GRAD_COUNT + offs, mask=mask, other=1)
        finite = max_bits < 0x7F800000
        k = fixed_point_exponent(max_bits, cnt)
        scale = ((k + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)  # 2**k, exact
        fixed = (value.to(tl.float64) * scale).to(tl.int64)
        tl.atomic_add(GRAD_FIXED + offs, fixed, mask=mask & finite, sem="relaxed")
        tl.atomic_add(GRAD + offs, value, mask=mask & (~finite), sem="relaxed")


@triton.jit
def cast_for_store(x, DTYPE: tl.constexpr, FP32_OPERANDS: tl.constexpr):
    """fp32 tile -> output dtype, rounding to nearest (by hand where the interpreter truncates)."""
    if FP32_OPERANDS and DTYPE == tl.bfloat16:
        return round_to_bf16(x).to(DTYPE)
    else:
        return x.to(DTYPE)
