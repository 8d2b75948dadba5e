"""The Triton kernels (templates/) on CPU tensors under the Triton interpreter.

Every case runs the real forward and backward kernels against a dense fp64
reference written here (softmax over masked scores; rows with no live entry give
0 out, -inf lse and no gradient), judged by the project's numerics rule:
the kernel's error vs fp64 is at most 2x the error of the same maths done
naively in the input dtype (``attn_inductor.testing.numerics``).

``TRITON_INTERPRET=1`` is set by a module fixture, which also (re)defines the
kernels under it (``triton.jit`` picks interpreted functions at decoration
time) and restores everything afterwards, so merely collecting this file
changes nothing for other test modules (GPU runs included).  Shapes are tiny
(the interpreter runs every program in numpy): the file runs in a few minutes
on 2 cores.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from attn_inductor.lowering import expr as E  # noqa: E402
from attn_inductor.masks.block_sparsity import EMPTY, FULL, PARTIAL, dense, from_block_map  # noqa: E402
from attn_inductor.templates import hooks, launch  # noqa: E402  (no Triton kernel is defined by these)
from attn_inductor.testing.numerics import assert_close_to_reference  # noqa: E402

F32, I64, BOOL = "float32", "int64", "bool"
_KERNEL_MODULES = ("attn_inductor.templates.hook_lib", "attn_inductor.templates.attn_fwd",
                   "attn_inductor.templates.attn_bwd")


def _reload_triton_standard():
    """Re-run ``triton.language.standard``'s ``@triton.jit`` decorators under the current mode.

    ``triton.jit`` chooses interpreted or compiled functions when a module is
    imported, and ``torch._dynamo`` imports Triton long before this file can set
    ``TRITON_INTERPRET``; ``tl.zeros``, ``tl.max``, ``tl.sum``... would then stay
    compiled-mode functions the interpreter cannot call (Triton 3.9).
    """
    import triton.language as tl

    old = dict(vars(tl.standard))
    importlib.reload(tl.standard)
    for name, obj in old.items():
        if getattr(tl, name, None) is obj:
            setattr(tl, name, getattr(tl.standard, name))


def _reload_kernels():
    for name in _KERNEL_MODULES:
        importlib.import_module(name)
        importlib.reload(importlib.import_module(name))


def _language_namespaces():
    import triton.language as tl

    return (tl, tl.core, tl.math, tl.core.tensor)


@contextlib.contextmanager
def triton_interpreter():
    """The kernels as interpreted functions for the duration; everything restored afterwards.

    Besides the reloads, ``triton.language``'s namespaces are snapshotted and put
    back: the interpreter patches builtins when a device function runs and, for
    functions whose module sees ``triton.language.core`` (``tl.sum`` & co. once
    reloaded above), never restores them (Triton 3.9), which broke the real
    compiler later in the same process.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    saved = [(ns, dict(vars(ns))) for ns in _language_namespaces()]
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    std_reloaded = not isinstance(tl.standard.zeros, InterpretedFunction)
    try:
        if std_reloaded:
            _reload_triton_standard()
        _reload_kernels()
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
        for ns, attrs in saved:
            for name, value in attrs.items():
                if vars(ns).get(name) is not value:
                    setattr(ns, name, value)
        if std_reloaded:
            _reload_triton_standard()
            _reload_kernels()


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    with triton_interpreter():
        yield


# ----------------------------------------------------------------------------- expressions


def _c(v, dtype=I64):
    return E.const(v, dtype)


def causal_mask(offset: int = 0):
    """q_idx + offset >= kv_idx (offset = Lk - Lq aligns the ends, as in decoding)."""
    return E.call("ge", E.call("add", E.q_idx, _c(offset), dtype=I64), E.kv_idx, dtype=BOOL)


def causal_key_padding_mask():
    """Causal, and keys kept where the captured ``keep[b, kv_idx]`` (int64) is nonzero: a padding mask."""
    keep = E.call("ne", E.Load(0, (E.b, E.kv_idx), E.INT64), E.const(0, E.INT64), dtype=BOOL)
    return E.and_(causal_mask(), keep)


def sliding_mask(window: int):
    d = E.call("sub", E.q_idx, E.kv_idx, dtype=I64)
    return E.and_(causal_mask(), E.call("lt", d, _c(window), dtype=BOOL))


def alibi_score(buffer: int = 0):
    """score + slopes[h] * (kv_idx - q_idx)."""
    rel = E.call("to", E.call("sub", E.kv_idx, E.q_idx, dtype=I64), dtype=F32)
    slope = E.Load(buffer, (E.h,), F32)
    return E.call("add", E.score, E.call("mul", slope, rel, dtype=F32), dtype=F32)


def relbias_score(kv_len: int, buffer: int = 0):
    """score + T[h, q_idx - kv_idx + Lk - 1]."""
    idx = E.call("add", E.call("sub", E.q_idx, E.kv_idx, dtype=I64), _c(kv_len - 1), dtype=I64)
    return E.call("add", E.score, E.Load(buffer, (E.h, idx), F32), dtype=F32)


def softcap_score(cap: float):
    t = E.call("tanh", E.call("truediv", E.score, E.const(cap, F32), dtype=F32), dtype=F32)
    return E.call("mul", t, E.const(cap, F32), dtype=F32)


def document_mask(buffer: int = 0):
    """doc[b, q_idx] == doc[b, kv_idx], causal."""
    same = E.call("eq", E.Load(buffer, (E.b, E.q_idx), I64), E.Load(buffer, (E.b, E.kv_idx), I64), dtype=BOOL)
    return E.and_(causal_mask(), same)


def document_mask_as_masked_fill(buffer: int = 0):
    """What ``s.masked_fill((i < j) | (doc[:, None] != doc[None, :]), -inf)`` keeps (1-D ids):
    ``~(q_idx < kv_idx | doc[q_idx] != doc[kv_idx])``."""
    differ = E.call("ne", E.Load(buffer, (E.q_idx,), I64), E.Load(buffer, (E.kv_idx,), I64), dtype=BOOL)
    dropped = E.call("or", E.call("lt", E.q_idx, E.kv_idx, dtype=BOOL), differ, dtype=BOOL)
    return E.Call("not", (dropped,), BOOL)


# ----------------------------------------------------------------------------- reference


def _widen(expr, dtype):
    """float32 nodes computed in ``dtype`` (fp64 for the oracle)."""
    if expr is None or dtype == torch.float32:
        return expr
    name = E.dtype_name(dtype)
    memo = {}

    def go(e):
        if e in memo:
            return memo[e]
        if isinstance(e, E.Const):
            out = E.Const(e.value, name) if e.dtype == F32 else e
        elif isinstance(e, E.Load):
            out = E.Load(e.buffer, tuple(go(i) for i in e.indices), name if e.dtype == F32 else e.dtype)
        elif isinstance(e, E.Call):
            out = E.Call(e.op, tuple(go(a) for a in e.args), name if e.dtype == F32 else e.dtype)
        else:
            out = e
        memo[e] = out
        return out

    return go(expr)


def reference(q, k, v, captured, *, score, mask, scale, gqa_group=1, precise=True, row_select=None):
    """Dense attention: fp64 throughout (``precise``) or eager's maths in the input dtype
    (scores from a matmul in the input dtype, score mods in their IR dtype, softmax in
    fp32, P cast back).  Returns (out, lse); differentiable w.r.t. everything."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    acc = torch.float64 if precise else torch.float32
    kk = k.repeat_interleave(gqa_group, 1)
    vv = v.repeat_interleave(gqa_group, 1)
    if precise:
        q, kk, vv = q.double(), kk.double(), vv.double()
        captured = [t.double() if t.is_floating_point() else t for t in captured]
    s = (q @ kk.transpose(-1, -2)).to(acc) * scale
    idx = _indices(b, hq, lq, lk, q.device)
    mod = E.evaluate(_widen(score, acc), idx, captured, score_value=s).to(acc)
    mod = torch.broadcast_to(mod, s.shape)
    keep = torch.ones_like(s, dtype=torch.bool)
    if mask is not None:
        keep = torch.broadcast_to(E.evaluate(mask, idx, captured), s.shape)
    if row_select is not None:
        keep = keep & row_select[..., None]
    alive = keep.any(-1, keepdim=True)
    x = torch.where(keep, mod, -math.inf)
    x = torch.where(alive, x, 0.0)  # dead rows: a finite dummy so no NaN reaches the gradients
    p = torch.where(alive, torch.softmax(x, -1), 0.0)
    lse = torch.where(alive[..., 0], torch.logsumexp(x, -1), -math.inf)
    out = p.to(vv.dtype) @ vv
    return out, lse


def _indices(b, h, lq, lk, device="cpu"):
    return {"b": torch.arange(b, device=device).view(b, 1, 1, 1), "h": torch.arange(h, device=device).view(1, h, 1, 1),
            "q_idx": torch.arange(lq, device=device).view(1, 1, lq, 1),
            "kv_idx": torch.arange(lk, device=device).view(1, 1, 1, lk)}


def causal_block_map(pred, *, batch, heads, q_len, kv_len, block_m, block_n, captured=(), device="cpu"):
    """Brute force: FULL / PARTIAL / EMPTY per tile from the dense predicate ([B, H, NQ, NK])."""
    idx = _indices(batch, heads, q_len, kv_len, device)
    keep = torch.broadcast_to(E.evaluate(pred, idx, list(captured)), (batch, heads, q_len, kv_len))
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    out = torch.empty(batch, heads, nq, nk, dtype=torch.int8, device=device)
    for i in range(nq):
        for j in range(nk):
            t = keep[:, :, i * block_m:(i + 1) * block_m, j * block_n:(j + 1) * block_n]
            all_, any_ = t.flatten(2).all(-1), t.flatten(2).any(-1)
            out[:, :, i, j] = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
    return from_block_map(out, block_m=block_m, block_n=block_n, q_len=q_len, kv_len=kv_len)


def sparsity_for(mask, q, k, captured, block=16, kind="map"):
    b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if kind == "none":
        return None
    if mask is None or kind == "dense":
        return dense(block_m=block, block_n=block, q_len=lq, kv_len=lk, kind=FULL if mask is None else PARTIAL)
    return causal_block_map(mask, batch=b, heads=h, q_len=lq, kv_len=lk, block_m=block, block_n=block,
                            captured=captured)


# ----------------------------------------------------------------------------- harness


def _inputs(b, hq, hkv, lq, lk, d, dtype, dv=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    dv = dv or d
    q = torch.randn(b, hq, lq, d, generator=g).to(device, dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(device, dtype)
    v = torch.randn(b, hkv, lk, dv, generator=g).to(device, dtype)
    do = torch.randn(b, hq, lq, dv, generator=g).to(device, dtype)
    return q, k, v, do


def check_case(q, k, v, do, captured, needs_grad, *, score, mask, scale, gqa_group=1, sparsity="map",
               backward=True, deterministic=False, row_select=None):
    """Run the kernels and compare out, lse and every gradient with the fp64 oracle."""
    sp = sparsity_for(mask, q, k, captured, kind=sparsity) if isinstance(sparsity, str) else sparsity
    out, lse = launch.core_forward(q, k, v, captured, score=score, mask=mask, scale=scale, gqa_group=gqa_group,
                                   sparsity=sp, row_select=row_select)
    assert out.dtype == v.dtype and lse.dtype == torch.float32

    def run_ref(precise):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        caps = [t.detach().clone().requires_grad_(n) for t, n in zip(captured, needs_grad)]
        o, lse_ref = reference(*leaves, caps, score=score, mask=mask, scale=scale, gqa_group=gqa_group,
                               precise=precise, row_select=row_select)
        grads = None
        if backward:
            (o * do.to(o.dtype)).sum().backward()
            grads = [t.grad for t in leaves] + [c.grad if n else None for c, n in zip(caps, needs_grad)]
        return o.detach(), lse_ref.detach(), grads

    o64, l64, g64 = run_ref(True)
    olp, llp, glp = run_ref(False)
    assert_close_to_reference(out, o64, olp.to(out.dtype), name="out")
    assert_close_to_reference(lse, l64, llp, name="lse")
    if not backward:
        return out, lse, None
    lse_in = lse if row_select is None else torch.where(row_select, lse, -math.inf)
    dq, dk, dv, dcap = launch.core_backward(q, k, v, out, lse_in, do, captured, needs_grad, score=score, mask=mask,
                                            scale=scale, gqa_group=gqa_group, sparsity=sp,
                                            deterministic=deterministic)
    names = ["dq", "dk", "dv"] + [f"dcaptured[{i}]" for i in range(len(captured))]
    for name, got, ref, lp in zip(names, [dq, dk, dv] + list(dcap), g64, glp):
        if ref is None:
            assert got is None, name
            continue
        assert got.shape == ref.shape and got.dtype == lp.dtype, name
        assert_close_to_reference(got, ref, lp.to(got.dtype), name=name)
    return out, lse, (dq, dk, dv, dcap)


# ----------------------------------------------------------------------------- cases


@pytest.mark.parametrize("lq,lk,d", [(33, 33, 16), (17, 64, 80), (64, 17, 16), (1, 33, 16)])
@pytest.mark.parametrize("sparsity", ["map", "none"])
def test_no_mask(lq, lk, d, sparsity):
    """No mask: with dense FULL tables, and with none (every kv tile walked untabled: what the runtime
    passes, ``launch.reads_no_tables``)."""
    q, k, v, do = _inputs(1, 2, 2, lq, lk, d, torch.float32)
    check_case(q, k, v, do, [], [], score=E.score, mask=None, scale=d ** -0.5, sparsity=sparsity)


def test_runtime_passes_no_tables_without_a_mask(monkeypatch):
    """The runtime hands the Triton cores no sparsity for unmasked attention and for closed-form masks
    (no table to build or read), tables for other masks and when ``ATTN_INDUCTOR_SPARSITY=tables``."""
    from attn_inductor import runtime

    q, k, v, _ = _inputs(1, 2, 2, 40, 40, 16, torch.float32)
    doc = torch.arange(40) // 13
    document = E.call("eq", E.Load(0, (E.q_idx,), E.INT64), E.Load(0, (E.kv_idx,), E.INT64), dtype=BOOL)
    assert runtime._sparsity(launch, None, q, k, v, [], backward=False) is None
    assert runtime._sparsity(launch, causal_mask(), q, k, v, [], backward=True) is None
    assert runtime._sparsity(launch, document, q, k, v, [doc], backward=False) is not None
    monkeypatch.setenv("ATTN_INDUCTOR_SPARSITY", "tables")
    assert runtime._sparsity(launch, None, q, k, v, [], backward=False) is not None
    assert runtime._sparsity(launch, causal_mask(), q, k, v, [], backward=False) is not None


@pytest.mark.parametrize("sparsity", ["map", "dense", "none"])
def test_causal_block_kinds(sparsity, monkeypatch):
    """Tables of every kind (read because ATTN_INDUCTOR_SPARSITY=tables), and no table (closed-form bounds)."""
    if sparsity != "none":
        monkeypatch.setenv("ATTN_INDUCTOR_SPARSITY", "tables")
    q, k, v, do = _inputs(2, 2, 2, 33, 33, 16, torch.float32)
    mask = causal_mask()
    if sparsity == "map":  # the brute-force map has all three kinds
        kinds = set(causal_block_map(mask, batch=1, heads=1, q_len=33, kv_len=33, block_m=16, block_n=16)
                    .block_map().flatten().tolist())
        assert kinds == {EMPTY, PARTIAL, FULL}
    check_case(q, k, v, do, [], [], score=E.score, mask=mask, scale=0.25, sparsity=sparsity)


def test_table_blocks_larger_than_tiles(monkeypatch):
    """Tables with 32-blocks walked as 2 x 2 kernel tiles of 16."""
    monkeypatch.setenv("ATTN_INDUCTOR_SPARSITY", "tables")
    q, k, v, do = _inputs(1, 2, 2, 50, 70, 16, torch.float32)
    mask = causal_mask(offset=20)
    sp = causal_block_map(mask, batch=1, heads=1, q_len=50, kv_len=70, block_m=32, block_n=32)
    check_case(q, k, v, do, [], [], score=E.score, mask=mask, scale=0.25, sparsity=sp)


def test_sliding_window():
    q, k, v, do = _inputs(1, 2, 2, 64, 64, 16, torch.float32)
    check_case(q, k, v, do, [], [], score=E.score, mask=sliding_mask(20), scale=0.25)


def test_alibi_learned_slopes():
    q, k, v, do = _inputs(1, 4, 4, 33, 33, 16, torch.float32)
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / 4) for i in range(4)])
    check_case(q, k, v, do, [slopes], [True], score=alibi_score(), mask=causal_mask(), scale=0.25)


@pytest.mark.parametrize("lq,lk", [(33, 33), (17, 40)])
def test_relative_bias_table(lq, lk):
    q, k, v, do = _inputs(1, 2, 2, lq, lk, 16, torch.float32)
    table = torch.randn(2, lq + lk - 1, generator=torch.Generator().manual_seed(3))
    check_case(q, k, v, do, [table], [True], score=relbias_score(lk), mask=None, scale=0.25)


def test_softcap():
    q, k, v, do = _inputs(1, 2, 2, 33, 33, 16, torch.float32)
    check_case(q, k, v, do, [], [], score=softcap_score(2.0), mask=causal_mask(), scale=1.0)


def test_document_ids():
    q, k, v, do = _inputs(2, 2, 2, 40, 40, 16, torch.float32)
    doc = torch.tensor([[0] * 10 + [1] * 20 + [2] * 10, [0] * 25 + [1] * 15])
    check_case(q, k, v, do, [doc], [False], score=E.score, mask=document_mask(), scale=0.25)


@pytest.mark.parametrize("group", [2, 4])
def test_gqa(group):
    q, k, v, do = _inputs(1, 4, 4 // group, 33, 33, 16, torch.float32)
    slopes = torch.linspace(0.1, 0.5, 4)
    check_case(q, k, v, do, [slopes], [True], score=alibi_score(), mask=causal_mask(), scale=0.25,
               gqa_group=group)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    q, k, v, do = _inputs(1, 2, 1, 33, 40, 16, dtype)
    table = torch.randn(2, 33 + 40 - 1, generator=torch.Generator().manual_seed(3))
    check_case(q, k, v, do, [table], [True], score=relbias_score(40), mask=causal_mask(offset=7), scale=0.25,
               gqa_group=2)


def test_low_precision_alibi_slope_gradient():
    """A gradient summed over the whole score square (Note [exact delta] in attn_bwd.py)."""
    q, k, v, do = _inputs(1, 2, 2, 40, 40, 16, torch.bfloat16)
    check_case(q, k, v, do, [torch.tensor([0.3, 0.6])], [True], score=alibi_score(), mask=sliding_mask(9),
               scale=0.25)


def test_production_block_sparsity():
    """Tables from the masks package's analysis, as the runtime passes them."""
    from attn_inductor.masks.block_sparsity import get_block_sparsity

    q, k, v, do = _inputs(2, 2, 2, 40, 40, 16, torch.float32)
    doc = torch.tensor([[0] * 10 + [1] * 20 + [2] * 10, [0] * 25 + [1] * 15])
    bm, bn = launch.preferred_blocks(q, k, v)
    sp = get_block_sparsity(document_mask(), batch=2, heads=2, q_len=40, kv_len=40, captured=[doc], block_m=bm,
                            block_n=bn, device=q.device)
    check_case(q, k, v, do, [doc], [False], score=E.score, mask=document_mask(), scale=0.25, sparsity=sp)


@pytest.mark.parametrize("d", [96, 112, 192])
def test_padded_head_dims(d):
    q, k, v, do = _inputs(1, 1, 1, 17, 20, d, torch.float32)
    check_case(q, k, v, do, [], [], score=E.score, mask=causal_mask(offset=3), scale=d ** -0.5)


def test_value_head_dim_differs():
    q, k, v, do = _inputs(1, 2, 2, 20, 24, 16, torch.float32, dv=48)
    check_case(q, k, v, do, [], [], score=E.score, mask=causal_mask(offset=4), scale=0.25)


def test_strided_inputs():
    """[B, L, H, D] storage seen as [B, H, L, D]; nothing is copied."""
    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(1, 33, 2, 16, generator=g).transpose(1, 2) for _ in range(4))
    assert not q.is_contiguous()
    check_case(q, k, v, do, [], [], score=E.score, mask=causal_mask(), scale=0.25)


def test_fully_masked_rows():
    """Rows with no live entry: out 0, lse -inf, no gradient contribution."""
    q, k, v, do = _inputs(1, 2, 2, 33, 33, 16, torch.float32)
    # rows q_idx in [8, 20) see nothing
    dead = E.call("and", E.call("ge", E.q_idx, _c(8), dtype=BOOL), E.call("lt", E.q_idx, _c(20), dtype=BOOL),
                  dtype=BOOL)
    mask = E.and_(causal_mask(), E.call("not", dead, dtype=BOOL))
    out, lse, (dq, *_rest) = check_case(q, k, v, do, [], [], score=E.score, mask=mask, scale=0.25)
    assert torch.equal(out[:, :, 8:20], torch.zeros_like(out[:, :, 8:20]))
    assert bool((lse[:, :, 8:20] == -math.inf).all())
    assert torch.equal(dq[:, :, 8:20], torch.zeros_like(dq[:, :, 8:20]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absorbed_rows(dtype):
    """Every score near finfo.min: a uniform softmax, forward and backward (Note [absorbed rows])."""
    q, k, v, do = _inputs(1, 2, 2, 33, 33, 16, dtype)
    score = E.call("add", E.score, E.const(torch.finfo(torch.float32).min, F32), dtype=F32)
    check_case(q, k, v, do, [], [], score=score, mask=causal_mask(), scale=0.25)


def test_row_select():
    q, k, v, do = _inputs(2, 2, 2, 40, 40, 16, torch.float32)
    sel = torch.zeros(2, 2, 40, dtype=torch.bool)
    sel[0, 0, 3:9] = True  # q tile 0 partly selected
    sel[1, 1, 33:] = True  # last tile partly selected; tiles 1 of every row and all of (0, 1) unselected
    out, lse, _ = check_case(q, k, v, do, [], [], score=E.score, mask=causal_mask(), scale=0.25, row_select=sel)
    assert torch.equal(out[~sel], torch.zeros_like(out[~sel]))
    assert bool((lse[~sel] == -math.inf).all())


def test_deterministic_backward_repeats_bitwise():
    q, k, v, do = _inputs(1, 2, 2, 33, 33, 16, torch.float32)
    table = torch.randn(2, 65, generator=torch.Generator().manual_seed(3))
    slopes = torch.tensor([0.25, 0.5])
    score = E.call("add", relbias_score(33, 0), E.call("sub", alibi_score(1), E.score, dtype=F32), dtype=F32)
    _, _, first = check_case(q, k, v, do, [table, slopes], [True, True], score=score, mask=causal_mask(),
                             scale=0.25, deterministic=True)
    sp = sparsity_for(causal_mask(), q, k, [])
    out, lse = launch.core_forward(q, k, v, [table, slopes], score=score, mask=causal_mask(), scale=0.25,
                                   gqa_group=1, sparsity=sp)
    for _ in range(2):
        again = launch.core_backward(q, k, v, out, lse, do, [table, slopes], [True, True], score=score,
                                     mask=causal_mask(), scale=0.25, gqa_group=1, sparsity=sp, deterministic=True)
        for a, b in zip(list(first[:3]) + list(first[3]), list(again[:3]) + list(again[3])):
            assert torch.equal(a, b)


def test_nan_in_query_row_propagates():
    q, k, v, _ = _inputs(1, 2, 2, 33, 33, 16, torch.float32)
    q[0, 1, 5, 3] = math.nan
    sp = sparsity_for(causal_mask(), q, k, [])
    out, lse = launch.core_forward(q, k, v, [], score=E.score, mask=causal_mask(), scale=0.25, gqa_group=1,
                                   sparsity=sp)
    assert bool(out[0, 1, 5].isnan().all()) and bool(lse[0, 1, 5].isnan())
    nan_rows = out.isnan().any(-1)
    assert int(nan_rows.sum()) == 1


def test_printer_aten_semantics():
    """Ops whose Triton spelling differs from aten (floor division, remainder, casts, rounding)."""
    q, k, v, do = _inputs(1, 2, 2, 33, 33, 16, torch.float32)
    diff = E.call("sub", E.q_idx, E.kv_idx, dtype=I64)
    fd = E.call("floordiv", diff, _c(-3), dtype=I64)
    rem = E.call("remainder", diff, _c(5), dtype=I64)
    wrapped = E.call("to", E.call("mul", E.call("add", diff, _c(100), dtype=I64), _c(3), dtype=I64), dtype="int8")
    s = E.score
    s = E.call("add", s, E.call("mul", E.call("to", fd, dtype=F32), E.const(0.1, F32), dtype=F32), dtype=F32)
    s = E.call("add", s, E.call("mul", E.call("to", wrapped, dtype=F32), E.const(0.01, F32), dtype=F32), dtype=F32)
    rounded = E.call("to", E.call("mul", s, E.const(3.0, F32), dtype=F32), dtype="bfloat16")
    s = E.call("add", s, E.call("to", E.call("round", E.call("to", rounded, dtype=F32), dtype=F32), dtype=F32),
               dtype=F32)
    trunc = E.call("trunc_to", E.call("mul", s, E.const(0.5, F32), dtype=F32), dtype=I64)
    s = E.call("sub", s, E.call("to", E.call("remainder", trunc, _c(2), dtype=I64), dtype=F32), dtype=F32)
    s = E.call("maximum", s, E.call("log1p", E.call("abs", s, dtype=F32), dtype=F32), dtype=F32)
    mask = E.call("ne", rem, _c(3), dtype=BOOL)
    check_case(q, k, v, do, [], [], score=s, mask=mask, scale=0.5, backward=False)


def test_printer_float_ops():
    """Every float op of the IR through the kernel; smooth ones also through the backward."""
    q, k, v, do = _inputs(1, 2, 2, 33, 33, 16, torch.float32)

    def f(op, *args):
        return E.call(op, *args, dtype=F32)

    x = f("mul", E.score, E.const(0.3, F32))
    pos = f("add", f("abs", x), E.const(1.0, F32))
    smooth = [f("sigmoid", x), f("erf", x), f("exp", x), f("exp2", x), f("log", pos), f("log2", pos),
              f("log1p", f("abs", x)), f("expm1", x), f("sqrt", pos), f("rsqrt", pos), f("sin", x), f("cos", x),
              f("tanh", x), f("reciprocal", pos), f("neg", x), f("pow", pos, E.const(1.5, F32)),
              f("minimum", x, E.const(0.2, F32)), f("maximum", x, E.const(-0.2, F32)),
              f("truediv", x, pos)]
    score = E.score
    for term in smooth:
        score = f("add", score, f("mul", term, E.const(0.05, F32)))
    check_case(q, k, v, do, [], [], score=score, mask=causal_mask(), scale=0.5)

    # piecewise-constant ops on exact (index-derived) values, ties included: forward only
    rel = E.call("to", E.call("sub", E.q_idx, E.kv_idx, dtype=I64), dtype=F32)
    half = f("mul", rel, E.const(0.5, F32))
    steps = [f("round", half), f("floor", half), f("ceil", half), f("trunc", half), f("sign", half),
             f("floordiv", rel, E.const(-2.5, F32)), f("remainder", rel, E.const(2.5, F32)),
             f("abs", half)]
    score = E.score
    for term in steps:
        score = f("add", score, f("mul", term, E.const(0.05, F32)))
    check_case(q, k, v, do, [], [], score=score, mask=None, scale=0.5, backward=False)


def test_head_dim_too_large_is_refused():
    q, k, v, _ = _inputs(1, 1, 1, 4, 4, 320, torch.float32)
    with pytest.raises(ValueError, match="head dim 320 is larger than 256"):
        launch.core_forward(q, k, v, [], score=E.score, mask=None, scale=1.0, gqa_group=1, sparsity=None)


def test_hooks_cached_and_dumped(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTN_INDUCTOR_DUMP_DIR", str(tmp_path))
    score = softcap_score(7.0)
    metas = hooks.captured_meta_of([])
    first = hooks.render_hooks(score, causal_mask(), metas, bounds=hooks.IndexBounds(1, 2, 64, 64))
    again = hooks.render_hooks(score, causal_mask(), metas, bounds=hooks.IndexBounds(1, 2, 64, 64))
    assert first is again
    dumped = list(tmp_path.glob("attn_inductor_hooks_*.py"))
    assert len(dumped) == 1 and dumped[0].read_text() == first.source
    assert "lib.tanh" in first.source and "def mask_mod" in first.source


@pytest.mark.parametrize("seed", range(10))
def test_random_combinations(seed, monkeypatch):
    """Shapes, dtypes, masks, score mods, GQA and table blocks (or closed-form bounds) drawn together."""
    import random

    rnd = random.Random(seed)
    if rnd.random() < 0.5:
        monkeypatch.setenv("ATTN_INDUCTOR_SPARSITY", "tables")
    group = rnd.choice([1, 2, 4])
    hq = group * rnd.choice([1, 2])
    lq, lk = rnd.choice([1, 5, 17, 33, 48]), rnd.choice([3, 16, 31, 50])
    d = rnd.choice([16, 24, 80])
    dtype = rnd.choice([torch.float32, torch.bfloat16, torch.float16])
    q, k, v, do = _inputs(rnd.choice([1, 2]), hq, hq // group, lq, lk, d, dtype, dv=rnd.choice([None, 32]), seed=seed)
    masks = {"none": None, "causal": causal_mask(offset=lk - lq), "window": sliding_mask(7)}
    mask = masks[rnd.choice(list(masks))]
    kind = rnd.choice(["plain", "alibi", "relbias", "softcap"])
    captured, needs, score = [], [], E.score
    if kind == "alibi":
        captured, needs, score = [torch.linspace(0.1, 0.4, hq)], [True], alibi_score()
    elif kind == "relbias":
        captured, needs, score = [torch.randn(hq, lq + lk - 1)], [True], relbias_score(lk)
    elif kind == "softcap":
        score = softcap_score(3.0)
    block = rnd.choice([16, 32])
    sp = None if rnd.random() < 0.2 else (
        dense(block_m=block, block_n=block, q_len=lq, kv_len=lk, kind=FULL) if mask is None else
        causal_block_map(mask, batch=1, heads=1, q_len=lq, kv_len=lk, block_m=block, block_n=block))
    check_case(q, k, v, do, captured, needs, score=score, mask=mask, scale=d ** -0.5, gqa_group=group, sparsity=sp,
               deterministic=rnd.random() < 0.3)


def test_runtime_composition_with_finfo_min_rows():
    """runtime.py composes the Triton core into eager's finfo.min semantics, backward included.

    Rows whose every key is padded fall back to a uniform softmax over their
    causal keys (every score absorbed into finfo.min); Note [absorbed rows].
    """
    from attn_inductor import cpu, runtime
    from attn_inductor.lowering.spec import AttentionSpec

    fmin = torch.finfo(torch.float32).min
    pad = E.Load(0, (E.b, E.kv_idx), BOOL)
    full = E.call("add", alibi_score(1),
                  E.call("where", pad, E.const(0.0, F32), E.const(fmin, F32), dtype=F32), dtype=F32)
    spec = AttentionSpec(score_live=alibi_score(1), mask=causal_mask(), soft_mask=pad, score_full=full,
                         scale=0.3, num_captured=2)
    q, k, v, do = _inputs(2, 2, 2, 19, 19, 16, torch.float32)
    padding = torch.ones(2, 19, dtype=torch.bool)
    padding[0, :4] = False  # rows 0..3 of batch 0 see only padded keys
    padding[1] = False  # every row of batch 1 falls back to the hard (causal) mask
    slopes = torch.tensor([0.2, 0.5])
    out, lse, lse_fb = runtime.attention_forward(spec, q, k, v, [padding, slopes], launch)
    torch.testing.assert_close(out, runtime.attention_forward(spec, q, k, v, [padding, slopes], cpu)[0],
                               rtol=2e-5, atol=2e-5)
    grads = runtime.attention_backward(spec, q, k, v, out, lse, lse_fb, do, [padding, slopes], [False, True],
                                       launch)

    # eager: the naive additive-mask graph in fp32, differentiated by autograd
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, slopes)]
    idx = _indices(2, 2, 19, 19)
    s = leaves[0] @ leaves[1].transpose(-1, -2) * 0.3
    s = s + leaves[3].view(1, 2, 1, 1) * (idx["kv_idx"] - idx["q_idx"]).float()
    s = s + torch.where(padding[:, None, None, :], 0.0, fmin)
    s = s.masked_fill(idx["kv_idx"] > idx["q_idx"], -math.inf)
    eager = torch.softmax(s, -1) @ leaves[2]
    eager.backward(do)
    torch.testing.assert_close(out, eager.detach(), rtol=2e-5, atol=2e-5)
    for name, got, want in zip(["dq", "dk", "dv", "dslopes"], [*grads[:3], grads[3][1]],
                               [t.grad for t in leaves]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


# ----------------------------------------------------------------------------- launch plumbing


class _FakeParam:
    def __init__(self, name, is_constexpr):
        self.name, self.is_constexpr = name, is_constexpr


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: ``compiled[grid](*args)`` with a launcher taking ``n_args``."""

    def __init__(self, log, n_args):
        self.log, self.n_args = log, n_args

    def __getitem__(self, grid):
        def runner(*args):
            if len(args) != self.n_args:  # what the C launcher's argument parsing does
                raise TypeError(f"takes {self.n_args} arguments, {len(args)} given")
            self.log.append(("direct", grid, args))
        return runner


class _FakeKernel:
    def __init__(self, log, launcher_args):
        self.log = log
        self.params = [_FakeParam("X", False), _FakeParam("n", False), _FakeParam("BLOCK", True)]
        self.compiled = _FakeCompiled(log, launcher_args)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return self.compiled
        return run


@pytest.mark.parametrize("launcher_args,form", [(3, "all"), (2, "runtime"), (5, "off")])
def test_static_launch_forms(launcher_args, form, monkeypatch):
    """Note [static launches]: JIT first, then the kept kernel directly, in the form its launcher takes."""
    monkeypatch.setattr(launch, "_static_form", {"form": None})
    kept = {}
    monkeypatch.setenv("ATTN_INDUCTOR_STATIC_LAUNCH", "1")
    log = []
    kernel = _FakeKernel(log, launcher_args)
    x = torch.zeros(4)
    for _ in range(3):
        launch._run_kernel(kernel, (2, 1, 1), (x, 7), dict(BLOCK=16, num_warps=4), site=(kept, 1))
    assert launch._static_form["form"] == form
    kinds = [entry[0] for entry in log]
    if form == "off":  # neither form fits: every launch goes through the JIT, none is lost or doubled
        assert kinds == ["jit", "jit", "jit"]
    else:
        assert kinds == ["jit", "direct", "direct"]
        expected = (x, 7, 16) if form == "all" else (x, 7)
        assert all(entry[2] == expected for entry in log[1:])
    # a different tensor alignment is a different specialisation: back through the JIT once
    launch._static_form["form"] = None if form == "off" else form
    log.clear()
    launch._run_kernel(kernel, (2, 1, 1), (x[1:], 7), dict(BLOCK=16, num_warps=4), site=(kept, 1))
    assert log[0][0] == "jit"
    # no site (CPU tensors, interpreter, or turned off): always the JIT
    log.clear()
    launch._run_kernel(kernel, (2, 1, 1), (x, 7), dict(BLOCK=16, num_warps=4), site=None)
    assert [entry[0] for entry in log] == ["jit"]
    # turning them off is read into the plan key: a plan made with them on is not reused
    on = launch._policy_key(torch.bfloat16)
    monkeypatch.setenv("ATTN_INDUCTOR_STATIC_LAUNCH", "0")
    assert not launch._static_launches_on()
    assert launch._policy_key(torch.bfloat16) != on


def _fresh_call_sites(monkeypatch):
    """Tests that count plans made by the op need calls that plan: no call site kept from another test
    with the same metadata (Note [call sites] in runtime.py)."""
    from attn_inductor import ops

    monkeypatch.setattr(ops, "_forward_sites", {})
    monkeypatch.setattr(ops, "_backward_sites", {})


def test_launch_plans_follow_the_call_site(monkeypatch):
    """Note [launch plans]: a plan is reused only for the very same expressions, sparsity and layout, and
    an environment override of the tiles is a new plan."""
    from collections import OrderedDict

    monkeypatch.setattr(launch, "_plans", OrderedDict())  # counted below; the module's is shared and bounded
    q, k, v, _ = _inputs(1, 2, 2, 40, 40, 16, torch.float32)
    common = dict(scale=0.25, gqa_group=1, sparsity=None)
    start = len(launch._plans)
    causal_out, _ = launch.core_forward(q, k, v, [], score=E.score, mask=causal_mask(), **common)
    again, _ = launch.core_forward(q, k, v, [], score=E.score, mask=causal_mask(), **common)  # equal, not same
    full_out, _ = launch.core_forward(q, k, v, [], score=E.score, mask=None, **common)
    assert torch.equal(causal_out, again)
    assert not torch.allclose(causal_out, full_out)
    for out, mask in ((causal_out, causal_mask()), (full_out, None)):
        ref, _ = reference(q, k, v, [], score=E.score, mask=mask, scale=0.25)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert len(launch._plans) - start == 3
    mask = causal_mask()
    launch.core_forward(q, k, v, [], score=E.score, mask=mask, **common)
    launch.core_forward(q, k, v, [], score=E.score, mask=mask, **common)
    assert len(launch._plans) - start == 4  # the same objects: one plan
    monkeypatch.setenv("ATTN_INDUCTOR_FWD_CONFIG", "32,16,1,1")
    tiled, _ = launch.core_forward(q, k, v, [], score=E.score, mask=mask, **common)
    assert len(launch._plans) - start == 5
    torch.testing.assert_close(tiled, causal_out)


def test_soft_mask_op_reuses_its_plans(monkeypatch):
    """A spec with a soft mask derives expressions (the live conjunction, the fallback's shifted score);
    they are built once per spec, so a repeated call of the op, forward and backward, makes no new launch
    plan (a fresh expression per call missed every plan and evicted everyone else's)."""
    from collections import OrderedDict

    from attn_inductor.lowering.spec import AttentionSpec
    from attn_inductor.ops import default_config

    monkeypatch.setattr(launch, "_plans", OrderedDict())
    _fresh_call_sites(monkeypatch)
    q, k, v, do = _inputs(1, 2, 2, 40, 40, 16, torch.float32)
    keep = torch.ones(1, 40, dtype=torch.bool)
    keep[0, 25:] = False  # keys 25.. soft-masked: every row keeps a live entry (key 0)
    spec = AttentionSpec(score_live=E.score, mask=causal_mask(), soft_mask=E.Load(0, (E.b, E.kv_idx), BOOL),
                         scale=0.25, num_captured=1)
    args = (q, k, v, [keep], spec.to_json(), default_config(impl="triton"))
    assert spec.live_mask is spec.live_mask
    for _ in range(2):
        out, lse, lse_fb = torch.ops.attn_inductor.attention.default(*args)
        torch.ops.attn_inductor.attention_backward.default(q, k, v, out, lse, lse_fb, do, [keep], [False],
                                                           *args[4:])
        if _ == 0:
            made = len(launch._plans)
    assert made > 0 and len(launch._plans) == made


def test_changing_padding_masks_keep_their_plans(monkeypatch):
    """A padding mask that is a new tensor every call (Note [changing mask tensors]) is classified exactly
    every call, into new tables of the same layout: the launch plans made by the first call are reused
    (Note [launch plans]), and results equal the CPU implementation's for every mask."""
    from collections import OrderedDict

    from attn_inductor.lowering.spec import AttentionSpec
    from attn_inductor.masks.block_sparsity import clear_block_sparsity_cache
    from attn_inductor.ops import default_config

    clear_block_sparsity_cache()
    monkeypatch.setattr(launch, "_plans", OrderedDict())
    _fresh_call_sites(monkeypatch)
    q, k, v, do = _inputs(2, 2, 2, 40, 40, 16, torch.float32)
    mask = causal_key_padding_mask()
    spec = AttentionSpec(score_live=E.score, mask=mask, scale=0.25, num_captured=1).to_json()
    counts = []
    for right_pad in (0, 9, 17, 30):
        keep = torch.ones(2, 40, dtype=torch.int64)
        keep[1, 40 - right_pad:] = 0
        got = torch.ops.attn_inductor.attention.default(q, k, v, [keep], spec, default_config(impl="triton"))
        grads = torch.ops.attn_inductor.attention_backward.default(q, k, v, *got, do, [keep], [False], spec,
                                                                   default_config(impl="triton"))
        want = torch.ops.attn_inductor.attention.default(q, k, v, [keep], spec, default_config(impl="cpu"))
        want_grads = torch.ops.attn_inductor.attention_backward.default(q, k, v, *want, do, [keep], [False], spec,
                                                                        default_config(impl="cpu"))
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        for a, b in zip(grads[:3], want_grads[:3]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        counts.append(len(launch._plans))
    assert counts[0] > 0 and counts == [counts[0]] * 4, counts


def test_call_sites_compute_what_the_slow_path_does(monkeypatch):
    """Note [call sites] in runtime.py: after a first call, calls with tensors of the same metadata skip
    the runtime's planning and launch the site's plan; every call still equals the CPU implementation
    (new values, a changed document-id tensor, learned ALiBi slopes' gradients, GQA).  New strides or a
    changed ``ATTN_INDUCTOR_SPARSITY`` make a new site; a soft mask never gets one."""
    from attn_inductor import runtime
    from attn_inductor.lowering.spec import AttentionSpec
    from attn_inductor.ops import default_config

    slow = []

    def counted(name):
        inner = getattr(runtime, name)

        def call(*args, **kwargs):
            slow.append(name)
            return inner(*args, **kwargs)
        return call

    for name in ("attention_forward", "attention_backward"):
        monkeypatch.setattr(runtime, name, counted(name))
    _fresh_call_sites(monkeypatch)
    cases = {  # name: (spec, captured per call, needs grad, kv heads, fast path expected)
        "causal": (AttentionSpec(score_live=E.score, mask=causal_mask(), scale=0.25), lambda i: [], [], 2, True),
        "document": (AttentionSpec(score_live=E.score, mask=document_mask_as_masked_fill(), scale=0.25,
                                   num_captured=1),
            lambda i: [(torch.arange(40) + 7 * i) // 13], [False], 2, True),
        "alibi gqa": (AttentionSpec(score_live=alibi_score(), mask=causal_mask(), scale=0.25, gqa_group=2,
                                    num_captured=1),
                      lambda i: [torch.linspace(0.1, 0.5, 4) * (i + 1)], [True], 2, True),
        "soft padding": (AttentionSpec(score_live=E.score, mask=causal_mask(),
                                       soft_mask=E.Load(0, (E.b, E.kv_idx), BOOL), scale=0.25, num_captured=1),
                         lambda i: [torch.arange(40).expand(2, 40) < 30 + i], [False], 2, False),
    }
    for name, (spec, captured_for, needs, hkv, fast) in cases.items():
        hq = hkv * spec.gqa_group
        sj = spec.to_json()
        for i in range(3):
            q, k, v, do = _inputs(2, hq, hkv, 40, 40, 16, torch.float32, seed=i)
            captured = captured_for(i)
            slow.clear()
            got = torch.ops.attn_inductor.attention.default(q, k, v, captured, sj, default_config(impl="triton"))
            grads = torch.ops.attn_inductor.attention_backward.default(q, k, v, *got, do, captured, needs, sj,
                                                                       default_config(impl="triton"))
            took_slow = list(slow)
            want = torch.ops.attn_inductor.attention.default(q, k, v, captured, sj, default_config(impl="cpu"))
            want_grads = torch.ops.attn_inductor.attention_backward.default(q, k, v, *want, do, captured, needs,
                                                                            sj, default_config(impl="cpu"))
            torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5, msg=name)
            for a, b in zip([*grads[:3], *grads[3]], [*want_grads[:3], *want_grads[3]]):
                if a.numel() or b.numel():
                    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
            expected = [] if (fast and i > 0) else ["attention_forward", "attention_backward"]
            assert took_slow == expected, (name, i, took_slow)

    # new strides: a new site (its first call plans); a changed tables policy likewise
    spec, *_ = cases["causal"]
    sj, cfg = spec.to_json(), default_config(impl="triton")
    q, k, v, _ = _inputs(2, 2, 2, 40, 40, 16, torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    for variant in range(2):
        slow.clear()
        if variant == 1:
            monkeypatch.setenv("ATTN_INDUCTOR_SPARSITY", "tables")
        out = torch.ops.attn_inductor.attention.default(qt if variant == 0 else q, k, v, [], sj, cfg)[0]
        assert slow == ["attention_forward"], variant
        want = torch.ops.attn_inductor.attention.default(q, k, v, [], sj, default_config(impl="cpu"))[0]
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_changing_padding_masks_read_nothing_on_the_host(monkeypatch):
    """The CPU stand-in for the GPU suite's sync-debug test (Note [changing mask tensors]): after a first
    call, forward and backward with new padding masks read no tensor value on the host and build no tensor
    from host data (``torch.tensor``, which on CUDA is a host-to-device copy that waits for the stream).
    The launch is stubbed: the interpreter itself reads values on the host."""
    from attn_inductor.lowering.spec import AttentionSpec
    from attn_inductor.ops import default_config

    monkeypatch.setattr(launch, "_run_kernel", lambda *args, **kwargs: None)
    q, k, v, do = _inputs(2, 2, 2, 64, 64, 16, torch.float32)
    mask = causal_key_padding_mask()
    spec = AttentionSpec(score_live=E.score, mask=mask, scale=0.25, num_captured=1).to_json()
    cfg = default_config(impl="triton")

    def step(right_pad):
        keep = torch.ones(2, 64, dtype=torch.int64)
        keep[1, 64 - right_pad:] = 0
        out = torch.ops.attn_inductor.attention.default(q, k, v, [keep], spec, cfg)
        torch.ops.attn_inductor.attention_backward.default(q, k, v, *out, do, [keep], [False], spec, cfg)

    step(0)
    reads = []

    def refuse(name):
        def read(*args, **kwargs):
            reads.append(name)
            raise AssertionError(f"{name} on the per-call path")
        return read

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
    monkeypatch.setattr(torch, "tensor", refuse("torch.tensor"))
    for right_pad in (5, 17, 40):
        step(right_pad)
    monkeypatch.undo()
    assert not reads


def test_dead_rows_nan_in_the_backward():
    """empty_rows="nan" (Note [dead rows in the backward]): dq NaN on rows with no entry, dk/dv NaN on the
    whole (batch, kv head) such a row reaches, everything else as with "zero" and as the CPU core gives."""
    from attn_inductor import cpu

    q, k, v, do = _inputs(2, 4, 2, 40, 40, 16, torch.float32)
    # a query-padding mask held as a tensor: batch 0 rows 30.. of query head 1 (kv head 0) see nothing
    live = torch.ones(2, 4, 40, dtype=torch.bool)
    live[0, 1, 30:] = False
    mask = E.and_(causal_mask(), E.Load(0, (E.b, E.h, E.q_idx), BOOL))
    kw = dict(score=E.score, mask=mask, scale=0.25, gqa_group=2, sparsity=None)
    out, lse = launch.core_forward(q, k, v, [live], **kw)
    zero = launch.core_backward(q, k, v, out, lse, do, [live], [False], **kw)
    nan = launch.core_backward(q, k, v, out, lse, do, [live], [False], empty_rows="nan", **kw)
    on_cpu = cpu.core_backward(q, k, v, out, lse, do, [live], [False], empty_rows="nan", **kw)
    dead = ~live
    assert bool(torch.isnan(nan[0][dead]).all()) and not bool(torch.isnan(nan[0][live]).any())
    torch.testing.assert_close(nan[0][live], zero[0][live])
    for i in (1, 2):  # dk, dv: NaN exactly on (batch 0, kv head 0)
        assert bool(torch.isnan(nan[i][0, 0]).all())
        assert not bool(torch.isnan(nan[i][0, 1]).any()) and not bool(torch.isnan(nan[i][1]).any())
        torch.testing.assert_close(nan[i][0, 1], zero[i][0, 1])
        torch.testing.assert_close(nan[i][1], zero[i][1])
    for ours, theirs in zip(nan[:3], on_cpu[:3]):
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
        torch.testing.assert_close(ours.nan_to_num(), theirs.nan_to_num(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- closed-form bounds

_I64 = E.INT64


def _bounded_masks():
    c = lambda v: E.const(v, _I64)  # noqa: E731
    return {
        "causal, Lk > Lq": causal_mask(offset=16),
        "sliding window": sliding_mask(7),
        "prefix-LM": E.call("or", E.call("lt", E.kv_idx, c(6), dtype=BOOL), E.call("le", E.kv_idx, E.q_idx, dtype=BOOL),
                            dtype=BOOL),
        "chunked": E.call("eq", E.call("floordiv", E.q_idx, c(8), dtype=_I64),
                          E.call("floordiv", E.kv_idx, c(8), dtype=_I64), dtype=BOOL),
        "anti-causal": E.call("ge", E.kv_idx, E.q_idx, dtype=BOOL),
        "kv == 2 q (gaps)": E.call("eq", E.kv_idx, E.call("mul", E.q_idx, c(2), dtype=_I64), dtype=BOOL),
    }


@pytest.mark.parametrize("name", list(_bounded_masks()))
def test_closed_form_bounds_in_the_kernels(name):
    """Masks with closed-form kv bounds run without tables (KV_BOUNDS), forward and backward, GQA, odd lengths."""
    mask = _bounded_masks()[name]
    q, k, v, do = _inputs(1, 4, 2, 37, 53, 16, torch.float32)
    start = len(launch._plans)
    check_case(q, k, v, do, [], [], score=E.score, mask=mask, scale=0.25, gqa_group=2, sparsity="none")
    new = list(launch._plans.values())[start - len(launch._plans):] if len(launch._plans) > start else []
    metas = [next(x for x in plan if isinstance(x, dict) and "KV_BOUNDS" in x) for _, plan in new]
    assert len(metas) == 2 and all(m["KV_BOUNDS"] for m in metas), "forward and backward walk the bounds"


@pytest.mark.parametrize("lq,lk", [(1, 53), (37, 2), (16, 16), (1, 1)])
@pytest.mark.parametrize("name", ["causal, Lk > Lq", "chunked", "anti-causal"])
def test_closed_form_bounds_at_edge_lengths(name, lq, lk):
    """One query (decoding), two keys, exactly one tile, one of each: rows that see nothing give 0 out and
    no gradient.  (Many queries over a single key are left out: every softmax is exactly 1, eager's dk is
    exactly 0, and the flash backward's DELTA = rowsum(dO * O) leaves ~1e-6, over the rule's floor.)"""
    q, k, v, do = _inputs(1, 2, 1, lq, lk, 16, torch.float32)
    check_case(q, k, v, do, [], [], score=E.score, mask=_bounded_masks()[name], scale=0.25, gqa_group=2,
               sparsity="none")


def test_closed_form_bounds_with_a_score_mod_and_tables_forced(monkeypatch):
    """ALiBi over a causal mask on the bounds; the same with ATTN_INDUCTOR_SPARSITY=tables reads the tables."""
    q, k, v, do = _inputs(1, 4, 4, 33, 40, 16, torch.float32)
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / 4) for i in range(4)])
    mask = causal_mask(offset=7)
    check_case(q, k, v, do, [slopes], [True], score=alibi_score(), mask=mask, scale=0.25)
    monkeypatch.setenv("ATTN_INDUCTOR_SPARSITY", "tables")
    start = len(launch._plans)
    check_case(q, k, v, do, [slopes], [True], score=alibi_score(), mask=mask, scale=0.25)
    metas = [next(x for x in plan if isinstance(x, dict) and "KV_BOUNDS" in x)
             for _, plan in list(launch._plans.values())[start - len(launch._plans):]]
    assert metas and not any(m["KV_BOUNDS"] for m in metas) and all(m["IS_SPARSE"] for m in metas)


@pytest.mark.parametrize("name", ["causal, Lk > Lq", "sliding window", "prefix-LM", "chunked", "kv == 2 q (gaps)"])
def test_kernel_walks_equal_the_python_walks(name):
    """bounded_kv_walk / bounded_q_walk (Triton) compute what masks/bounds.py's forward_walk / backward_walk do."""
    import triton
    import triton.language as tl

    from attn_inductor.masks import bounds as kvb
    from attn_inductor.templates import attn_fwd

    @triton.jit
    def walks(OUT, KV_LO: tl.constexpr, KV_HI: tl.constexpr, Q_LEN, KV_LEN, BM: tl.constexpr, BN: tl.constexpr,
              BACKWARD: tl.constexpr, Q_WALK: tl.constexpr, KV_WALK: tl.constexpr):
        i = tl.program_id(0)
        if BACKWARD:
            a, b, c, d = Q_WALK(KV_LO, KV_HI, i * BN, tl.minimum(i * BN + BN, KV_LEN) - 1, Q_LEN, BM)
        else:
            a, b, c, d = KV_WALK(KV_LO, KV_HI, i * BM, tl.minimum(i * BM + BM, Q_LEN) - 1, KV_LEN, BN)
        tl.store(OUT + i * 4 + 0, a)
        tl.store(OUT + i * 4 + 1, b)
        tl.store(OUT + i * 4 + 2, c)
        tl.store(OUT + i * 4 + 3, d)

    mask = _bounded_masks()[name]
    rendered = hooks.render_hooks(E.score, mask, ())
    iv = kvb.kv_interval(mask)
    for q_len, kv_len, bm, bn in ((37, 53, 16, 16), (100, 64, 32, 16), (5, 90, 16, 32)):
        for backward in (False, True):
            n = -(-kv_len // bn) if backward else -(-q_len // bm)
            out = torch.zeros(n * 4, dtype=torch.int32)
            walks[(n,)](out, rendered.kv_lo, rendered.kv_hi, q_len, kv_len, bm, bn, backward,
                        attn_fwd.bounded_q_walk, attn_fwd.bounded_kv_walk)
            for i in range(n):
                want = (kvb.backward_walk(iv, i * bn, min(i * bn + bn, kv_len) - 1, q_len, bm) if backward else
                        kvb.forward_walk(iv, i * bm, min(i * bm + bm, q_len) - 1, kv_len, bn))
                assert tuple(out[4 * i:4 * i + 4].tolist()) == want, (name, q_len, kv_len, backward, i)


def test_explain_names_the_walk(monkeypatch):
    """explain() says whether the kernels walk closed-form bounds or tables, and which implementation runs."""
    import attn_inductor

    class Causal(torch.nn.Module):
        def forward(self, q, k, v):
            n = q.shape[-2]
            s = (q @ k.mT).masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
            return torch.softmax(s, -1) @ v

    q = torch.randn(1, 2, 40, 16)
    text = str(attn_inductor.explain(Causal(), q, q, q))
    assert "triton-interpreter" in text
    assert "walk:  closed-form kv bounds 0 <= kv_idx < q_idx + 1 (in the kernel, no tables)" in text
    monkeypatch.setenv("ATTN_INDUCTOR_SPARSITY", "tables")
    assert "walk:  block-sparsity tables" in str(attn_inductor.explain(Causal(), q, q, q))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softcap_16bit_derivative_held_in_fp16(dtype):
    """Note [backward register pressure]: softcap's derivative 1 - tanh^2 is proven bounded, so 16-bit
    backwards hold it as fp16; the gradients still meet the oracle rule."""
    rendered = hooks.render_hooks(softcap_score(2.0), causal_mask(), (), backward=True)
    assert rendered.score_grad_fits_f16 and rendered.has_score_grad
    alibi = hooks.render_hooks(alibi_score(), causal_mask(), hooks.captured_meta_of([torch.ones(2)], [True]),
                               backward=True)
    assert not alibi.score_grad_fits_f16  # derivative 1: nothing to hold
    q, k, v, do = _inputs(1, 2, 2, 40, 40, 32, dtype)
    check_case(q, k, v, do, [], [], score=softcap_score(2.0), mask=causal_mask(), scale=0.5)


def test_entry_gathers_pick_their_tiles(monkeypatch):
    """A relative-position table (one gather per query-key entry) is told apart from per-row or per-head
    gathers (document ids, ALiBi slopes); on Hopper at D=128 with 16-bit inputs it gets its own tiles."""
    from attn_inductor.templates import configs

    meta = hooks.captured_meta_of
    relbias = hooks.render_hooks(relbias_score(40), causal_mask(), meta([torch.ones(2, 79)]))
    alibi = hooks.render_hooks(alibi_score(), causal_mask(), meta([torch.ones(2)]))
    document = hooks.render_hooks(E.score, document_mask(), meta([torch.zeros(1, 40, dtype=torch.long)]))
    assert relbias.entry_gathers and not alibi.entry_gathers and not document.entry_gathers
    monkeypatch.setattr(configs, "_capability", lambda device: 9)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter's own tiles otherwise
    cuda = torch.device("cuda")
    assert configs.forward_config(128, torch.bfloat16, cuda, heavy=True, entry_gathers=True) == \
        configs._FWD_ENTRY_GATHERS
    assert configs.backward_config(128, torch.float16, cuda, heavy=True, entry_gathers=True) == \
        configs._BWD_ENTRY_GATHERS
    for d, dtype in ((64, torch.bfloat16), (128, torch.float32)):  # not measured there: the tables decide
        assert configs.forward_config(d, dtype, cuda, heavy=True, entry_gathers=True) != configs._FWD_ENTRY_GATHERS
    assert configs.forward_config(128, torch.bfloat16, cuda, heavy=True) != configs._FWD_ENTRY_GATHERS
