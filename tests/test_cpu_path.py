"""The CPU path (runtime.py composing cpu.py) against the fp64 oracle and plain eager code.

Every case builds its AttentionSpec by hand with ``E.call`` and also says, in
plain torch (``eager``), what the model it stands for computes, with masks as
additive -inf / finfo.min terms the way models write them.  Checks, per case,
dtype and shape:

- forward out and lse obey the numerics rule against ``reference_attention``
  in fp64, with ``eager_in_dtype`` as the yardstick;
- the plain eager function in fp64 agrees with the oracle (so the hand-built
  spec means what the case says), NaN for NaN;
- gradients for q, k, v and learned captured tensors obey the rule against the
  oracle's autograd (``fully_masked_rows="zeros"``, where both drop dead rows)
  and against autograd through the plain eager function (policy "eager": NaN
  exactly where eager's autograd puts NaN).

Tiles are 16 x 32 so that even 17-long sequences cross several tiles.
"""

from __future__ import annotations

import dataclasses
import math
import types
import zlib
from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attn_inductor import cpu, runtime
from attn_inductor.lowering import expr as E
from attn_inductor.lowering.spec import AttentionSpec
from attn_inductor.masks.block_sparsity import EMPTY, FULL, PARTIAL, from_block_map
from attn_inductor.reference import eager_in_dtype, reference_attention
from attn_inductor.testing.numerics import assert_close_to_reference

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiles here are tiny: intra-op threads only add hand-off cost, and on a busy 2-core
    machine spinning OpenMP workers made this file ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL_TILES = types.SimpleNamespace(
    core_forward=cpu.core_forward,
    core_backward=cpu.core_backward,
    preferred_blocks=lambda q, k, v, backward=False: (16, 32) if not backward else (32, 16),
)
FMIN = torch.finfo(torch.float32).min
BOOL = E.BOOL


@dataclasses.dataclass
class Shape:
    batch: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int

    @property
    def group(self):
        return self.hq // self.hkv


SHAPES = {
    "17x17": Shape(2, 4, 4, 17, 17, 16),
    "gqa2_100x100": Shape(2, 4, 2, 100, 100, 16),
    "gqa4_1x100": Shape(2, 8, 2, 1, 100, 8),
    "gqa4_100x17": Shape(2, 4, 1, 100, 17, 16),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


@dataclasses.dataclass
class Case:
    spec: AttentionSpec
    captured: list            # tensors, in the test dtype where float
    learned: list             # captured_needs_grad
    eager: Callable           # (s [B,Hq,Lq,Lk] fp64, captured, qi, ki) -> logits, additive masks included


# ----------------------------------------------------------------------------- cases


def _causal():
    return E.call("le", E.kv_idx, E.q_idx, dtype=BOOL)


def _neg_inf_unless(keep):
    return torch.where(keep, 0.0, -math.inf)


def case_none(sh, F, dt, g):
    return Case(AttentionSpec(score_live=E.score, scale=sh.d ** -0.5), [], [], lambda s, c, qi, ki: s)


def case_causal(sh, F, dt, g):
    spec = AttentionSpec(score_live=E.score, mask=_causal(), scale=sh.d ** -0.5)
    return Case(spec, [], [], lambda s, c, qi, ki: s + _neg_inf_unless(ki <= qi))


def case_sliding_window(sh, F, dt, g, window=8):
    diff = E.call("sub", E.q_idx, E.kv_idx, dtype=E.INT64)
    mask = E.and_(_causal(), E.call("lt", diff, E.const(window, E.INT64), dtype=BOOL))
    spec = AttentionSpec(score_live=E.score, mask=mask, scale=sh.d ** -0.5)
    return Case(spec, [], [], lambda s, c, qi, ki: s + _neg_inf_unless((ki <= qi) & (qi - ki < window)))


def case_alibi(sh, F, dt, g):
    """score + slope[h] * (kv_idx - q_idx), causal; slopes learned."""
    slopes = (2.0 ** (-8.0 * torch.arange(1, sh.hq + 1) / sh.hq)).to(dt)
    rel = E.call("to", E.call("sub", E.kv_idx, E.q_idx, dtype=E.INT64), dtype=F)
    bias = E.call("mul", E.Load(0, (E.h,), F), rel, dtype=F)
    spec = AttentionSpec(score_live=E.call("add", E.score, bias, dtype=F), mask=_causal(),
                         scale=sh.d ** -0.5, num_captured=1)

    def eager(s, c, qi, ki):
        return s + c[0].view(1, -1, 1, 1) * (ki - qi) + _neg_inf_unless(ki <= qi)

    return Case(spec, [slopes], [True], eager)


def case_relative_bias(sh, F, dt, g):
    """score + T[h, q_idx - kv_idx + Lk - 1], learned table, no mask."""
    table = (0.5 * torch.randn(sh.hq, sh.lq + sh.lk - 1, generator=g)).to(dt)
    rel = E.call("add", E.call("sub", E.q_idx, E.kv_idx, dtype=E.INT64), E.const(sh.lk - 1, E.INT64),
                 dtype=E.INT64)
    spec = AttentionSpec(score_live=E.call("add", E.score, E.Load(0, (E.h, rel), F), dtype=F),
                         scale=sh.d ** -0.5, num_captured=1)

    def eager(s, c, qi, ki):
        return s + c[0][:, qi - ki + sh.lk - 1].unsqueeze(0)

    return Case(spec, [table], [True], eager)


def case_softcap(sh, F, dt, g, cap=2.0):
    """cap * tanh(score / cap), causal; scores are ~N(0, 3) so the cap bites."""
    capped = E.call("mul", E.call("tanh", E.call("truediv", E.score, E.const(cap, F), dtype=F), dtype=F),
                    E.const(cap, F), dtype=F)
    spec = AttentionSpec(score_live=capped, mask=_causal(), scale=3 * sh.d ** -0.5)
    return Case(spec, [], [], lambda s, c, qi, ki: torch.tanh(s / cap) * cap + _neg_inf_unless(ki <= qi))


def case_document(sh, F, dt, g):
    """Same document (1-D ids, a Load per index) and causal."""
    n = max(sh.lq, sh.lk)
    doc = torch.sort(torch.randint(0, 4, (n,), generator=g)).values
    same_doc = E.call("eq", E.Load(0, (E.q_idx,), E.INT64), E.Load(0, (E.kv_idx,), E.INT64), dtype=BOOL)
    spec = AttentionSpec(score_live=E.score, mask=E.and_(same_doc, _causal()), scale=sh.d ** -0.5,
                         num_captured=1)

    def eager(s, c, qi, ki):
        return s + _neg_inf_unless((c[0][qi] == c[0][ki]) & (ki <= qi))

    # a query whose document starts after key Lk has no live key: a NaN row, as in eager
    return Case(spec, [doc], [False], eager)


def _padding(sh):
    """Key padding [B, Lk]: batch 0 left-padded by 3, batch 1 padded entirely."""
    pad = torch.ones(sh.batch, sh.lk, dtype=torch.bool)
    pad[0, :3] = False
    pad[1:] = False
    return pad


def case_padding_soft(sh, F, dt, g):
    """Hugging Face style: causal and padding both folded into one finfo.min additive mask."""
    pad = E.Load(0, (E.b, E.kv_idx), BOOL)
    allowed = E.and_(_causal(), pad)
    full = E.call("add", E.score, E.call("where", allowed, E.const(0.0, F), E.const(FMIN, F), dtype=F), dtype=F)
    spec = AttentionSpec(score_live=E.score, soft_mask=allowed, score_full=full, scale=sh.d ** -0.5,
                         num_captured=1)

    def eager(s, c, qi, ki):
        return s + torch.where((ki <= qi) & c[0][:, None, None, :], 0.0, FMIN)

    return Case(spec, [_padding(sh)], [False], eager)


def case_causal_hard_padding_soft(sh, F, dt, g):
    """Causal as -inf, padding as finfo.min: a fully padded row averages V over keys <= q."""
    pad = E.Load(0, (E.b, E.kv_idx), BOOL)
    full = E.call("add", E.score, E.call("where", pad, E.const(0.0, F), E.const(FMIN, F), dtype=F), dtype=F)
    spec = AttentionSpec(score_live=E.score, mask=_causal(), soft_mask=pad, score_full=full,
                         scale=sh.d ** -0.5, num_captured=1)

    def eager(s, c, qi, ki):
        return s + torch.where(c[0][:, None, None, :], 0.0, FMIN) + _neg_inf_unless(ki <= qi)

    return Case(spec, [_padding(sh)], [False], eager)


def case_hard_padding(sh, F, dt, g):
    """Padding as -inf with an ALiBi-learned bias: fully masked rows are NaN, as in eager."""
    slopes = torch.linspace(0.1, 0.9, sh.hq).to(dt)
    rel = E.call("to", E.call("sub", E.kv_idx, E.q_idx, dtype=E.INT64), dtype=F)
    bias = E.call("mul", E.Load(1, (E.h,), F), rel, dtype=F)
    mask = E.and_(E.Load(0, (E.b, E.kv_idx), BOOL), _causal())
    spec = AttentionSpec(score_live=E.call("add", E.score, bias, dtype=F), mask=mask, scale=sh.d ** -0.5,
                         num_captured=2)

    def eager(s, c, qi, ki):
        keep = c[0][:, None, None, :] & (ki <= qi)
        return s + c[1].view(1, -1, 1, 1) * (ki - qi) + _neg_inf_unless(keep)

    return Case(spec, [_padding(sh), slopes], [False, True], eager)


CASES = {f.__name__[5:]: f for f in (
    case_none, case_causal, case_sliding_window, case_alibi, case_relative_bias, case_softcap,
    case_document, case_padding_soft, case_causal_hard_padding_soft, case_hard_padding,
)}


# ----------------------------------------------------------------------------- helpers


def _build(case_name, sh: Shape, dtype, g) -> Case:
    """The case for this shape and dtype (float IR nodes typed float64 for fp64 inputs)."""
    case = CASES[case_name](sh, "float64" if dtype == torch.float64 else "float32", dtype, g)
    case.spec = dataclasses.replace(case.spec, gqa_group=sh.group)
    return case


def _inputs(sh: Shape, dtype, g):
    q = torch.randn(sh.batch, sh.hq, sh.lq, sh.d, generator=g).to(dtype)
    k = torch.randn(sh.batch, sh.hkv, sh.lk, sh.d, generator=g).to(dtype)
    # v with a non-zero mean makes "mean of V" rows distinguishable from zeros
    v = (torch.randn(sh.batch, sh.hkv, sh.lk, sh.d, generator=g) + 0.5).to(dtype)
    return q, k, v


def _leaves(tensors, dtype, learned=None):
    out = []
    for i, t in enumerate(tensors):
        if t.is_floating_point():
            t = t.detach().to(dtype).requires_grad_(True if learned is None else learned[i])
        out.append(t)
    return out


def _plain_eager(case: Case, sh: Shape, q, k, v, captured):
    """The model's own maths, on whatever dtype it is given (used in fp64)."""
    k, v = k.repeat_interleave(sh.group, 1), v.repeat_interleave(sh.group, 1)
    s = (q @ k.transpose(-1, -2)) * case.spec.scale
    qi, ki = torch.arange(sh.lq)[:, None], torch.arange(sh.lk)[None, :]
    return torch.softmax(case.eager(s, captured, qi, ki), dim=-1) @ v


def _grads(out, tensors, grad_out):
    needs = [t for t in tensors if t.requires_grad]
    got = iter(torch.autograd.grad(out, needs, grad_out, allow_unused=True))
    return [next(got) if t.requires_grad else None for t in tensors]


def _effective_lse(lse, lse_fallback):
    return lse if lse_fallback.numel() == 0 else torch.where(lse == -math.inf, lse_fallback, lse)


def _check_lse(lse, ref, eager, name):
    """lse of soft-masked rows sits at ~finfo.min; those are checked relatively, apart."""
    huge = ref < -1e30
    assert torch.equal(lse < -1e30, huge), f"{name}: fallback rows differ"
    torch.testing.assert_close(lse[huge].double(), ref[huge], rtol=1e-6, atol=0)  # lse is fp32 always
    normal = ~huge
    assert_close_to_reference(lse[normal], ref[normal], eager[normal], name=name)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("case_name", CASES)
def test_matches_oracle_and_eager(case_name, shape, dtype):
    g = torch.Generator().manual_seed(zlib.crc32(f"{case_name}{shape}{dtype}".encode()))
    case = _build(case_name, shape, dtype, g)
    q, k, v = _inputs(shape, dtype, g)
    spec = case.spec

    # forward against the oracle
    out, lse, lse_fb = runtime.attention_forward(spec, q, k, v, case.captured, SMALL_TILES)
    ref_out, ref_lse = reference_attention(spec, q, k, v, case.captured)
    eager_out, eager_lse = eager_in_dtype(spec, q, k, v, case.captured)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_to_reference(out, ref_out, eager_out, name="out")
    _check_lse(_effective_lse(lse, lse_fb), ref_lse, eager_lse, "lse")

    # the plain eager model agrees with the oracle: the spec means what the case says
    q64, k64, v64 = _leaves([q, k, v], torch.float64)
    cap64 = _leaves(case.captured, torch.float64, case.learned)
    plain = _plain_eager(case, shape, q64, k64, v64, cap64)
    torch.testing.assert_close(plain, ref_out, rtol=1e-9, atol=1e-9, equal_nan=True)

    grad_out = torch.randn(out.shape, generator=g).to(dtype)
    # backward, eager policy, against autograd through the plain eager model (NaN where it has NaN)
    want = _grads(plain, [q64, k64, v64, *cap64], grad_out.double())
    got = runtime.attention_backward(spec, q, k, v, out, lse, lse_fb, grad_out, case.captured,
                                     case.learned, SMALL_TILES)
    got = [*got[:3], *got[3]]
    yard = _yardstick_grads(spec, case, q, k, v, grad_out)
    for name, a, w, y in zip(_GRAD_NAMES, got, want, yard):
        if w is None:
            assert a is None, name
            continue
        assert a.dtype == dtype and a.shape == w.shape, name
        assert_close_to_reference(a, w, y, name=f"{name} vs plain eager")

    # backward, zeros policy, against the oracle's autograd (both drop rows with no entry)
    zspec = dataclasses.replace(spec, fully_masked_rows="zeros")
    zout, zlse, zlse_fb = runtime.attention_forward(zspec, q, k, v, case.captured, SMALL_TILES)
    assert not torch.isnan(zout).any()
    ref_out, _ = reference_attention(zspec, q64, k64, v64, cap64)
    want = _grads(ref_out, [q64, k64, v64, *cap64], grad_out.double())
    got = runtime.attention_backward(zspec, q, k, v, zout, zlse, zlse_fb, grad_out, case.captured,
                                     case.learned, SMALL_TILES)
    yard = _yardstick_grads(zspec, case, q, k, v, grad_out)
    for name, a, w, y in zip(_GRAD_NAMES, [*got[:3], *got[3]], want, yard):
        if w is not None:
            assert_close_to_reference(a, w, torch.nan_to_num(y), name=f"{name} vs oracle")


_GRAD_NAMES = ("dq", "dk", "dv", "dcaptured0", "dcaptured1")


def _yardstick_grads(spec, case, q, k, v, grad_out):
    ql, kl, vl = _leaves([q, k, v], q.dtype)
    cap = _leaves(case.captured, q.dtype, case.learned)
    out, _ = eager_in_dtype(spec, ql, kl, vl, cap)
    return _grads(out, [ql, kl, vl, *cap], grad_out)


def test_fully_soft_masked_row_is_mean_of_hard_live_values():
    sh = Shape(2, 2, 2, 9, 9, 8)
    g = torch.Generator().manual_seed(0)
    case = _build("causal_hard_padding_soft", sh, torch.float32, g)
    q, k, v = _inputs(sh, torch.float32, g)
    out, lse, lse_fb = runtime.attention_forward(case.spec, q, k, v, case.captured, SMALL_TILES)
    # batch 1 is padded entirely: row q averages v over keys 0..q (causal, the hard mask)
    want = v[1].cumsum(1) / torch.arange(1, 10).view(1, -1, 1)
    torch.testing.assert_close(out[1], want, rtol=1e-6, atol=1e-6)
    assert torch.all(lse[1] == -math.inf) and torch.all(lse_fb[1] > -math.inf)
    assert torch.all(lse_fb[0, :, 3:] == -math.inf)  # rows with a live key never fall back


def test_hard_masked_rows_are_nan_exactly_where_eager_has_nan():
    sh = Shape(2, 4, 2, 17, 17, 8)
    g = torch.Generator().manual_seed(1)
    case = _build("hard_padding", sh, torch.float32, g)
    q, k, v = _inputs(sh, torch.float32, g)
    out, _, _ = runtime.attention_forward(case.spec, q, k, v, case.captured, SMALL_TILES)
    plain = _plain_eager(case, sh, q, k, v, case.captured)
    nan_rows = torch.isnan(plain).all(-1)
    assert nan_rows[0, :, :3].all() and nan_rows[1].all() and not nan_rows[0, :, 3:].any()
    assert torch.equal(torch.isnan(out), torch.isnan(plain))

    zeros = dataclasses.replace(case.spec, fully_masked_rows="zeros")
    zout, zlse, _ = runtime.attention_forward(zeros, q, k, v, case.captured, SMALL_TILES)
    assert torch.all(zout[nan_rows.unsqueeze(-1).expand_as(zout)] == 0)
    assert torch.all(zlse[nan_rows] == -math.inf)


def test_core_trusts_the_block_table():
    """FULL tiles skip the mask and EMPTY tiles are never visited, as the table says."""
    sh = Shape(1, 2, 2, 32, 32, 8)
    g = torch.Generator().manual_seed(2)
    q, k, v = _inputs(sh, torch.float32, g)
    causal = _causal()
    kw = dict(score=E.score, scale=0.3, gqa_group=1)
    # a (wrong) table claiming every tile FULL: the causal mask is never applied
    all_full = from_block_map(torch.full((1, 1, 2, 2), FULL, dtype=torch.int8), block_m=16, block_n=16,
                              q_len=32, kv_len=32)
    out, _ = cpu.core_forward(q, k, v, [], mask=causal, sparsity=all_full, **kw)
    unmasked, _ = cpu.core_forward(q, k, v, [], mask=None, sparsity=None, **kw)
    torch.testing.assert_close(out, unmasked)
    # a table whose only live tile is (1, 0): rows 0..15 have nothing, rows 16..31 see keys 0..15
    only_10 = torch.full((1, 1, 2, 2), EMPTY, dtype=torch.int8)
    only_10[..., 1, 0] = PARTIAL
    sparsity = from_block_map(only_10, block_m=16, block_n=16, q_len=32, kv_len=32)
    out, lse = cpu.core_forward(q, k, v, [], mask=causal, sparsity=sparsity, **kw)
    assert torch.all(out[:, :, :16] == 0) and torch.all(lse[:, :, :16] == -math.inf)
    first_keys, _ = cpu.core_forward(q[:, :, 16:], k[:, :, :16], v[:, :, :16], [], mask=None, sparsity=None, **kw)
    torch.testing.assert_close(out[:, :, 16:], first_keys)


def test_row_select_zeroes_unselected_rows():
    sh = Shape(2, 2, 1, 40, 40, 8)
    g = torch.Generator().manual_seed(3)
    q, k, v = _inputs(sh, torch.float32, g)
    select = torch.rand(2, 2, 40, generator=g) < 0.3
    kw = dict(score=E.score, mask=_causal(), scale=0.3, gqa_group=2, sparsity=None)
    out, lse = cpu.core_forward(q, k, v, [], row_select=select, **kw)
    full, full_lse = cpu.core_forward(q, k, v, [], **kw)
    torch.testing.assert_close(out[select], full[select])
    torch.testing.assert_close(lse[select], full_lse[select])
    assert torch.all(out[~select] == 0) and torch.all(lse[~select] == -math.inf)


def test_any_strides():
    """q, k, v as [B, L, H, D] storage viewed [B, H, L, D], as models produce them."""
    sh = Shape(2, 4, 2, 33, 40, 8)
    g = torch.Generator().manual_seed(5)
    case = _build("relative_bias", sh, torch.float32, g)
    q, k, v = _inputs(sh, torch.float32, g)
    q_t, k_t, v_t = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not q_t.is_contiguous()
    out, lse, lse_fb = runtime.attention_forward(case.spec, q, k, v, case.captured, SMALL_TILES)
    out_t, lse_t, _ = runtime.attention_forward(case.spec, q_t, k_t, v_t, case.captured, SMALL_TILES)
    torch.testing.assert_close(out_t, out, rtol=1e-5, atol=1e-6)  # strides change MKL kernels, not maths
    grad_out = torch.randn(out.shape, generator=g).transpose(1, 2).contiguous().transpose(1, 2)
    want = runtime.attention_backward(case.spec, q, k, v, out, lse, lse_fb, grad_out.contiguous(), case.captured,
                                      case.learned, SMALL_TILES)
    got = runtime.attention_backward(case.spec, q_t, k_t, v_t, out_t, lse_t, lse_fb, grad_out, case.captured,
                                     case.learned, SMALL_TILES)
    for a, w in zip([*got[:3], *got[3]], [*want[:3], *want[3]]):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)


class _LargestStorage(TorchDispatchMode):
    """Largest storage (bytes) any op produced while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_extra_memory_does_not_scale_with_lq_times_lk():
    sh = Shape(1, 2, 2, 2048, 2048, 8)
    g = torch.Generator().manual_seed(4)
    q, k, v = _inputs(sh, torch.float32, g)
    score_matrix_bytes = sh.batch * sh.hq * sh.lq * sh.lk * 4
    spec = AttentionSpec(score_live=E.score, mask=_causal(), scale=0.3)

    with _LargestStorage() as ours:
        out, lse, lse_fb = runtime.attention_forward(spec, q, k, v, [], cpu)
        runtime.attention_backward(spec, q, k, v, out, lse, lse_fb, torch.ones_like(out), [], [], cpu)
    with _LargestStorage() as dense:  # the detector sees a materialised score matrix
        reference_attention(spec, q, k, v, [], compute_dtype=torch.float32)
    assert dense.largest >= score_matrix_bytes
    block_m, block_n = cpu.preferred_blocks(q, k, v)
    tile_bytes = sh.batch * sh.hq * block_m * block_n * 4
    assert ours.largest <= max(tile_bytes, q.nbytes) * 2
    assert ours.largest * 16 <= score_matrix_bytes
