"""Backward flash attention with generated hooks and block sparsity.

Notation (as in attn_fwd.py, plus)
    dO          gradient of OUT                     [B, HQ, Q_LEN, HEAD_DIM_V]
    LSE_X       = LSE in the forward's exponent units (LSE * log2(e) without a score
                  mod, LSE with one: Note [exponent units] in attn_fwd.py), and +inf
                  on rows whose LSE is -inf so that P is exactly 0 there
                  (Note [dead rows in the backward])
    LSE_C       = 0, or -log2(l) for rows whose statistics the STATS pass recomputed
                  (then LSE_X holds their max m): Note [absorbed rows]
    DELTA       = rowsum(dO * OUT)                  fp32 [B, HQ, Q_LEN]
    P           = E(x - LSE_X), or 2^((x - LSE_X) * log2(e) + LSE_C) with a score mod,
                  recomputed, never stored
    dP          = dO @ V^T
    dS_mod      = P * (dP - DELTA)                  gradient w.r.t. the modified score
    dS          = dS_mod * d(score_mod)/ds          gradient w.r.t. s = scale * q·k; the
                  SCORE_MOD_GRAD hook gives the modified score and this derivative
                  from one evaluation (shared subexpressions, e.g. one tanh for softcap)
    dQ = scale * dS @ K        dK = scale * dS^T @ Q        dV = P^T @ dO
    BLOCK_M, BLOCK_N    the tiles of the kernel at hand (dK/dV and dQ choose their own)

Kernels
    _attn_bwd_preprocess   DELTA, LSE_X (and LSE_C = 0 with a score mod), one program per
                           (q tile, head, batch).
    _attn_bwd              dK/dV programs and dQ programs (Note [one backward launch]):
      _dkdv_program        a (kv tile, kv head, batch): loops over the GQA_GROUP query
                           heads that share the kv head and, for each, over the q tiles
                           of the transposed sparsity table (FULL ones without the
                           mask, then PARTIAL ones).  dK and dV are owned by the
                           program: no atomics.  Works on transposed tiles (kv along
                           rows) as the Triton tutorial does.
      _dq_program          a (q tile, query head, batch) over the forward table's kv
                           tiles; dQ owned by the program.  With STATS_PASS it
                           recomputes the row statistics instead (Notes [exact delta]
                           and [absorbed rows]); the launcher runs that first, as a
                           launch of dQ programs only, whenever there is a score mod.
    Captured-tensor gradients (Note [captured gradients] in hook_lib): mode 1 in the
    dQ programs; deterministic mode runs pass 2 in the dK/dV programs and pass 3 in
    the dQ programs, as two launches since pass 3 reads what pass 2 wrote.

Note [one backward launch]
    dK/dV and dQ each recompute the tile's P and dS from Q, K, V, dO, so they do
    not depend on each other and can share a grid: the first NUM_KV_TILES
    programs of each (kv head, batch) are dK/dV programs, the rest dQ programs
    (FlexAttention's backward has the same shape).  One launch instead of two
    removes the tail of the first kernel, where a partly idle GPU waited for
    its last programs before the second could start, which mattered most for
    short, sparse backwards (sliding window, documents).  The price is the
    larger of the two register and shared-memory footprints for every program.
    Accumulating dQ inside the dK/dV programs with fp32 atomics (five tile
    matmuls instead of seven) was measured too: no faster on an H200
    (benchmarks/results/h200_sweep_fused_dq_13d7cf9.json).

Note [backward register pressure]
    A dK/dV program keeps two [BLOCK_N, HEAD_DIM] fp32 accumulators in
    registers; with a score mod whose derivative is not constant (softcap)
    the [BLOCK_N, BLOCK_M] tile of d(score_mod)/ds lives from the score hook
    until dS, across two tile matmuls, and at D=128 the program spilled
    (ptxas, sm_90a: 188 bytes of spill stores).  When the hooks prove the
    derivative within fp16's range (``E.float_range``: softcap's 1 - tanh^2
    is in [0, 2]) and the inputs are 16-bit, the tile is held as fp16: half
    the registers, spills 84 bytes, softcap forward+backward 5.95 -> 5.69 ms
    at B=2 H=16 S=8192 D=128 on an H200.  The value is rounded to 11 bits
    before it multiplies dS, which is then rounded to the input's 8 (bf16)
    or 11 (fp16) bits for the dK matmul; fp32 inputs keep fp32.  Computing
    dP before the score hook (so the derivative dies sooner) was tried too:
    no fewer spills, no faster.

Note [exact delta]
    Flash attention takes DELTA = rowsum(dO * OUT) with OUT already rounded to
    the input dtype.  That rounding error is the same for every entry of a row
    and enters every dS of it; dQ, dK and dV tolerate it, but a captured
    tensor's gradient sums dS over many rows (an ALiBi slope over the whole
    [Q_LEN, KV_LEN] square), where it adds up coherently: emulated at S=2048
    with bf16 it was 1.9x eager's error, against 4e-5x with the exact value.
    So when captured gradients are requested (FULL_DELTA) the STATS pass
    computes DELTA = rowsum(P * dP) in fp32 over the same tiles for every row
    (two of the backward's seven tile matmuls again, ~30% more backward time),
    and everything downstream uses it.

Note [absorbed rows]
    With a finfo.min additive mask a row can have every score near -3.4e38;
    eager then gives a uniform softmax over those entries (the fallback rows of
    runtime.py).  The forward handles it (Note [exponent units]) but its LSE =
    m + ln(l) rounds to m in fp32 (ulp(3.4e38) ~ 2e31), so P = e^(x - LSE)
    would be 1 instead of 1/l.  Any row with |LSE| >= HUGE_LSE has lost
    precision this way, so with a score mod the STATS pass (a tile of the dQ
    grid with no such row and no FULL_DELTA exits at once) recomputes, for the
    q tiles holding such rows, the row max m, l and DELTA in one online pass
    and stores m in LSE_X and -log2(l) in LSE_C: P = 2^((x - m) log2 e - log2 l)
    is then exact.  The CPU core has the same LSE; see the report.

Note [dead rows in the backward]
    A row with LSE = -inf (nothing passed the mask, or not selected) contributes
    nothing: LSE_X = +inf gives P = E(x - inf) = 0 and then dS = 0.  Padded rows
    and columns past Q_LEN / KV_LEN are set to x = -inf where they could reach a
    stored result (q bounds in dK/dV, kv bounds in dQ), so a NaN a hook computes
    from a masked-out load never leaks into the gradients; captured-gradient
    contributions are additionally masked by ``live`` (mask & bounds).
    With EMPTY_NAN (a hard mask and eager's policy, runtime.py) the kernels also
    give what autograd through eager's graph gives for such a row: its dq is
    NaN, and dK/dV of the whole (batch, kv head) are NaN, since every key gets
    P * dO and dS * q from the NaN row.  Each preprocess program writes whether
    its (batch, query head, q tile) has a dead row (DEAD, int32 [B, HQ,
    cdiv(Q_LEN, PRE_BLOCK)], every entry written: no zero fill, no atomics)
    before the launch whose dK/dV programs reduce the flags of their group's
    query heads; this replaces three full passes over dq, dk, dv on the host.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import hook_lib as lib
from .attn_fwd import (LOG2E, bounded_kv_loops, bounded_q_walk, load_2d, mask_scores, store_2d, walk_counts,
                       walk_start)

HUGE_LSE: tl.constexpr = tl.constexpr(4096.0)  # Note [absorbed rows]: |LSE| from which fp32 loses ln(l)


@triton.jit
def _attn_bwd_preprocess(
    OUT, DO, LSE, DELTA, LSE_X, LSE_C, DEAD,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    HQ, Q_LEN,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, BASE2: tl.constexpr,
    GQA_GROUP: tl.constexpr = 1, EMPTY_NAN: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    b64, h64 = off_b.to(tl.int64), off_h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ok = offs_m < Q_LEN
    dv_ok = offs_dv < HEAD_DIM_V
    o = load_2d(OUT + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                q_ok, dv_ok, False, False).to(tl.float32)
    do = load_2d(DO + b64 * stride_gb + h64 * stride_gh + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
                 q_ok, dv_ok, False, False).to(tl.float32)
    delta = tl.sum(o * do, 1)
    lse = tl.load(LSE + b64 * stride_lb + h64 * stride_lh + offs_m * stride_lm, mask=q_ok, other=0.0)
    if BASE2:  # no score mod: the forward's exponents are base 2 (Note [exponent units])
        lse = lse * LOG2E
    lse_x = tl.where(lse == float("-inf"), float("inf"), lse)  # Note [dead rows in the backward]
    row = (b64 * HQ + h64) * Q_LEN
    tl.store(DELTA + row + offs_m, delta, mask=q_ok)
    tl.store(LSE_X + row + offs_m, lse_x, mask=q_ok)
    if not BASE2:  # a score mod: LSE_C starts at 0 (Note [absorbed rows]); the STATS pass may rewrite it
        tl.store(LSE_C + row + offs_m, tl.zeros([BLOCK_M], dtype=tl.float32), mask=q_ok)
    if EMPTY_NAN:  # Note [dead rows in the backward]: flag this (batch, query head, q tile) if a row is dead
        dead = tl.max((q_ok & (lse == float("-inf"))).to(tl.int32), 0)
        tl.store(DEAD + (b64 * HQ + h64) * tl.num_programs(0) + pid_m, dead)


# ----------------------------------------------------------------------------- dK / dV


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, qT_ptrs, do_ptrs, LSE_X_ROW, LSE_C_ROW, DELTA_ROW, start_m, offs_n, kv_ok, off_b, off_h,
    stride_qm, stride_dom, Q_LEN, scale,
    CAPTURED, STRIDES, GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, SCORE_MOD_GRAD: tl.constexpr, CAPTURED_GRAD: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, APPLY_MASK: tl.constexpr, HAS_SCORE_GRAD: tl.constexpr, GRAD_MODE: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, Q_DTYPE: tl.constexpr, DO_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, FP32_OPERANDS: tl.constexpr, DMOD_F16: tl.constexpr,
):
    """One q tile against the program's kv tile, in transposed orientation ([kv, q])."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_ok = offs_m < Q_LEN
    d_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    dv_ok = tl.arange(0, BLOCK_DV) < HEAD_DIM_V
    start64 = start_m.to(tl.int64)
    qT = lib.widen_for_dot(load_2d(qT_ptrs + start64 * stride_qm, d_ok, q_ok, EVEN_D, EVEN_M), FP32_OPERANDS)
    if EVEN_M:
        lse_x = tl.load(LSE_X_ROW + offs_m)
    else:
        lse_x = tl.load(LSE_X_ROW + offs_m, mask=q_ok, other=float("inf"))
    if HAS_SCORE_MOD:  # Note [absorbed rows]
        if EVEN_M:
            lse_c = tl.load(LSE_C_ROW + offs_m)
        else:
            lse_c = tl.load(LSE_C_ROW + offs_m, mask=q_ok, other=0.0)
    qkT = lib.mma(k, qT, None, INPUT_PRECISION)  # [BLOCK_N, BLOCK_M]
    q_idx = offs_m[None, :]
    kv_idx = offs_n[:, None]
    sT = qkT * scale
    if HAS_SCORE_GRAD:  # natural units with a score mod (Note [exponent units])
        xT, dmodT = SCORE_MOD_GRAD(sT, off_b, off_h, q_idx, kv_idx, q_ok[None, :], kv_ok[:, None], CAPTURED, STRIDES)
        if DMOD_F16:  # Note [backward register pressure]
            dmodT = dmodT.to(tl.float16)
    elif HAS_SCORE_MOD:
        xT = SCORE_MOD(sT, off_b, off_h, q_idx, kv_idx, q_ok[None, :], kv_ok[:, None], CAPTURED, STRIDES)
    else:
        xT = qkT * (scale * LOG2E)
    keep = q_ok[None, :]
    if APPLY_MASK:
        keep = MASK_MOD(off_b, off_h, q_idx, kv_idx, q_ok[None, :], kv_ok[:, None], CAPTURED, STRIDES)
    xT = mask_scores(xT, keep, q_ok[None, :], APPLY_MASK, not EVEN_M)
    if HAS_SCORE_MOD:
        pT = tl.exp2((xT - lse_x[None, :]) * LOG2E + lse_c[None, :])
    else:
        pT = tl.exp2(xT - lse_x[None, :])
    do = lib.widen_for_dot(load_2d(do_ptrs + start64 * stride_dom, q_ok, dv_ok, EVEN_M, EVEN_DV), FP32_OPERANDS)
    dv = lib.mma(lib.as_dot_operand(pT, DO_DTYPE, FP32_OPERANDS), do, dv, INPUT_PRECISION)
    if EVEN_M:
        delta = tl.load(DELTA_ROW + offs_m)
    else:
        delta = tl.load(DELTA_ROW + offs_m, mask=q_ok, other=0.0)
    dpT = lib.mma(v, tl.trans(do), None, INPUT_PRECISION)
    dsT = pT * (dpT - delta[None, :])
    if GRAD_MODE != 0:
        live = q_ok[None, :] & kv_ok[:, None]
        if APPLY_MASK:
            live = live & keep
        CAPTURED_GRAD(dsT, sT, off_b, off_h, q_idx, kv_idx, q_ok[None, :], kv_ok[:, None], live, CAPTURED, STRIDES,
                      GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES, 0, GRAD_MODE)
    if HAS_SCORE_GRAD:
        dsT = dsT * dmodT.to(tl.float32)
    dk = lib.mma(lib.as_dot_operand(dsT, Q_DTYPE, FP32_OPERANDS), tl.trans(qT), dk, INPUT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_program(
    pid_n, off_hkv, off_b,
    Q, K, V, DO, DK, DV, LSE_X, LSE_C, DELTA, DEAD,
    Q_NUM_BLKS, Q_IDX, FULL_Q_NUM_BLKS, FULL_Q_IDX,
    CAPTURED, STRIDES, GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_nb, stride_nh, stride_nn,
    stride_ib, stride_ih, stride_in,
    HQ, Q_LEN, KV_LEN, scale,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, SCORE_MOD_GRAD: tl.constexpr, CAPTURED_GRAD: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCORE_GRAD: tl.constexpr, GRAD_MODE: tl.constexpr,
    IS_SPARSE: tl.constexpr, GQA_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPARSE_Q_MULT: tl.constexpr, SPARSE_KV_MULT: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, FP32_OPERANDS: tl.constexpr, EMPTY_NAN: tl.constexpr,
    KV_BOUNDS: tl.constexpr, KV_LO: tl.constexpr, KV_HI: tl.constexpr, PRE_BLOCK: tl.constexpr,
    DMOD_F16: tl.constexpr,
):
    """dK and dV of kv tile ``pid_n`` of kv head ``off_hkv``, over every query head of its group."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEAD_DIM_V == BLOCK_DV
    b64 = off_b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_ok = offs_n < KV_LEN
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_m0 = tl.arange(0, BLOCK_M)
    K_BASE = K + b64 * stride_kb + off_hkv.to(tl.int64) * stride_kh
    V_BASE = V + b64 * stride_vb + off_hkv.to(tl.int64) * stride_vh
    k = load_2d(K_BASE + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, kv_ok, offs_d < HEAD_DIM,
                EVEN_N, EVEN_D)
    v = load_2d(V_BASE + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd, kv_ok, offs_dv < HEAD_DIM_V,
                EVEN_N, EVEN_DV)
    k = lib.widen_for_dot(k, FP32_OPERANDS)
    v = lib.widen_for_dot(v, FP32_OPERANDS)
    Q_DTYPE: tl.constexpr = Q.dtype.element_ty
    DO_DTYPE: tl.constexpr = DO.dtype.element_ty
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    sp_col = pid_n // SPARSE_KV_MULT
    full_from = 0  # KV_BOUNDS: as in _attn_fwd, over q tiles
    part_head = 0
    part_from = 0
    tail_from = 0
    n_full_bounded = 0
    n_part_bounded = 0
    if KV_BOUNDS:  # Note [closed-form bounds] in masks/bounds.py: the same q tiles for every head
        t_lo, f_lo, f_hi, t_hi = bounded_q_walk(KV_LO, KV_HI, pid_n * BLOCK_N,
                                                tl.minimum(pid_n * BLOCK_N + BLOCK_N, KV_LEN) - 1, Q_LEN, BLOCK_M)
        n_full_bounded, full_from, n_part_bounded, part_head, part_from, tail_from = walk_counts(
            t_lo, f_lo, f_hi, t_hi)

    for g in range(0, GQA_GROUP):
        off_h = off_hkv * GQA_GROUP + g
        h64 = off_h.to(tl.int64)
        qT_ptrs = Q + b64 * stride_qb + h64 * stride_qh + offs_d[:, None] * stride_qd + offs_m0[None, :] * stride_qm
        do_ptrs = (DO + b64 * stride_dob + h64 * stride_doh + offs_m0[:, None] * stride_dom
                   + offs_dv[None, :] * stride_dod)
        LSE_X_ROW = LSE_X + (b64 * HQ + h64) * Q_LEN
        LSE_C_ROW = LSE_C + (b64 * HQ + h64) * Q_LEN
        DELTA_ROW = DELTA + (b64 * HQ + h64) * Q_LEN
        if KV_BOUNDS:
            n_full = n_full_bounded
            n_part = n_part_bounded
            FULL_IDX = Q_IDX
            PART_IDX = Q_IDX
        elif IS_SPARSE:
            num_off = off_b * stride_nb + off_h * stride_nh + sp_col * stride_nn
            idx_off = b64 * stride_ib + h64 * stride_ih + sp_col.to(tl.int64) * stride_in
            n_full = tl.load(FULL_Q_NUM_BLKS + num_off) * SPARSE_Q_MULT
            n_part = tl.load(Q_NUM_BLKS + num_off) * SPARSE_Q_MULT
            FULL_IDX = FULL_Q_IDX + idx_off
            PART_IDX = Q_IDX + idx_off
        else:
            n_all = tl.cdiv(Q_LEN, BLOCK_M)
            n_full = 0 if HAS_MASK else n_all
            n_part = n_all if HAS_MASK else 0
            FULL_IDX = Q_IDX
            PART_IDX = Q_IDX
        for it in range(0, n_full):
            start_m = walk_start(FULL_IDX, it, SPARSE_Q_MULT, BLOCK_M, IS_SPARSE, KV_BOUNDS, n_full, full_from, 0)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, qT_ptrs, do_ptrs, LSE_X_ROW, LSE_C_ROW, DELTA_ROW, start_m, offs_n, kv_ok, off_b, off_h,
                stride_qm, stride_dom, Q_LEN, scale,
                CAPTURED, STRIDES, GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES,
                SCORE_MOD, MASK_MOD, SCORE_MOD_GRAD, CAPTURED_GRAD, HAS_SCORE_MOD, False, HAS_SCORE_GRAD, GRAD_MODE,
                EVEN_M, EVEN_D, EVEN_DV, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, Q_DTYPE, DO_DTYPE,
                INPUT_PRECISION, FP32_OPERANDS, DMOD_F16)
        for it in range(0, n_part):
            start_m = walk_start(PART_IDX, it, SPARSE_Q_MULT, BLOCK_M, IS_SPARSE, KV_BOUNDS, part_head, part_from,
                                 tail_from)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, qT_ptrs, do_ptrs, LSE_X_ROW, LSE_C_ROW, DELTA_ROW, start_m, offs_n, kv_ok, off_b, off_h,
                stride_qm, stride_dom, Q_LEN, scale,
                CAPTURED, STRIDES, GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES,
                SCORE_MOD, MASK_MOD, SCORE_MOD_GRAD, CAPTURED_GRAD, HAS_SCORE_MOD, HAS_MASK, HAS_SCORE_GRAD, GRAD_MODE,
                EVEN_M, EVEN_D, EVEN_DV, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, Q_DTYPE, DO_DTYPE,
                INPUT_PRECISION, FP32_OPERANDS, DMOD_F16)

    dk = dk * scale
    if EMPTY_NAN:  # Note [dead rows in the backward]: any flag of the group's query heads
        n_flags = GQA_GROUP * tl.cdiv(Q_LEN, PRE_BLOCK)
        FLAGS = DEAD + (b64 * HQ + off_hkv * GQA_GROUP) * tl.cdiv(Q_LEN, PRE_BLOCK)
        seen = tl.zeros([256], dtype=tl.int32)
        for f0 in range(0, n_flags, 256):
            offs_f = f0 + tl.arange(0, 256)
            seen = tl.maximum(seen, tl.load(FLAGS + offs_f, mask=offs_f < n_flags, other=0))
        poisoned = tl.max(seen, 0) > 0
        dk = tl.where(poisoned, float("nan"), dk)
        dv = tl.where(poisoned, float("nan"), dv)
    DK_BASE = DK + b64 * stride_dkb + off_hkv.to(tl.int64) * stride_dkh
    DV_BASE = DV + b64 * stride_dvb + off_hkv.to(tl.int64) * stride_dvh
    store_2d(DK_BASE + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             lib.cast_for_store(dk, DK.dtype.element_ty, FP32_OPERANDS), kv_ok, offs_d < HEAD_DIM, EVEN_N, EVEN_D)
    store_2d(DV_BASE + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             lib.cast_for_store(dv, DV.dtype.element_ty, FP32_OPERANDS), kv_ok, offs_dv < HEAD_DIM_V, EVEN_N,
             EVEN_DV)


# ----------------------------------------------------------------------------- dQ


@triton.jit
def _bwd_scores(
    q, kT_ptrs, start_n, offs_m, q_ok, off_b, off_h, stride_kn, KV_LEN, scale, CAPTURED, STRIDES,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, SCORE_MOD_GRAD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr,
    APPLY_MASK: tl.constexpr, WANT_GRAD: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    FP32_OPERANDS: tl.constexpr,
):
    """A [q, kv] tile's exponents x (masked), s, d(score_mod)/ds (WANT_GRAD), the mask, K^T and kv bounds."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_ok = offs_n < KV_LEN
    d_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    kT = lib.widen_for_dot(load_2d(kT_ptrs + start_n.to(tl.int64) * stride_kn, d_ok, kv_ok, EVEN_D, EVEN_N),
                           FP32_OPERANDS)
    qk = lib.mma(q, kT, None, INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]
    q_idx = offs_m[:, None]
    kv_idx = offs_n[None, :]
    s = qk * scale
    dmod = s  # unused unless WANT_GRAD
    if WANT_GRAD:  # natural units with a score mod (Note [exponent units])
        x, dmod = SCORE_MOD_GRAD(s, off_b, off_h, q_idx, kv_idx, q_ok[:, None], kv_ok[None, :], CAPTURED, STRIDES)
    elif HAS_SCORE_MOD:
        x = SCORE_MOD(s, off_b, off_h, q_idx, kv_idx, q_ok[:, None], kv_ok[None, :], CAPTURED, STRIDES)
    else:
        x = qk * (scale * LOG2E)
    keep = kv_ok[None, :]
    if APPLY_MASK:
        keep = MASK_MOD(off_b, off_h, q_idx, kv_idx, q_ok[:, None], kv_ok[None, :], CAPTURED, STRIDES)
    x = mask_scores(x, keep, kv_ok[None, :], APPLY_MASK, not EVEN_N)
    return x, s, dmod, keep, kT, offs_n, kv_ok


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse_x, lse_c, delta, kT_ptrs, vT_ptrs, start_n, offs_m, q_ok, off_b, off_h,
    stride_kn, stride_vn, KV_LEN, scale,
    CAPTURED, STRIDES, GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, SCORE_MOD_GRAD: tl.constexpr, CAPTURED_GRAD: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, APPLY_MASK: tl.constexpr, HAS_SCORE_GRAD: tl.constexpr, GRAD_MODE: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, K_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, FP32_OPERANDS: tl.constexpr,
):
    """One kv tile against the program's q tile ([q, kv] orientation)."""
    x, s, dmod, keep, kT, offs_n, kv_ok = _bwd_scores(
        q, kT_ptrs, start_n, offs_m, q_ok, off_b, off_h, stride_kn, KV_LEN, scale, CAPTURED, STRIDES,
        SCORE_MOD, MASK_MOD, SCORE_MOD_GRAD, HAS_SCORE_MOD, APPLY_MASK, HAS_SCORE_GRAD, EVEN_N, EVEN_D,
        HEAD_DIM, BLOCK_N, BLOCK_D, INPUT_PRECISION, FP32_OPERANDS)
    if HAS_SCORE_MOD:
        p = tl.exp2((x - lse_x[:, None]) * LOG2E + lse_c[:, None])
    else:
        p = tl.exp2(x - lse_x[:, None])
    dv_ok = tl.arange(0, BLOCK_DV) < HEAD_DIM_V
    vT = lib.widen_for_dot(load_2d(vT_ptrs + start_n.to(tl.int64) * stride_vn, dv_ok, kv_ok, EVEN_DV, EVEN_N),
                           FP32_OPERANDS)
    dp = lib.mma(do, vT, None, INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    if GRAD_MODE != 0:
        live = q_ok[:, None] & kv_ok[None, :]
        if APPLY_MASK:
            live = live & keep
        CAPTURED_GRAD(ds, s, off_b, off_h, offs_m[:, None], offs_n[None, :], q_ok[:, None], kv_ok[None, :], live,
                      CAPTURED, STRIDES, GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES, 1, GRAD_MODE)
    if HAS_SCORE_GRAD:
        ds = ds * dmod
    dq = lib.mma(lib.as_dot_operand(ds, K_DTYPE, FP32_OPERANDS), tl.trans(kT), dq, INPUT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_stats_inner(
    m_i, l_i, d_i, q, do, kT_ptrs, vT_ptrs, start_n, offs_m, q_ok, off_b, off_h,
    stride_kn, stride_vn, KV_LEN, scale, CAPTURED, STRIDES,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr, FP32_OPERANDS: tl.constexpr,
):
    """Online row max m_i, l_i = sum e^(x - m_i) and d_i = sum e^(x - m_i) dP (natural units; Note [absorbed rows])."""
    x, s, dmod, keep, kT, offs_n, kv_ok = _bwd_scores(
        q, kT_ptrs, start_n, offs_m, q_ok, off_b, off_h, stride_kn, KV_LEN, scale, CAPTURED, STRIDES,
        SCORE_MOD, MASK_MOD, SCORE_MOD, True, APPLY_MASK, False, EVEN_N, EVEN_D,
        HEAD_DIM, BLOCK_N, BLOCK_D, INPUT_PRECISION, FP32_OPERANDS)
    m_new = tl.maximum(m_i, tl.max(x, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # Note [fully masked rows] in attn_fwd.py
    p = tl.exp2((x - m_use[:, None]) * LOG2E)
    alpha = tl.exp2((m_i - m_use) * LOG2E)
    dv_ok = tl.arange(0, BLOCK_DV) < HEAD_DIM_V
    vT = lib.widen_for_dot(load_2d(vT_ptrs + start_n.to(tl.int64) * stride_vn, dv_ok, kv_ok, EVEN_DV, EVEN_N),
                           FP32_OPERANDS)
    dp = lib.mma(do, vT, None, INPUT_PRECISION)
    l_i = l_i * alpha + tl.sum(p, 1)
    d_i = d_i * alpha + tl.sum(p * dp, 1)
    return m_new, l_i, d_i


@triton.jit
def _dq_program(
    pid_m, off_h, off_b,
    Q, K, V, DO, DQ, LSE_X, LSE_C, DELTA,
    KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX,
    CAPTURED, STRIDES, GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im,
    HQ, Q_LEN, KV_LEN, scale,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, SCORE_MOD_GRAD: tl.constexpr, CAPTURED_GRAD: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCORE_GRAD: tl.constexpr, GRAD_MODE: tl.constexpr,
    IS_SPARSE: tl.constexpr, GQA_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPARSE_Q_MULT: tl.constexpr, SPARSE_KV_MULT: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, FP32_OPERANDS: tl.constexpr, STATS_PASS: tl.constexpr,
    FULL_DELTA: tl.constexpr, EMPTY_NAN: tl.constexpr,
    KV_BOUNDS: tl.constexpr, KV_LO: tl.constexpr, KV_HI: tl.constexpr,
):
    """dQ of q tile ``pid_m`` of query head ``off_h`` (or, with STATS_PASS, its row statistics)."""
    off_hkv = off_h // GQA_GROUP
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEAD_DIM_V == BLOCK_DV
    b64, h64 = off_b.to(tl.int64), off_h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = offs_m < Q_LEN
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    row = (b64 * HQ + h64) * Q_LEN
    if EVEN_M:
        lse_x = tl.load(LSE_X + row + offs_m)
        delta = tl.load(DELTA + row + offs_m)
    else:
        lse_x = tl.load(LSE_X + row + offs_m, mask=q_ok, other=float("inf"))
        delta = tl.load(DELTA + row + offs_m, mask=q_ok, other=0.0)
    need = 0
    if STATS_PASS:  # Notes [exact delta] and [absorbed rows]: most tiles have nothing to recompute
        alive = lse_x != float("inf")
        absorbed = alive & (tl.abs(lse_x) >= HUGE_LSE)
        need = tl.max(absorbed.to(tl.int32), 0)
        if FULL_DELTA:
            need = need + 1
        # such a tile reads neither Q nor dO (masked-off loads move no data); [BLOCK_M] masks, as below
        rows = q_ok & ((offs_m * 0 + need) > 0)
        q = load_2d(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd, rows, offs_d < HEAD_DIM, False, EVEN_D)
        do = load_2d(DO + b64 * stride_dob + h64 * stride_doh + offs_m[:, None] * stride_dom
                     + offs_dv[None, :] * stride_dod, rows, offs_dv < HEAD_DIM_V, False, EVEN_DV)
    else:
        q = load_2d(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd, q_ok, offs_d < HEAD_DIM, EVEN_M, EVEN_D)
        do = load_2d(DO + b64 * stride_dob + h64 * stride_doh + offs_m[:, None] * stride_dom
                     + offs_dv[None, :] * stride_dod, q_ok, offs_dv < HEAD_DIM_V, EVEN_M, EVEN_DV)
    q = lib.widen_for_dot(q, FP32_OPERANDS)
    do = lib.widen_for_dot(do, FP32_OPERANDS)
    if HAS_SCORE_MOD and not STATS_PASS:  # Note [absorbed rows]
        lse_c = tl.load(LSE_C + row + offs_m, mask=q_ok, other=0.0)
    else:
        lse_c = delta  # unused
    K_BASE = K + b64 * stride_kb + off_hkv.to(tl.int64) * stride_kh
    V_BASE = V + b64 * stride_vb + off_hkv.to(tl.int64) * stride_vh
    kT_ptrs = K_BASE + offs_d[:, None] * stride_kd + offs_n0[None, :] * stride_kn
    vT_ptrs = V_BASE + offs_dv[:, None] * stride_vd + offs_n0[None, :] * stride_vn
    K_DTYPE: tl.constexpr = K.dtype.element_ty

    full_from = 0  # KV_BOUNDS: as in _attn_fwd
    part_head = 0
    part_from = 0
    tail_from = 0
    if KV_BOUNDS:  # Note [closed-form bounds] in masks/bounds.py
        n_full, full_from, n_part, part_head, part_from, tail_from = bounded_kv_loops(
            KV_LO, KV_HI, pid_m, BLOCK_M, Q_LEN, KV_LEN, BLOCK_N)
        FULL_IDX = KV_IDX
        PART_IDX = KV_IDX
    elif IS_SPARSE:
        sp_row = pid_m // SPARSE_Q_MULT
        num_off = off_b * stride_nb + off_h * stride_nh + sp_row * stride_nm
        idx_off = b64 * stride_ib + h64 * stride_ih + sp_row.to(tl.int64) * stride_im
        n_full = tl.load(FULL_KV_NUM_BLKS + num_off) * SPARSE_KV_MULT
        n_part = tl.load(KV_NUM_BLKS + num_off) * SPARSE_KV_MULT
        FULL_IDX = FULL_KV_IDX + idx_off
        PART_IDX = KV_IDX + idx_off
    else:
        n_all = tl.cdiv(KV_LEN, BLOCK_N)
        n_full = 0 if HAS_MASK else n_all
        n_part = n_all if HAS_MASK else 0
        FULL_IDX = KV_IDX
        PART_IDX = KV_IDX

    if STATS_PASS:  # Notes [exact delta] and [absorbed rows]
        alive = lse_x != float("inf")
        run = need > 0
        n_full = tl.where(run, n_full, 0)
        n_part = tl.where(run, n_part, 0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        d_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for it in range(0, n_full):
            start_n = walk_start(FULL_IDX, it, SPARSE_KV_MULT, BLOCK_N, IS_SPARSE, KV_BOUNDS, n_full, full_from, 0)
            m_i, l_i, d_i = _attn_bwd_stats_inner(
                m_i, l_i, d_i, q, do, kT_ptrs, vT_ptrs, start_n, offs_m, q_ok, off_b, off_h,
                stride_kn, stride_vn, KV_LEN, scale, CAPTURED, STRIDES, SCORE_MOD, MASK_MOD, False,
                EVEN_N, EVEN_D, EVEN_DV, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                INPUT_PRECISION, FP32_OPERANDS)
        for it in range(0, n_part):
            start_n = walk_start(PART_IDX, it, SPARSE_KV_MULT, BLOCK_N, IS_SPARSE, KV_BOUNDS, part_head,
                                 part_from, tail_from)
            m_i, l_i, d_i = _attn_bwd_stats_inner(
                m_i, l_i, d_i, q, do, kT_ptrs, vT_ptrs, start_n, offs_m, q_ok, off_b, off_h,
                stride_kn, stride_vn, KV_LEN, scale, CAPTURED, STRIDES, SCORE_MOD, MASK_MOD, HAS_MASK,
                EVEN_N, EVEN_D, EVEN_DV, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                INPUT_PRECISION, FP32_OPERANDS)
        ok = alive & (l_i > 0.0)  # dead rows stay dead, with DELTA 0 even when dO has NaN
        l_safe = tl.where(ok, l_i, 1.0)
        store = q_ok & ((offs_m * 0 + need) > 0)  # [BLOCK_M]: a 0-d mask trips the interpreter (Triton 3.9)
        tl.store(DELTA + row + offs_m, tl.where(ok, d_i / l_safe, 0.0), mask=store)
        tl.store(LSE_X + row + offs_m, tl.where(ok, m_i, lse_x), mask=store)
        tl.store(LSE_C + row + offs_m, tl.where(ok, -tl.log2(l_safe), 0.0), mask=store)
    else:
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for it in range(0, n_full):
            start_n = walk_start(FULL_IDX, it, SPARSE_KV_MULT, BLOCK_N, IS_SPARSE, KV_BOUNDS, n_full, full_from, 0)
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse_x, lse_c, delta, kT_ptrs, vT_ptrs, start_n, offs_m, q_ok, off_b, off_h,
                stride_kn, stride_vn, KV_LEN, scale,
                CAPTURED, STRIDES, GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES,
                SCORE_MOD, MASK_MOD, SCORE_MOD_GRAD, CAPTURED_GRAD, HAS_SCORE_MOD, False, HAS_SCORE_GRAD, GRAD_MODE,
                EVEN_N, EVEN_D, EVEN_DV, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, K_DTYPE,
                INPUT_PRECISION, FP32_OPERANDS)
        for it in range(0, n_part):
            start_n = walk_start(PART_IDX, it, SPARSE_KV_MULT, BLOCK_N, IS_SPARSE, KV_BOUNDS, part_head,
                                 part_from, tail_from)
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse_x, lse_c, delta, kT_ptrs, vT_ptrs, start_n, offs_m, q_ok, off_b, off_h,
                stride_kn, stride_vn, KV_LEN, scale,
                CAPTURED, STRIDES, GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES,
                SCORE_MOD, MASK_MOD, SCORE_MOD_GRAD, CAPTURED_GRAD, HAS_SCORE_MOD, HAS_MASK, HAS_SCORE_GRAD,
                GRAD_MODE, EVEN_N, EVEN_D, EVEN_DV, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, K_DTYPE,
                INPUT_PRECISION, FP32_OPERANDS)
        dq = dq * scale
        if EMPTY_NAN:  # Note [dead rows in the backward]: eager's dq of a row with no entry is NaN
            dq = tl.where((lse_x == float("inf"))[:, None], float("nan"), dq)
        store_2d(DQ + b64 * stride_dqb + h64 * stride_dqh + offs_m[:, None] * stride_dqm
                 + offs_d[None, :] * stride_dqd, lib.cast_for_store(dq, DQ.dtype.element_ty, FP32_OPERANDS), q_ok,
                 offs_d < HEAD_DIM, EVEN_M, EVEN_D)


# ----------------------------------------------------------------------------- the backward kernel


@triton.jit
def _attn_bwd(
    Q, K, V, DO, DQ, DK, DV, LSE_X, LSE_C, DELTA, DEAD,
    KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX,
    Q_NUM_BLKS, Q_IDX, FULL_Q_NUM_BLKS, FULL_Q_IDX,
    CAPTURED, STRIDES, GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_fnb, stride_fnh, stride_fnm, stride_fib, stride_fih, stride_fim,
    stride_tnb, stride_tnh, stride_tnn, stride_tib, stride_tih, stride_tin,
    HQ, Q_LEN, KV_LEN, scale, NUM_KV_TILES,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, SCORE_MOD_GRAD: tl.constexpr, CAPTURED_GRAD: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCORE_GRAD: tl.constexpr,
    IS_SPARSE: tl.constexpr, GQA_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr, FP32_OPERANDS: tl.constexpr,
    DO_DKDV: tl.constexpr, DKDV_GRAD_MODE: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
    SPARSE_Q_MULT1: tl.constexpr, SPARSE_KV_MULT1: tl.constexpr, EVEN_M1: tl.constexpr, EVEN_N1: tl.constexpr,
    DO_DQ: tl.constexpr, DQ_GRAD_MODE: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    SPARSE_Q_MULT2: tl.constexpr, SPARSE_KV_MULT2: tl.constexpr, EVEN_M2: tl.constexpr, EVEN_N2: tl.constexpr,
    STATS_PASS: tl.constexpr, FULL_DELTA: tl.constexpr, EMPTY_NAN: tl.constexpr,
    KV_BOUNDS: tl.constexpr = False, KV_LO: tl.constexpr = None, KV_HI: tl.constexpr = None,
    PRE_BLOCK: tl.constexpr = 64, DMOD_F16: tl.constexpr = False,
):
    """dK/dV programs and dQ programs in one grid (Note [one backward launch]).

    Grid: (NUM_KV_TILES [if DO_DKDV] + q tiles * GQA_GROUP [if DO_DQ], kv heads, batch).
    """
    pid = tl.program_id(0)
    off_hkv = tl.program_id(1)
    off_b = tl.program_id(2)
    j = pid
    if DO_DKDV:
        j = pid - NUM_KV_TILES
    if j < 0:
        if DO_DKDV:
            _dkdv_program(
                pid, off_hkv, off_b,
                Q, K, V, DO, DK, DV, LSE_X, LSE_C, DELTA, DEAD, Q_NUM_BLKS, Q_IDX, FULL_Q_NUM_BLKS, FULL_Q_IDX,
                CAPTURED, STRIDES, GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES,
                stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                stride_tnb, stride_tnh, stride_tnn, stride_tib, stride_tih, stride_tin,
                HQ, Q_LEN, KV_LEN, scale,
                SCORE_MOD, MASK_MOD, SCORE_MOD_GRAD, CAPTURED_GRAD, HAS_SCORE_MOD, HAS_MASK, HAS_SCORE_GRAD,
                DKDV_GRAD_MODE, IS_SPARSE, GQA_GROUP, HEAD_DIM, HEAD_DIM_V, BLOCK_M1, BLOCK_N1, BLOCK_D, BLOCK_DV,
                SPARSE_Q_MULT1, SPARSE_KV_MULT1, EVEN_M1, EVEN_N1, INPUT_PRECISION, FP32_OPERANDS, EMPTY_NAN,
                KV_BOUNDS, KV_LO, KV_HI, PRE_BLOCK, DMOD_F16)
    else:
        if DO_DQ:
            # heavy (late) q tiles first, as in the forward; the heads of the group side by side
            pid_m = tl.cdiv(Q_LEN, BLOCK_M2) - 1 - j // GQA_GROUP
            off_h = off_hkv * GQA_GROUP + j % GQA_GROUP
            _dq_program(
                pid_m, off_h, off_b,
                Q, K, V, DO, DQ, LSE_X, LSE_C, DELTA, KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX,
                CAPTURED, STRIDES, GRADS, GRAD_FIXED, GRAD_MAX, GRAD_COUNT, GRAD_STRIDES,
                stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                stride_fnb, stride_fnh, stride_fnm, stride_fib, stride_fih, stride_fim,
                HQ, Q_LEN, KV_LEN, scale,
                SCORE_MOD, MASK_MOD, SCORE_MOD_GRAD, CAPTURED_GRAD, HAS_SCORE_MOD, HAS_MASK, HAS_SCORE_GRAD,
                DQ_GRAD_MODE, IS_SPARSE, GQA_GROUP, HEAD_DIM, HEAD_DIM_V, BLOCK_M2, BLOCK_N2, BLOCK_D, BLOCK_DV,
                SPARSE_Q_MULT2, SPARSE_KV_MULT2, EVEN_M2, EVEN_N2, INPUT_PRECISION, FP32_OPERANDS, STATS_PASS,
                FULL_DELTA, EMPTY_NAN, KV_BOUNDS, KV_LO, KV_HI)
