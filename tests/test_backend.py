"""The backend under real Inductor: entry point, options, compile_fx integration, recompiles, opcheck."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attn_inductor
from attn_inductor.lowering import expr as E
from attn_inductor.lowering.spec import AttentionSpec
from attn_inductor.options import BackendOptions
from attn_inductor.testing.numerics import assert_close_to_reference


class CausalSelfAttention(nn.Module):
    """nanoGPT-style block: the naive attention an unmodified model runs."""

    def __init__(self, dim=32, heads=4, max_len=64):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


def _fresh():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def test_compile_fx_forward_backward_and_no_recompile():
    _fresh()
    torch.manual_seed(0)
    model = CausalSelfAttention()
    x = torch.randn(2, 24, 32, requires_grad=True)
    compiled = torch.compile(model, backend="flexattn")
    out = compiled(x)
    assert torch._dynamo.utils.counters["attn_inductor"]["rewritten"] == 1
    w = torch.randn_like(out)
    (out * w).sum().backward()
    g_ours = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]

    x.grad = None
    model.zero_grad()
    ref_model = _deepcopy64(model)
    x64 = x.detach().double().requires_grad_(True)
    ref = ref_model(x64)
    (ref * w.double()).sum().backward()
    g_ref = [x64.grad] + [p.grad for p in ref_model.parameters()]
    eager = model(x)
    (eager * w).sum().backward()
    g_eager = [x.grad] + [p.grad for p in model.parameters()]
    assert_close_to_reference(out.detach(), ref.detach(), eager.detach(), name="out")
    for i, (a, r, e) in enumerate(zip(g_ours, g_ref, g_eager)):
        assert_close_to_reference(a, r, e, name=f"grad[{i}]")

    # same shapes again: no new compile, no new rewrite
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled(torch.randn(2, 24, 32, requires_grad=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    assert torch._dynamo.utils.counters["attn_inductor"]["rewritten"] == 1


def _deepcopy64(m):
    import copy

    return copy.deepcopy(m).double()


def test_entry_point_without_import():
    """backend="flexattn" resolves through the torch_dynamo_backends entry point in a fresh process."""
    code = textwrap.dedent("""
        import torch, sys
        assert "attn_inductor" not in sys.modules
        def f(q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.125, -1) @ v
        q = torch.randn(1, 2, 8, 16)
        out = torch.compile(f, backend="flexattn", options={"inductor": False})(q, q, q)
        assert torch.allclose(out, f(q, q, q), atol=1e-5)
        assert torch._dynamo.utils.counters["attn_inductor"]["rewritten"] == 1
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


def test_unknown_option_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown attn_inductor option\(s\) \['fully_masked'\]; valid options are"):
        BackendOptions.from_dict({"fully_masked": "zeros"})
    _fresh()
    f = torch.compile(lambda q: torch.softmax(q @ q.mT, -1) @ q, backend="flexattn", options={"bogus": 1})
    with pytest.raises(Exception, match="bogus"):
        f(torch.randn(1, 1, 4, 4))


def test_options_reach_the_op():
    """fully_masked_rows="zeros" turns eager's NaN rows into zeros."""
    _fresh()

    def f(q, k, v, keep):
        s = (q @ k.mT).masked_fill(~keep, float("-inf"))
        return torch.softmax(s, -1) @ v

    q = torch.randn(1, 2, 6, 8)
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    keep[2] = False  # a fully masked row
    eager = f(q, q, q, keep)
    assert torch.isnan(eager[:, :, 2]).all()
    ours = torch.compile(f, backend="flexattn", options={"inductor": False})(q, q, q, keep)
    assert torch.isnan(ours[:, :, 2]).all() and not torch.isnan(ours[:, :, :2]).any()
    _fresh()
    zeros = torch.compile(f, backend="flexattn", options={"inductor": False, "fully_masked_rows": "zeros"})(
        q, q, q, keep)
    assert (zeros[:, :, 2] == 0).all()
    torch.testing.assert_close(zeros[:, :, 3:], eager[:, :, 3:])


def test_refusal_falls_back_to_stock_inductor():
    _fresh()

    def f(q, k, v):
        p = torch.softmax(q @ k.mT, dim=-1)
        return p @ v, p

    q = torch.randn(1, 2, 8, 8)
    out, p = torch.compile(f, backend="flexattn")(q, q, q)
    ref, pref = f(q, q, q)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(p, pref)
    assert torch._dynamo.utils.counters["attn_inductor"]["not_rewritten"] == 1


def test_explain_report_table_and_json():
    import json

    _fresh()
    model = CausalSelfAttention()
    report = attn_inductor.explain(model, torch.randn(1, 16, 32))
    text = str(report)
    assert "1 rewritten" in text and "score: score" in text and "self.bias[0, 0, q_idx, kv_idx] != 0" in text
    data = json.loads(report.to_json())
    assert data["num_sites"] == 1 and data["sites"][0]["rewritten"] is True
    assert data["sites"][0]["q_shape"] == [1, 4, 16, 8]


def _spec_for_opcheck():
    causal = E.call("ge", E.q_idx, E.kv_idx, dtype=E.BOOL)
    bias = E.Load(0, (E.h, E.call("add", E.call("sub", E.q_idx, E.kv_idx, dtype=E.INT64), E.const(7, E.INT64),
                                  dtype=E.INT64)), "float32")
    score = E.call("add", E.score, bias, dtype="float32")
    return AttentionSpec(score_live=score, mask=causal, scale=0.3, num_captured=1)


def test_opcheck():
    from attn_inductor.ops import default_config

    spec = _spec_for_opcheck()
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    k = torch.randn(1, 2, 8, 16, requires_grad=True)
    v = torch.randn(1, 2, 8, 16, requires_grad=True)
    table = torch.randn(2, 15, requires_grad=True)
    torch.library.opcheck(torch.ops.attn_inductor.attention.default,
                          (q, k, v, [table], spec.to_json(), default_config()))


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def test_autograd_function_graph_is_rewritten_with_correct_gradients():
    """Note [higher-order ops]: re-tracing would drop the Function's backward, so the HOP stays opaque
    (Note [region capture]) and the attention next to it is still rewritten."""
    _fresh()
    lin = nn.Linear(8, 8)

    def make(lin):
        def f(x):
            h = _Double.apply(lin(x))
            q = h.view(1, 2, 4, 4)
            return (torch.softmax(q @ q.mT, -1) @ q).sum()
        return f

    x = torch.randn(4, 8)
    torch.compile(make(lin), backend="flexattn")(x).backward()
    assert torch._dynamo.utils.counters["attn_inductor"]["rewritten"] == 1
    g_ours = lin.weight.grad.clone()
    lin.zero_grad()
    make(lin)(x).backward()
    lin64 = _deepcopy64(lin)
    make(lin64)(x.double()).backward()
    assert_close_to_reference(g_ours, lin64.weight.grad, lin.weight.grad, name="grad")
    report = attn_inductor.explain(make(lin), x)
    assert len(report.sites) == 1 and report.sites[0].rewritten, str(report)


def test_opaque_additive_mask_with_fully_minimum_rows_trains_like_eager():
    """Note [absorbed rows]: rows whose every score is finfo.min + s (a float mask we cannot see into)
    store lse == max in fp32; the backward must still rebuild P = 1/n there, as eager's autograd does."""
    _fresh()
    torch.manual_seed(0)
    B, H, L, D = 2, 2, 6, 4

    def f(q, k, v, m):
        return torch.softmax(q @ k.mT / math.sqrt(D) + m, -1) @ v

    mn = torch.finfo(torch.float32).min
    m = torch.where(torch.ones(L, L).tril().bool(), 0.0, mn).expand(B, 1, L, L).clone()
    m[0, :, :, :2] = mn  # rows 0 and 1 of batch 0 see only finfo.min
    x = [torch.randn(B, H, L, D, requires_grad=True) for _ in range(3)]
    out = torch.compile(f, backend="flexattn", options={"inductor": False})(*x, m)
    assert torch._dynamo.utils.counters["attn_inductor"]["rewritten"] == 1
    w = torch.randn_like(out)
    (out * w).sum().backward()
    ours = [t.grad.clone() for t in x]
    x64 = [t.detach().double().requires_grad_(True) for t in x]
    ref = f(*x64, m.double())
    (ref * w.double()).sum().backward()
    xe = [t.detach().clone().requires_grad_(True) for t in x]
    eager = f(*xe, m)
    (eager * w).sum().backward()
    assert_close_to_reference(out.detach(), ref.detach(), eager.detach(), name="out")
    for i, (a, r, e) in enumerate(zip(ours, x64, xe)):
        assert_close_to_reference(a, r.grad, e.grad, name=f"grad[{i}]")


def test_env_reads_follow_os_environ(monkeypatch):
    """_compat.env (the launch path's policy reads) sees every way of changing the environment."""
    from attn_inductor import _compat

    name = "ATTN_INDUCTOR_TEST_ENV_READ"
    assert _compat.env(name) is None and _compat.env(name, "dflt") == "dflt"
    monkeypatch.setenv(name, "tables")
    assert _compat.env(name) == "tables"
    os.environ[name] = "ünïcode"
    assert _compat.env(name) == "ünïcode"
    del os.environ[name]
    assert _compat.env(name, "gone") == "gone"


# ----------------------------------------------------------------------------- Note [dynamic sizes]


def _naive_causal(q, k, v):
    s = q @ k.transpose(-1, -2) * 0.125
    n = s.shape[-1]
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return s.softmax(-1) @ v


def _naive_relbias(table):
    def fn(q, k, v):
        s = q @ k.transpose(-1, -2) * 0.125
        n = s.shape[-1]
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        return (s + table[i - j + n - 1]).softmax(-1) @ v  # the length is read at run time
    return fn


def _naive_window_from_length(q, k, v):
    """A diagonal and a slice start computed from the length: both read at run time."""
    s = q @ k.transpose(-1, -2) * 0.125
    n = s.shape[-1]
    s = s + _BIAS[_BIAS.shape[0] - n:][None, :]
    keep = torch.ones(n, n, dtype=torch.bool).tril(diagonal=n // 2 - 8)
    return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


_BIAS = torch.randn(200)


def _naive_flat_bias(q, k, v):
    """A bias whose recovered index multiplies by the length (arange(n*n).view(n, n)): the length is baked
    into the spec, so it is specialised per length."""
    s = q @ k.transpose(-1, -2) * 0.125
    n = s.shape[-1]
    return (s + torch.arange(n * n, dtype=torch.float32).reshape(n, n) * 1e-3).softmax(-1) @ v


def _bmm_causal(q, k, v):
    """The [B*H, L, D] layout: the rewrite reshapes to explicit sizes."""
    b, h, n, d = q.shape
    s = torch.bmm(q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2)) * 0.125
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.bmm(s.softmax(-1), v.reshape(b * h, n, d)).view(b, h, n, d)


def _lengths_run(fn, lengths, train=False, batches=None):
    _fresh()
    compiled = torch.compile(fn, backend="flexattn")
    for n, b in zip(lengths, batches or [2] * len(lengths)):
        q, k, v = (torch.randn(b, 2, n, 8, requires_grad=train) for _ in range(3))
        out = compiled(q, k, v)
        ref = fn(*(t.detach().double().requires_grad_(train) for t in (q, k, v)))
        eager = fn(q, k, v)
        assert_close_to_reference(out.detach(), ref.detach(), eager.detach(), name=f"out L={n}")
        if train:
            w = torch.randn_like(out)
            grads = torch.autograd.grad((out * w).sum(), (q, k, v))
            grads_eager = torch.autograd.grad((eager * w).sum(), (q, k, v))
            for a, e in zip(grads, grads_eager):
                torch.testing.assert_close(a, e, atol=2e-5, rtol=2e-5)
    return torch._dynamo.utils.counters


def test_new_lengths_reuse_one_symbolic_graph():
    """Note [dynamic sizes]: the second length brings Dynamo's symbolic graph, rewritten for any length;
    ten lengths (past Dynamo's recompile limit of 8) make two graphs, every one rewritten and correct,
    forward and backward."""
    from attn_inductor.backend import collect_reports

    with collect_reports() as reports:
        counters = _lengths_run(_naive_causal, range(16, 96, 8), train=True)
    assert counters["stats"]["unique_graphs"] == 2
    assert [r.lengths for r in reports] == [None, "any (one graph with symbolic sizes)"]
    assert counters["attn_inductor"]["rewritten"] == 2 and not counters["attn_inductor"]["not_rewritten"]


@pytest.mark.parametrize("fn", [_naive_relbias(torch.randn(2 * 60 - 1)), _naive_window_from_length, _bmm_causal],
                         ids=["relbias_offset", "diagonal_and_slice", "bmm_layout"])
def test_sizes_read_at_run_time_stay_generic(fn):
    """Sizes the score or mask computes with (``L - 1`` in an index, a diagonal, a slice start) enter the
    op as captured scalars, and a [B*H, L, D] layout is reshaped with -1 for the length, so the symbolic
    graph serves every length."""
    counters = _lengths_run(fn, (16, 24, 32, 40, 48))
    assert counters["stats"]["unique_graphs"] == 2
    assert counters["attn_inductor"]["rewritten"] == 2 and not counters["attn_inductor"]["not_rewritten"]


def _naive_window_64(q, k, v):
    s = q @ k.transpose(-1, -2) * 0.125
    n = s.shape[-1]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return s.masked_fill((i < j) | (i - j >= 64), float("-inf")).softmax(-1) @ v


def test_window_wider_than_the_traced_lengths():
    """A 64-token window traced at 20 tokens (and re-traced at 40 and 60) always holds there; the symbolic
    graph must keep it anyway, since it also serves 100 and 300 tokens (index ranges of symbolic sizes are
    unbounded in the simplifier).  Folded away, the answers at 100 and 300 were wrong."""
    counters = _lengths_run(_naive_window_64, (16, 20, 100, 300))
    assert counters["stats"]["unique_graphs"] == 2
    assert counters["attn_inductor"]["rewritten"] == 2 and not counters["attn_inductor"]["not_rewritten"]


def test_length_dependent_specs_are_specialised():
    """A spec holding a constant that came from the length, or a reshape whose sizes vary in two dims
    (batch and length of a [B*H, L, D] layout), is specialised: a graph per shape, every one rewritten,
    every answer right."""
    from attn_inductor.backend import collect_reports

    why = {_naive_flat_bias: "a spec holds a constant computed from a size",
           _bmm_causal: "a reshape of q has more than one size that varies"}
    for fn, batches in ((_naive_flat_bias, None), (_bmm_causal, (2, 3, 4))):  # batch and length both vary
        with collect_reports() as reports:
            counters = _lengths_run(fn, (16, 24, 32), batches=batches)
        assert counters["stats"]["unique_graphs"] == 3
        assert counters["attn_inductor"]["rewritten"] == 3 and not counters["attn_inductor"]["not_rewritten"]
        assert reports[0].lengths is None and all(r.lengths.startswith("this shape only") and why[fn] in r.lengths
                                                  for r in reports[1:]), [r.lengths for r in reports]


def test_captured_sizes_enter_on_the_inputs_device():
    """A size the score reads becomes a 0-d int64 tensor made on the device of the attention's inputs (a
    CPU scalar would be refused next to CUDA inputs)."""
    from attn_inductor.backend import rewrite_graph

    _fresh()
    seen = []

    def spy(gm, example_inputs):
        new_gm, reports = rewrite_graph(gm, example_inputs, BackendOptions.from_dict(None))
        if new_gm is not None:
            seen.extend(n for n in new_gm.graph.nodes if n.target is torch.ops.aten.scalar_tensor.default)
        return gm.forward

    fn = _naive_relbias(torch.randn(2 * 40 - 1))
    compiled = torch.compile(fn, backend=spy)
    for n in (16, 24):
        compiled(*(torch.randn(2, 2, n, 8) for _ in range(3)))
    assert seen and all(n.kwargs["dtype"] == torch.int64 and n.kwargs["device"] == torch.device("cpu")
                        for n in seen)


def test_compiled_graphs_call_the_op_without_autograd():
    """Note [the op in compiled graphs]: the code Inductor generates calls ``attention_no_grad`` (no
    per-call Python autograd wrapper) and ``attention_backward``; answers and gradients as eager's."""
    from torch._inductor.utils import run_and_get_code

    def fn(q, k, v):
        s = q @ k.transpose(-1, -2) * 0.25
        n = s.shape[-1]
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        return s.masked_fill(i < j, float("-inf")).softmax(-1) @ v

    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3))

    def step():
        out = torch.compile(fn, backend="flexattn", dynamic=False)(q, k, v)
        out.sum().backward()
        return out

    with torch._inductor.config.patch(force_disable_caches=True):
        out, codes = run_and_get_code(step)
    code = "\n".join(codes)
    assert "attn_inductor.attention_no_grad.default(" in code and "attn_inductor.attention_backward.default(" in code
    assert "attn_inductor.attention.default(" not in code
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = fn(q, k, v)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(a, t.grad, atol=1e-5, rtol=1e-5)
