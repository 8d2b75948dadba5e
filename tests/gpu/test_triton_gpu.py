"""The Triton kernels on a CUDA GPU at real shapes (run on the H100/H200: ``pytest -m gpu tests/gpu``).

The same checks as ``tests/test_triton_kernels.py`` (fp64 oracle, numerics rule,
the same score/mask expressions), with S = 1024-4096, D = 64/128, bf16, block
sparsity from the production analysis (``masks.get_block_sparsity``) at the
launcher's preferred blocks; then the speed target: at least 90% of
FlexAttention's throughput for B=2, H=16, S=8192, D=128 bf16, forward and
forward + backward.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from attn_inductor.lowering import expr as E  # noqa: E402
from attn_inductor.runtime import block_sparsity_for  # noqa: E402
from attn_inductor.templates import launch  # noqa: E402
from tests.test_triton_kernels import (  # noqa: E402
    BOOL, _inputs, alibi_score, causal_key_padding_mask, causal_mask, check_case, document_mask,
    document_mask_as_masked_fill, relbias_score, sliding_mask, softcap_score)

CUDA = "cuda"


def production_sparsity(mask, q, k, captured):
    """What the runtime passes: no tables without a mask (``launch.reads_no_tables``), else the masks
    package's analysis (tables, which the kernels ignore when they walk closed-form bounds)."""
    if mask is None:
        return None
    bm, bn = launch.preferred_blocks(q, k, k)
    return block_sparsity_for(mask, q, k, captured, bm, bn)


def run(b, hq, hkv, lq, lk, d, *, score, mask, captured=(), needs=(), dtype=torch.bfloat16, dv=None, **kw):
    q, k, v, do = _inputs(b, hq, hkv, lq, lk, d, dtype, dv=dv, device=CUDA)
    captured = [t.to(CUDA) for t in captured]
    sp = production_sparsity(mask, q, k, captured)
    return check_case(q, k, v, do, captured, list(needs), score=score, mask=mask, scale=d ** -0.5,
                      gqa_group=hq // hkv, sparsity=sp, **kw)


@pytest.mark.parametrize("d", [64, 128])
def test_no_mask(d):
    run(1, 4, 4, 2048, 2048, d, score=E.score, mask=None)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("walk", ["bounds", "tables"])
def test_causal(d, walk, monkeypatch):
    if walk == "tables":
        monkeypatch.setenv("ATTN_INDUCTOR_SPARSITY", "tables")
    run(1, 2, 2, 4096, 4096, d, score=E.score, mask=causal_mask())


def test_sliding_window():
    run(1, 2, 2, 4096, 4096, 64, score=E.score, mask=sliding_mask(512))


def test_alibi_learned_slopes():
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / 4) for i in range(4)])
    run(1, 4, 4, 2048, 2048, 128, score=alibi_score(), mask=causal_mask(), captured=[slopes], needs=[True])


@pytest.mark.parametrize("deterministic", [False, True])
def test_relative_bias_table(deterministic):
    table = torch.randn(4, 2 * 1024 - 1)
    run(1, 4, 4, 1024, 1024, 64, score=relbias_score(1024), mask=None, captured=[table], needs=[True],
        deterministic=deterministic)


def test_softcap():
    run(1, 2, 2, 2048, 2048, 128, score=softcap_score(20.0), mask=causal_mask())


def test_document_ids():
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate([1000, 2000, 96, 1000])]).repeat(2, 1)
    run(2, 2, 2, 4096, 4096, 64, score=E.score, mask=document_mask(), captured=[doc], needs=[False])


@pytest.mark.parametrize("group", [2, 4])
def test_gqa(group):
    run(1, 8, 8 // group, 2048, 2048, 128, score=E.score, mask=causal_mask())


def test_odd_lengths_and_head_dim():
    run(1, 2, 1, 1000, 1537, 80, score=E.score, mask=causal_mask(offset=537))


def test_row_select():
    sel = torch.zeros(1, 2, 2048, dtype=torch.bool, device=CUDA)
    sel[:, :, 100:700] = True
    run(1, 2, 2, 2048, 2048, 128, score=E.score, mask=causal_mask(), row_select=sel)


@pytest.mark.parametrize("tf32", [False, True])
def test_fp32(tf32, monkeypatch):
    # eager (the bar of the numerics rule) runs its matmuls under the same setting
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    run(1, 2, 2, 1024, 1024, 64, score=E.score, mask=causal_mask(), dtype=torch.float32)


def test_deterministic_backward_repeats_bitwise():
    q, k, v, do = _inputs(1, 4, 4, 2048, 2048, 64, torch.bfloat16, device=CUDA)
    table = torch.randn(4, 4095, device=CUDA)
    slopes = torch.linspace(0.1, 0.5, 4, device=CUDA)
    score = E.call("add", relbias_score(2048, 0), E.call("sub", alibi_score(1), E.score, dtype="float32"),
                   dtype="float32")
    caps = [table, slopes]
    sp = production_sparsity(causal_mask(), q, k, caps)
    kw = dict(score=score, mask=causal_mask(), scale=0.125, gqa_group=1, sparsity=sp)
    out, lse = launch.core_forward(q, k, v, caps, **kw)
    first = launch.core_backward(q, k, v, out, lse, do, caps, [True, True], deterministic=True, **kw)
    for _ in range(3):
        again = launch.core_backward(q, k, v, out, lse, do, caps, [True, True], deterministic=True, **kw)
        for a, b in zip(list(first[:3]) + list(first[3]), list(again[:3]) + list(again[3])):
            assert torch.equal(a, b)


def test_nan_in_query_row_propagates():
    q, k, v, _ = _inputs(1, 2, 2, 2048, 2048, 128, torch.bfloat16, device=CUDA)
    q[0, 1, 700, 5] = math.nan
    out, lse = launch.core_forward(q, k, v, [], score=E.score, mask=causal_mask(), scale=0.1, gqa_group=1,
                                   sparsity=production_sparsity(causal_mask(), q, k, []))
    assert bool(out[0, 1, 700].isnan().all())
    assert int(out.isnan().any(-1).sum()) == 1


def test_dead_rows_nan_in_the_backward():
    """A padding mask held as a tensor leaves rows with no entry: their dq is NaN, and so are dk/dv of the
    (batch, kv head) they reach, as autograd through eager gives (Note [dead rows in the backward])."""
    q, k, v, do = _inputs(2, 4, 2, 1000, 1000, 128, torch.bfloat16, device=CUDA)
    live = torch.ones(2, 4, 1000, dtype=torch.bool, device=CUDA)
    live[0, 1, 900:] = False
    mask = E.and_(causal_mask(), E.Load(0, (E.b, E.h, E.q_idx), BOOL))
    kw = dict(score=E.score, mask=mask, scale=128 ** -0.5, gqa_group=2,
              sparsity=production_sparsity(mask, q, k, [live]))
    out, lse = launch.core_forward(q, k, v, [live], **kw)
    zero = launch.core_backward(q, k, v, out, lse, do, [live], [False], **kw)
    nan = launch.core_backward(q, k, v, out, lse, do, [live], [False], empty_rows="nan", **kw)
    dead = ~live
    assert bool(torch.isnan(nan[0][dead]).all()) and not bool(torch.isnan(nan[0][live]).any())
    torch.testing.assert_close(nan[0][live], zero[0][live], atol=0, rtol=0)
    for i in (1, 2):
        assert bool(torch.isnan(nan[i][0, 0]).all())
        assert not bool(torch.isnan(nan[i][0, 1]).any()) and not bool(torch.isnan(nan[i][1]).any())
        torch.testing.assert_close(nan[i][1], zero[i][1], atol=0, rtol=0)


# ----------------------------------------------------------------------------- call-to-call changes

def test_changing_padding_masks_do_not_sync():
    """Note [changing mask tensors]: a padding mask that is a new tensor every call is classified on the
    device; after a warm-up call, forward and backward with new masks run under CUDA's sync debug mode set
    to "error" (any device-to-host sync raises), and equal the CPU path's answers."""
    from attn_inductor.lowering.spec import AttentionSpec
    from attn_inductor.ops import default_config

    b, h, n, d = 2, 4, 1024, 64
    q, k, v, do = _inputs(b, h, h, n, n, d, torch.bfloat16, device=CUDA)
    spec = AttentionSpec(score_live=E.score, mask=causal_key_padding_mask(), scale=d ** -0.5,
                         num_captured=1).to_json()
    cfg = default_config(impl="triton")

    def keep_mask(right_pad):
        m = torch.ones(b, n, dtype=torch.int64, device=CUDA)
        m[1, n - right_pad:] = 0
        return m

    def step(mask):
        out = torch.ops.attn_inductor.attention.default(q, k, v, [mask], spec, cfg)
        grads = torch.ops.attn_inductor.attention_backward.default(q, k, v, *out, do, [mask], [False], spec, cfg)
        return out[0], grads[:3]

    step(keep_mask(0))
    torch.cuda.synchronize()
    masks = [keep_mask(p) for p in (100, 300, 517)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [step(m) for m in masks]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_cfg = default_config(impl="cpu")
    for m, (out, grads) in zip(masks, results):
        args = [t.detach().cpu().float() for t in (q, k, v)]
        want = torch.ops.attn_inductor.attention.default(*args, [m.cpu()], spec, cpu_cfg)
        torch.testing.assert_close(out.float().cpu(), want[0], atol=2e-2, rtol=2e-2)


def test_call_sites_on_cuda():
    """Note [call sites] in runtime.py on the GPU: repeated calls of the op with new values (new query/key
    values, a document-id tensor that changes, learned ALiBi slopes under GQA) run the site's plan with
    direct launches, and every call equals the CPU path's answer (fp32 on the same bf16 inputs)."""
    from attn_inductor.lowering.spec import AttentionSpec
    from attn_inductor.ops import default_config

    n = 1000
    cases = {  # name: (spec, captured for call i, needs grad, kv heads)
        "document": (AttentionSpec(score_live=E.score, mask=document_mask_as_masked_fill(), scale=0.125,
                                   num_captured=1),
                     lambda i: [((torch.arange(n) + 97 * i) // 300).to(CUDA)], [False], 4),
        "alibi gqa": (AttentionSpec(score_live=alibi_score(), mask=causal_mask(), scale=0.125, gqa_group=2,
                                    num_captured=1),
                      lambda i: [(torch.linspace(0.05, 0.5, 8) * (i + 1)).to(CUDA)], [True], 4),
    }
    for name, (spec, captured_for, needs, hkv) in cases.items():
        sj = spec.to_json()
        for i in range(4):
            q, k, v, do = _inputs(2, hkv * spec.gqa_group, hkv, n, n, 64, torch.bfloat16, seed=i, device=CUDA)
            captured = captured_for(i)
            got = torch.ops.attn_inductor.attention.default(q, k, v, captured, sj, default_config(impl="triton"))
            grads = torch.ops.attn_inductor.attention_backward.default(q, k, v, *got, do, captured, needs, sj,
                                                                       default_config(impl="triton"))
            cpu = [t.detach().cpu().float() for t in (q, k, v, do)]
            cpu_cap = [t.cpu() for t in captured]
            want = torch.ops.attn_inductor.attention.default(*cpu[:3], cpu_cap, sj, default_config(impl="cpu"))
            want_grads = torch.ops.attn_inductor.attention_backward.default(*cpu[:3], *want, cpu[3], cpu_cap, needs,
                                                                            sj, default_config(impl="cpu"))
            torch.testing.assert_close(got[0].float().cpu(), want[0], atol=2e-2, rtol=2e-2)
            for a, b in zip(grads[:3], want_grads[:3]):
                torch.testing.assert_close(a.float().cpu(), b, atol=5e-2, rtol=5e-2)
            for a, b in zip(grads[3], want_grads[3]):
                if b.numel():  # a slope's gradient sums over the square: compare relative to its size
                    torch.testing.assert_close(a.float().cpu(), b, atol=2e-2 * float(b.abs().max()), rtol=2e-2)


def test_new_lengths_one_symbolic_graph_on_cuda():
    """Note [dynamic sizes]: a compiled naive causal attention with a length-dependent relative bias, on
    CUDA, at five lengths: two graphs, every site rewritten to the Triton kernel, outputs and gradients
    within the numerics rule against fp64."""
    from attn_inductor.testing.numerics import assert_close_to_reference

    table = torch.randn(2 * 640 - 1, device=CUDA) * 0.1

    def fn(q, k, v):
        s = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * 0.125
        n = s.shape[-1]
        i = torch.arange(n, device=s.device)[:, None]
        j = torch.arange(n, device=s.device)[None, :]
        s = (s + table[i - j + n - 1]).masked_fill(i < j, float("-inf"))
        return s.softmax(-1).to(v.dtype) @ v

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fn, backend="flexattn")
    for n in (256, 320, 384, 512, 640):
        q, k, v = (torch.randn(2, 4, n, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        out = compiled(q, k, v)
        ref = fn(*(t.detach().double().requires_grad_(True) for t in (q, k, v)))
        eager = fn(q, k, v)
        assert_close_to_reference(out.detach(), ref.detach(), eager.detach(), name=f"out L={n}")
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 2
    assert counters["attn_inductor"]["rewritten"] == 2 and not counters["attn_inductor"]["not_rewritten"]



def test_reduce_overhead_mode_cuda_graphs():
    """``mode="reduce-overhead"`` (CUDA graphs, which remove the per-call host time that dominates at 1024
    tokens): the rewritten op is captured and replayed, with a padding mask that changes every call (its
    tiles are classified by device ops, which the graph replays on the new mask); answers equal eager's
    within the numerics rule.  Added in session 5 without a GPU: first run pending."""
    from attn_inductor.testing.numerics import assert_close_to_reference

    def fn(q, k, v, keep):
        s = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * 0.125
        n = s.shape[-1]
        i = torch.arange(n, device=s.device)[:, None]
        j = torch.arange(n, device=s.device)[None, :]
        s = s.masked_fill((i < j) | (keep[:, None, None, :] == 0), float("-inf"))
        return s.softmax(-1).to(v.dtype) @ v

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fn, backend="flexattn", mode="reduce-overhead")
    b, n = 2, 1024
    q, k, v = (torch.randn(b, 4, n, 64, device=CUDA, dtype=torch.bfloat16) for _ in range(3))
    for right_pad in (0, 100, 300, 517, 5):
        keep = torch.ones(b, n, dtype=torch.int64, device=CUDA)
        keep[1, n - right_pad:] = 0
        out = compiled(q, k, v, keep).clone()
        ref = fn(q.double(), k.double(), v.double(), keep)
        assert_close_to_reference(out, ref, fn(q, k, v, keep), name=f"pad {right_pad}")
    assert torch._dynamo.utils.counters["attn_inductor"]["rewritten"] >= 1

# ----------------------------------------------------------------------------- speed


def _flex(mask_kind):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    if mask_kind == "causal":
        bm = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 8192, 8192, device=CUDA, _compile=True)
    else:
        bm = None
    return lambda q, k, v: compiled(q, k, v, block_mask=bm)


@pytest.mark.parametrize("mask_kind", ["causal", "full"])
def test_speed_vs_flex_attention(mask_kind):
    """B=2, H=16, S=8192, D=128 bf16: at least 90% of FlexAttention's speed, forward and forward + backward."""
    from triton.testing import do_bench

    b, h, s, d = 2, 16, 8192, 128
    q, k, v, do = _inputs(b, h, h, s, s, d, torch.bfloat16, device=CUDA)
    mask = causal_mask() if mask_kind == "causal" else None
    sp = production_sparsity(mask, q, k, [])
    kw = dict(score=E.score, mask=mask, scale=d ** -0.5, gqa_group=1, sparsity=sp)

    def ours_fwd():
        return launch.core_forward(q, k, v, [], **kw)

    out, lse = ours_fwd()

    def ours_fwd_bwd():
        o, l_ = launch.core_forward(q, k, v, [], **kw)
        return launch.core_backward(q, k, v, o, l_, do, [], [], **kw)

    flex = _flex(mask_kind)
    qf, kf, vf = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

    def flex_fwd_bwd():
        flex(qf, kf, vf).backward(do)

    with torch.no_grad():
        t_flex_fwd = do_bench(lambda: flex(q, k, v))
    t_ours_fwd = do_bench(ours_fwd)
    t_flex_all = do_bench(flex_fwd_bwd)
    t_ours_all = do_bench(ours_fwd_bwd)
    density = 0.5 if mask_kind == "causal" else 1.0
    flops = 4 * b * h * s * s * d * density
    print(f"\n{mask_kind}: forward ours {t_ours_fwd:.3f} ms ({flops / t_ours_fwd / 1e9:.0f} TF/s), "
          f"flex {t_flex_fwd:.3f} ms; fwd+bwd ours {t_ours_all:.3f} ms ({3.5 * flops / t_ours_all / 1e9:.0f} TF/s), "
          f"flex {t_flex_all:.3f} ms")
    assert t_ours_fwd <= t_flex_fwd / 0.9, "forward slower than 90% of FlexAttention"
    assert t_ours_all <= t_flex_all / 0.9, "forward + backward slower than 90% of FlexAttention"

