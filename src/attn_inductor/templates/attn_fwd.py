"""Forward flash attention with generated score/mask hooks and block sparsity.

Notation
    B, HQ, HKV          batch, query heads, key/value heads; HQ = HKV * GQA_GROUP
    Q_LEN, KV_LEN       sequence lengths (any: tiles past the end are masked)
    HEAD_DIM(_V)        head dim of q/k (of v); BLOCK_D(V) = next power of two >= it
    BLOCK_M, BLOCK_N    the program's q tile and kv tile
    SPARSE_Q_MULT       the sparsity table's q block is SPARSE_Q_MULT * BLOCK_M rows
    SPARSE_KV_MULT      its kv block is SPARSE_KV_MULT * BLOCK_N columns; a table entry
                        is visited as SPARSE_KV_MULT consecutive kv tiles in one flat
                        loop (one loop keeps the software pipeliner working)
    s     = scale * q·k                fp32, what the hooks call `score`
    x     = q·k * (scale * log2(e))    without a score mod: base-2 units, one multiply
          = SCORE_MOD(s, ...)          with one: natural units (Note [exponent units])
    E(t)  = 2^t without a score mod, 2^(t * log2(e)) = e^t with one
    m_i   running max of x over the row          l_i   running sum of E(x - m_i)
    acc   running sum of E(x - m_i) * v          fp32 [BLOCK_M, BLOCK_DV]
    OUT   = acc / l_i                  in v's dtype
    LSE   = m_i + ln(l_i) in natural units       fp32

Program: one (q tile, query head, batch).  It walks the FULL kv blocks of its q
block (no mask code at all), then the PARTIAL ones (mask hook per entry); EMPTY
blocks are never loaded.  Which ones: from the mask's closed-form bounds
(KV_BOUNDS: the KV_LO / KV_HI hooks, Note [closed-form bounds] in
masks/bounds.py), else from a table (IS_SPARSE), else every kv tile, as FULL
when there is no mask, as PARTIAL otherwise.  GQA/MQA: the kv
head is the query head // GQA_GROUP; K and V are never repeated.

Note [fully masked rows]
    A row whose every entry so far is masked has m_i = -inf.  Subtracting it
    would give (-inf) - (-inf) = NaN, so the exponent offset is 0 instead: the
    masked entries give 2^(-inf) = 0, l_i stays 0 and the row finishes with
    OUT = 0 (not 0/0) and LSE = -inf.  The runtime turns such rows into what the
    spec asks (NaN for eager's -inf masks).  NaN in q, k or v still reaches
    OUT: a NaN score makes 2^(x - m) NaN, and l_i with it.

Note [exponent units]
    Folding log2(e) into the scores (x = s * log2 e, then 2^(x - m)) saves a
    multiply per entry, but a score mod can produce scores near finfo.min (an
    additive finfo.min mask): times log2(e) they overflow to -inf, and a row
    whose every entry is finfo.min (eager: a uniform softmax over them) would
    look fully masked.  So with a score mod the max is kept in natural units
    and only the difference is scaled, 2^((x - m) * log2 e), which cannot
    overflow to a wrong answer.  Without a score mod |q·k * scale| is far from
    overflow and the folded form is used.  The backward follows the same rule.

    With EMPTY_NAN the row's OUT is NaN instead (what eager gives for -inf masks),
    saving the runtime a pass over OUT.

Note [row select]
    With ROW_SELECT, unselected rows come out as OUT = 0, LSE = -inf; a q tile
    with no selected row runs zero kv iterations (no host sync).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import hook_lib as lib

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------- shared helpers


@triton.jit
def load_2d(ptrs, row_ok, col_ok, ROWS_EVEN: tl.constexpr, COLS_EVEN: tl.constexpr):
    """Load a tile, masking only the dimensions that can run past the tensor."""
    if ROWS_EVEN:
        if COLS_EVEN:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        if COLS_EVEN:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def store_2d(ptrs, value, row_ok, col_ok, ROWS_EVEN: tl.constexpr, COLS_EVEN: tl.constexpr):
    if ROWS_EVEN:
        if COLS_EVEN:
            tl.store(ptrs, value)
        else:
            tl.store(ptrs, value, mask=col_ok[None, :])
    else:
        if COLS_EVEN:
            tl.store(ptrs, value, mask=row_ok[:, None])
        else:
            tl.store(ptrs, value, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def tile_start(IDX, it, SPARSE_MULT: tl.constexpr, BLOCK: tl.constexpr, IS_SPARSE: tl.constexpr):
    """First index of the it-th tile of a walk over a sparsity table row (or over everything)."""
    if IS_SPARSE:
        blk = tl.load(IDX + it // SPARSE_MULT)
        return blk * (SPARSE_MULT * BLOCK) + (it % SPARSE_MULT) * BLOCK
    else:
        return it * BLOCK


@triton.jit
def walk_start(IDX, it, SPARSE_MULT: tl.constexpr, BLOCK: tl.constexpr, IS_SPARSE: tl.constexpr,
               BOUNDED: tl.constexpr, n_head, head_from, tail_from):
    """First index of the it-th tile of a walk: with BOUNDED (closed-form bounds) tiles head_from.. for the
    first n_head steps, then tail_from..; else ``tile_start``."""
    if BOUNDED:
        return tl.where(it < n_head, head_from + it, tail_from + (it - n_head)) * BLOCK
    else:
        return tile_start(IDX, it, SPARSE_MULT, BLOCK, IS_SPARSE)


@triton.jit
def _clamped(x, hi):
    return tl.minimum(tl.maximum(x, 0), hi).to(tl.int32)


@triton.jit
def _tile_range(first, end, full_lo, full_end, LEN, BLOCK: tl.constexpr):
    """Tiles (first, first FULL, end of FULL, end) of a walk over [first, end) whose FULL tiles are those
    inside [full_lo, full_end) (full_end >= LEN: up to the last, partial tile)."""
    t_lo = first // BLOCK
    t_hi = tl.where(first >= end, t_lo, tl.maximum(tl.cdiv(end, BLOCK), t_lo))
    f_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK), t_lo), t_hi)
    f_hi = tl.where(full_end >= LEN, tl.cdiv(LEN, BLOCK), full_end // BLOCK)
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), t_hi)
    return t_lo, f_lo, f_hi, t_hi


@triton.jit
def bounded_kv_walk(KV_LO: tl.constexpr, KV_HI: tl.constexpr, m_first, m_last, KV_LEN, BLOCK_N: tl.constexpr):
    """kv tiles (first, first FULL, end of FULL, end) of q rows [m_first, m_last] from the mask's closed-form
    bounds: Note [closed-form bounds] in masks/bounds.py (``forward_walk`` there is the same arithmetic)."""
    return _tile_range(_clamped(KV_LO(m_first), KV_LEN), _clamped(KV_HI(m_last), KV_LEN),
                       _clamped(KV_LO(m_last), KV_LEN), _clamped(KV_HI(m_first), KV_LEN), KV_LEN, BLOCK_N)


@triton.jit
def walk_counts(t_lo, f_lo, f_hi, t_hi):
    """A bounded walk as the kernels' loops take it: (n_full, full_from, n_part, part_head, part_from,
    tail_from): FULL tiles f_lo.., then PARTIAL ones t_lo..f_lo and f_hi..t_hi (``walk_start``)."""
    return f_hi - f_lo, f_lo, (f_lo - t_lo) + (t_hi - f_hi), f_lo - t_lo, t_lo, f_hi


@triton.jit
def bounded_kv_loops(KV_LO: tl.constexpr, KV_HI: tl.constexpr, pid_m, BLOCK_M: tl.constexpr, Q_LEN, KV_LEN,
                     BLOCK_N: tl.constexpr):
    """``walk_counts`` of q tile ``pid_m`` (the forward's and dQ's programs)."""
    t_lo, f_lo, f_hi, t_hi = bounded_kv_walk(KV_LO, KV_HI, pid_m * BLOCK_M,
                                             tl.minimum(pid_m * BLOCK_M + BLOCK_M, Q_LEN) - 1, KV_LEN, BLOCK_N)
    return walk_counts(t_lo, f_lo, f_hi, t_hi)


@triton.jit
def _first_row_above(F: tl.constexpr, value, Q_LEN):
    """The first q in [0, Q_LEN) with F(q) > value, else Q_LEN (F non-decreasing): binary search."""
    lo = Q_LEN * 0
    hi = Q_LEN + 0
    for _ in range(0, 32):
        mid = (lo + hi) // 2
        active = lo < hi
        above = F(mid) > value
        hi = tl.where(active & above, mid, hi)
        lo = tl.where(active & (above == 0), mid + 1, lo)
    return lo


@triton.jit
def bounded_q_walk(KV_LO: tl.constexpr, KV_HI: tl.constexpr, n_first, n_last, Q_LEN, BLOCK_M: tl.constexpr):
    """q tiles (first, first FULL, end of FULL, end) of kv columns [n_first, n_last] (the dK/dV walk):
    Note [closed-form bounds] in masks/bounds.py (``backward_walk`` there is the same arithmetic)."""
    first = _first_row_above(KV_HI, n_first, Q_LEN)      # rows before it end before n_first
    end = _first_row_above(KV_LO, n_last, Q_LEN)         # rows from it start after n_last
    full_from = _first_row_above(KV_HI, n_last, Q_LEN)   # rows from it reach past n_last
    full_to = _first_row_above(KV_LO, n_first, Q_LEN)    # rows before it start at or before n_first
    return _tile_range(first, end, full_from, full_to, Q_LEN, BLOCK_M)


@triton.jit
def mask_scores(x, keep, bounds, APPLY_MASK: tl.constexpr, CHECK_BOUNDS: tl.constexpr):
    """-inf where the mask hook (PARTIAL tiles) or the sequence bounds say so."""
    if APPLY_MASK:
        if CHECK_BOUNDS:
            keep = keep & bounds
        x = tl.where(keep, x, float("-inf"))
    elif CHECK_BOUNDS:
        x = tl.where(bounds, x, float("-inf"))
    return x


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, q_ok, off_b, off_h,
    stride_kn, stride_vn, KV_LEN, scale,
    CAPTURED, STRIDES,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, P_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, FP32_OPERANDS: tl.constexpr,
):
    """One kv tile: scores, hooks, online softmax update, P @ V."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_ok = offs_n < KV_LEN
    d_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    dv_ok = tl.arange(0, BLOCK_DV) < HEAD_DIM_V
    start64 = start_n.to(tl.int64)
    k = load_2d(k_ptrs + start64 * stride_kn, d_ok, kv_ok, EVEN_D, EVEN_N)  # [BLOCK_D, BLOCK_N]
    qk = lib.mma(q, lib.widen_for_dot(k, FP32_OPERANDS), None, INPUT_PRECISION)
    q_idx = offs_m[:, None]
    kv_idx = offs_n[None, :]
    if HAS_SCORE_MOD:  # natural units, Note [exponent units]
        x = SCORE_MOD(qk * scale, off_b, off_h, q_idx, kv_idx, q_ok[:, None], kv_ok[None, :], CAPTURED, STRIDES)
    else:
        x = qk * (scale * LOG2E)
    keep = kv_ok[None, :]
    if APPLY_MASK:
        keep = MASK_MOD(off_b, off_h, q_idx, kv_idx, q_ok[:, None], kv_ok[None, :], CAPTURED, STRIDES)
    x = mask_scores(x, keep, kv_ok[None, :], APPLY_MASK, not EVEN_N)
    m_new = tl.maximum(m_i, tl.max(x, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # Note [fully masked rows]
    if HAS_SCORE_MOD:
        p = tl.exp2((x - m_use[:, None]) * LOG2E)
        alpha = tl.exp2((m_i - m_use) * LOG2E)
    else:
        p = tl.exp2(x - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_2d(v_ptrs + start64 * stride_vn, kv_ok, dv_ok, EVEN_N, EVEN_DV)  # [BLOCK_N, BLOCK_DV]
    acc = acc * alpha[:, None]
    acc = lib.mma(lib.as_dot_operand(p, P_DTYPE, FP32_OPERANDS), lib.widen_for_dot(v, FP32_OPERANDS), acc,
                  INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(
    Q, K, V, OUT, LSE, ROW_SELECT,
    KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX,
    CAPTURED, STRIDES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_rb, stride_rh, stride_rm,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im,
    Q_LEN, KV_LEN, scale,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK: tl.constexpr, IS_SPARSE: tl.constexpr, HAS_ROW_SELECT: tl.constexpr,
    GQA_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPARSE_Q_MULT: tl.constexpr, SPARSE_KV_MULT: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, FP32_OPERANDS: tl.constexpr, EMPTY_NAN: tl.constexpr = False,
    KV_BOUNDS: tl.constexpr = False, KV_LO: tl.constexpr = None, KV_HI: tl.constexpr = None,
):
    # last q tiles first: under causal-like masks they visit the most kv tiles (shorter tail)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hkv = off_h // GQA_GROUP
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEAD_DIM_V == BLOCK_DV

    b64 = off_b.to(tl.int64)
    Q_BASE = Q + b64 * stride_qb + off_h.to(tl.int64) * stride_qh
    K_BASE = K + b64 * stride_kb + off_hkv.to(tl.int64) * stride_kh
    V_BASE = V + b64 * stride_vb + off_hkv.to(tl.int64) * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = offs_m < Q_LEN
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = load_2d(Q_BASE + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, q_ok, offs_d < HEAD_DIM,
                EVEN_M, EVEN_D)
    q = lib.widen_for_dot(q, FP32_OPERANDS)
    k_ptrs = K_BASE + offs_d[:, None] * stride_kd + offs_n0[None, :] * stride_kn
    v_ptrs = V_BASE + offs_n0[:, None] * stride_vn + offs_dv[None, :] * stride_vd

    # which kv tiles to visit: FULL ones without the mask, PARTIAL ones with it
    full_from = 0  # KV_BOUNDS: the FULL tiles' first; the PARTIAL walk's head (count, first) and tail's first
    part_head = 0
    part_from = 0
    tail_from = 0
    if KV_BOUNDS:  # Note [closed-form bounds] in masks/bounds.py: no tables
        n_full, full_from, n_part, part_head, part_from, tail_from = bounded_kv_loops(
            KV_LO, KV_HI, pid_m, BLOCK_M, Q_LEN, KV_LEN, BLOCK_N)
        FULL_IDX = KV_IDX
        PART_IDX = KV_IDX
    elif IS_SPARSE:
        sp_row = pid_m // SPARSE_Q_MULT
        num_off = off_b * stride_nb + off_h * stride_nh + sp_row * stride_nm
        idx_off = off_b.to(tl.int64) * stride_ib + off_h.to(tl.int64) * stride_ih + sp_row.to(tl.int64) * stride_im
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
    if HAS_ROW_SELECT:  # Note [row select]
        R_BASE = ROW_SELECT + b64 * stride_rb + off_h.to(tl.int64) * stride_rh
        selected = tl.load(R_BASE + offs_m * stride_rm, mask=q_ok, other=0) != 0
        any_selected = tl.max(selected.to(tl.int32), 0) > 0
        n_full = tl.where(any_selected, n_full, 0)
        n_part = tl.where(any_selected, n_part, 0)

    P_DTYPE: tl.constexpr = V.dtype.element_ty
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for it in range(0, n_full):
        start_n = walk_start(FULL_IDX, it, SPARSE_KV_MULT, BLOCK_N, IS_SPARSE, KV_BOUNDS, n_full, full_from, 0)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, q_ok, off_b, off_h,
            stride_kn, stride_vn, KV_LEN, scale, CAPTURED, STRIDES,
            SCORE_MOD, MASK_MOD, HAS_SCORE_MOD, False, EVEN_N, EVEN_D, EVEN_DV,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, P_DTYPE, INPUT_PRECISION, FP32_OPERANDS)
    for it in range(0, n_part):
        start_n = walk_start(PART_IDX, it, SPARSE_KV_MULT, BLOCK_N, IS_SPARSE, KV_BOUNDS, part_head, part_from,
                             tail_from)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, q_ok, off_b, off_h,
            stride_kn, stride_vn, KV_LEN, scale, CAPTURED, STRIDES,
            SCORE_MOD, MASK_MOD, HAS_SCORE_MOD, HAS_MASK, EVEN_N, EVEN_D, EVEN_DV,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, P_DTYPE, INPUT_PRECISION, FP32_OPERANDS)

    # Note [fully masked rows]
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if EMPTY_NAN:  # eager's softmax over an all -inf row (Note [fully masked rows])
        out = tl.where(empty[:, None], float("nan"), out)
    log2_l = tl.log2(tl.where(empty, 1.0, l_i))
    if HAS_SCORE_MOD:  # Note [exponent units]
        lse = tl.where(empty, float("-inf"), m_i + log2_l * LN2)
    else:
        lse = tl.where(empty, float("-inf"), (m_i + log2_l) * LN2)
    if HAS_ROW_SELECT:
        out = tl.where(selected[:, None], out, 0.0)
        lse = tl.where(selected, lse, float("-inf"))
    O_BASE = OUT + b64 * stride_ob + off_h.to(tl.int64) * stride_oh
    store_2d(O_BASE + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             lib.cast_for_store(out, OUT.dtype.element_ty, FP32_OPERANDS), q_ok, offs_dv < HEAD_DIM_V,
             EVEN_M, EVEN_DV)
    L_BASE = LSE + b64 * stride_lb + off_h.to(tl.int64) * stride_lh
    if EVEN_M:
        tl.store(L_BASE + offs_m * stride_lm, lse)
    else:
        tl.store(L_BASE + offs_m * stride_lm, lse, mask=q_ok)
