"""Region capture (Note [region capture]): graphs with higher-order ops keep them, attention is still rewritten.

A user ``torch.autograd.Function`` (``autograd_function_apply``) and activation
checkpointing (``tag_activation_checkpoint``) put higher-order ops in the Dynamo
graph.  Re-tracing those with ``make_fx`` would run them as plain ops under
no_grad and drop their backward, so capture keeps them opaque, rewrites the
attention around them (and inside checkpointed bodies), and splices the op back
into Dynamo's graph.  These tests compile with real Inductor (AOTAutograd traces
the HOPs' own backward next to our op) and hold outputs and every gradient to
the project's numerics rule (fp64 oracle, judged by eager fp32).

The Function here is a straight-through estimator: its backward is not the
derivative of its forward (``sign`` has derivative 0), so a dropped backward
changes the gradients; ``test_function_backward_matters`` shows that it would.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as cp

import attn_inductor
import attn_inductor.backend as backend
from attn_inductor.backend import make_backend, rewrite_graph
from attn_inductor.capture import regions
from attn_inductor.capture.regions import RegionCapture, SpliceError
from attn_inductor.options import BackendOptions
from attn_inductor.testing.numerics import assert_close_to_reference

from .spellings import CASES

B, T, C, HEADS = 2, 12, 32, 4

#: Inductor's C++ vectorization off: it only changes the code around our op and halves compile time here
OPTIONS = {"inductor_config": {"cpp.simdlen": 1}}


class StraightThrough(torch.autograd.Function):
    """sign(x) forward; clipped identity backward (not the derivative of sign)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class Attention(nn.Module):
    """Naive causal attention; with ``mask`` (a float additive [B, 1, T, T] mask) it is added to the scores."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)

    def forward(self, x, mask=None):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        att = q @ k.transpose(-2, -1) / math.sqrt(c // HEADS)
        if mask is None:
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf"))
        else:
            att = att + mask
        y = torch.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Attention, then an MLP whose activation is a custom autograd.Function."""

    def __init__(self, function=StraightThrough.apply):
        super().__init__()
        self.attn = Attention()
        self.fc = nn.Linear(C, C)
        self.out = nn.Linear(C, C)
        self.function = function

    def forward(self, x, mask=None):
        x = x + self.attn(x, mask)
        return x + self.out(self.function(self.fc(x)))


class Checkpointed(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return cp.checkpoint(self.block, x, use_reentrant=False) * 2


def padding_mask():
    """Left padding in row 0 (3 tokens), right padding in row 1 (2 tokens)."""
    pad = torch.ones(B, T, dtype=torch.long)
    pad[0, :3] = 0
    pad[1, -2:] = 0
    return pad


class PaddedLayers(nn.Module):
    """HF-style: the 4-D finfo.min mask is built once, outside the (checkpointed) layers."""

    def __init__(self, n_layers=2, checkpoint=True):
        super().__init__()
        self.layers = nn.ModuleList(Attention() for _ in range(n_layers))
        self.checkpoint = checkpoint

    def forward(self, x, attention_mask):
        t = x.shape[1]
        causal = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
        keep = causal[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, torch.finfo(x.dtype).min)
        for layer in self.layers:
            x = x + (cp.checkpoint(layer, x, mask, use_reentrant=False) if self.checkpoint else layer(x, mask))
        return x


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _step(fn, module, inputs, weight):
    module.zero_grad(set_to_none=True)
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*inputs)
    (out * weight.to(out.dtype)).sum().backward()
    grads = {"input": inputs[0].grad} | {n: p.grad for n, p in module.named_parameters()}
    return out.detach(), grads


def check_training(model: nn.Module, inputs: list, expected_sites: int) -> dict:
    """Compile with flexattn + Inductor, one forward/backward; outputs and every gradient by the numerics rule."""
    model.train()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # explain (if it ran) counts too
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="flexattn", options=OPTIONS)
    weight = torch.randn(model(*inputs).shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out, grads = _step(compiled, compiled_model, inputs, weight)
    counts = dict(torch._dynamo.utils.counters["attn_inductor"])
    assert counts.get("rewritten") == expected_sites and not counts.get("not_rewritten"), counts

    ref_model = copy.deepcopy(model).double()
    ref, ref_grads = _step(ref_model, ref_model, [x.double() if x.is_floating_point() else x for x in inputs],
                           weight)
    eager, eager_grads = _step(model, model, inputs, weight)
    assert_close_to_reference(out, ref, eager, name="output")
    assert sorted(grads) == sorted(ref_grads)
    for name in grads:
        assert grads[name] is not None, f"no gradient for {name}"
        assert_close_to_reference(grads[name], ref_grads[name], eager_grads[name], name=f"grad {name}")
    return grads


class _OpCalls:
    """Counts runs of the op's forward and backward implementations (recomputation shows as extra forwards)."""

    def __init__(self, monkeypatch):
        from attn_inductor import runtime

        self.forward = self.backward = 0
        fwd, bwd = runtime.attention_forward, runtime.attention_backward

        def counting_forward(*a, **k):
            self.forward += 1
            return fwd(*a, **k)

        def counting_backward(*a, **k):
            self.backward += 1
            return bwd(*a, **k)

        monkeypatch.setattr(runtime, "attention_forward", counting_forward)
        monkeypatch.setattr(runtime, "attention_backward", counting_backward)


# ----------------------------------------------------------------------------- autograd.Function


def test_function_beside_attention_is_kept_and_attention_rewritten():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(B, T, C)
    report = attn_inductor.explain(model, x)
    assert len(report.sites) == 1 and report.sites[0].rewritten, str(report)
    assert report.sites[0].mask == "kv_idx - q_idx <= 0"
    check_training(model, [x], expected_sites=1)


def test_function_backward_matters():
    """The test above can fail: with the Function's backward dropped (sign's derivative, 0) the gradients of
    everything before it change far beyond the numerics bar."""
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(B, T, C)
    dropped = copy.deepcopy(model)
    dropped.function = torch.sign  # what an inlined forward gives: sign's derivative, zero
    w = torch.randn(B, T, C)
    (model(x) * w).sum().backward()
    (dropped(x) * w).sum().backward()
    diff = (model.fc.weight.grad - dropped.fc.weight.grad).abs().max().item()
    assert diff > 1e-2 * model.fc.weight.grad.abs().max().item()


def test_softmax_inside_a_function_is_reported_not_rewritten():
    class AttentionFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q):
            return torch.softmax(q @ q.mT, -1) @ q

        @staticmethod
        def backward(ctx, g):
            return g

    def f(x):
        return AttentionFunction.apply(x.view(B, HEADS, T, C // HEADS)).sum()

    x = torch.randn(B, T, C, requires_grad=True)
    report = attn_inductor.explain(f, x)
    assert len(report.sites) == 1 and not report.sites[0].rewritten, str(report)
    assert report.sites[0].node.startswith("fwd_body_0.")
    assert report.sites[0].reason == ("inside a custom torch.autograd.Function (higher-order op "
                                      "`autograd_function_apply`); its forward and backward are left as written")


class BucketBias(nn.Module):
    """T5-style learned bias whose bucket index is accumulated in place (``buckets += ...``), plus the
    Function: the graph has both a HOP and an in-place op (Note [values and mutation])."""

    def __init__(self):
        super().__init__()
        self.rel = nn.Embedding(8, HEADS)
        self.block = Block()

    def forward(self, x):
        pos = torch.arange(T)[None, :] - torch.arange(T)[:, None]
        buckets = (pos > 0).long() * 4
        buckets += pos.abs().clamp(max=3)
        bias = self.rel(buckets).permute(2, 0, 1).unsqueeze(0)
        attn = self.block.attn
        q, k, v = attn.qkv(x).split(C, dim=2)
        q, k, v = (z.view(B, T, HEADS, C // HEADS).transpose(1, 2) for z in (q, k, v))
        y = torch.softmax(q @ k.mT + bias, -1) @ v
        x = x + attn.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.block.out(self.block.function(self.block.fc(x)))


def test_in_place_op_and_function_in_one_graph():
    torch.manual_seed(0)
    model = BucketBias()
    x = torch.randn(B, T, C)
    report = attn_inductor.explain(model, x)
    assert report.sites[0].rewritten, str(report)
    assert "self.rel.weight[" in report.sites[0].score
    grads = check_training(model, [x], expected_sites=1)
    assert grads["rel.weight"].abs().max() > 0


# ----------------------------------------------------------------------------- activation checkpointing


def test_checkpointed_attention_is_rewritten_and_recomputed(monkeypatch):
    torch.manual_seed(0)
    model = Checkpointed(Block(function=torch.nn.functional.gelu))
    x = torch.randn(B, T, C)
    report = attn_inductor.explain(model, x)
    assert [(s.node, s.rewritten) for s in report.sites] == [("wrap_body_0.softmax", True)], str(report)
    assert report.sites[0].mask == "kv_idx - q_idx <= 0"

    calls = _OpCalls(monkeypatch)
    compiled = torch.compile(copy.deepcopy(model), backend="flexattn", options=OPTIONS)
    out = compiled(x.requires_grad_())
    assert (calls.forward, calls.backward) == (1, 0)
    out.sum().backward()
    assert (calls.forward, calls.backward) == (2, 1), "the checkpoint no longer recomputes the attention"

    check_training(model, [x.detach()], expected_sites=1)


def test_function_inside_checkpoint():
    """The checkpoint body holds a HOP itself (the Function): that one stays opaque, the attention is rewritten."""
    torch.manual_seed(0)
    model = Checkpointed(Block())
    check_training(model, [torch.randn(B, T, C)], expected_sites=1)


def test_mask_built_outside_the_checkpoint_is_recovered():
    """HF's layout: the 4-D finfo.min mask is built before the checkpointed layers.  The body is matched in
    its outer context, so the mask is recovered from the 2-D padding mask (threaded into each body as a new
    operand), not read as an opaque additive tensor; the 4-D mask is then not built at all.  Row 0's first
    three queries are fully masked (left padding): eager gives them the mean of V."""
    torch.manual_seed(0)
    model = PaddedLayers()
    x, pad = torch.randn(B, T, C), padding_mask()
    report = attn_inductor.explain(model, x, pad)
    assert [s.node.split(".")[0] for s in report.sites] == ["wrap_body_0", "wrap_body_1"], str(report)
    for site in report.sites:
        assert site.rewritten, str(report)
        assert site.mask == "kv_idx <= q_idx & attention_mask[b, kv_idx] != 0", str(report)
        assert site.score == "score"

    graphs = []

    def capture_backend(gm, example_inputs):
        new_gm, _ = rewrite_graph(gm, example_inputs, BackendOptions.from_dict({}))
        graphs.append(new_gm)
        return gm.forward

    torch.compile(model, backend=capture_backend)(x, pad)
    (top,) = graphs
    four_d = [n for n in top.graph.nodes if n.op != "placeholder" and getattr(n.meta.get("example_value"), "shape",
                                                                               None) == (B, 1, T, T)]
    assert not four_d, f"the 4-D mask is still built: {[n.name for n in four_d]}"

    check_training(model, [x, pad], expected_sites=2)


def test_every_softmax_gets_a_report():
    """Top level, inside a checkpoint, inside a Function: one SiteReport each, in that order."""

    class Probs(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s):
            return torch.softmax(s, -1)

        @staticmethod
        def backward(ctx, g):
            return g

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Attention(), Attention()

        def forward(self, x):
            x = x + self.a(x)
            x = x + cp.checkpoint(self.b, x, use_reentrant=False)
            return x + Probs.apply(x)

    report = attn_inductor.explain(Mixed(), torch.randn(B, T, C, requires_grad=True))
    assert [(s.node.split(".")[0], s.rewritten) for s in report.sites] == [
        ("softmax", True), ("wrap_body_0", True), ("fwd_body_0", False)], str(report)
    counts = torch._dynamo.utils.counters["attn_inductor"]
    assert (counts["rewritten"], counts["not_rewritten"]) == (2, 1)


# ----------------------------------------------------------------------------- failures are contained


def test_splice_failure_leaves_the_site(monkeypatch):
    def refuse(self, m, config, free=None):
        raise SpliceError("refused by the test")

    monkeypatch.setattr(RegionCapture, "splice", refuse)
    torch.manual_seed(0)
    model = Checkpointed(Block())
    report = attn_inductor.explain(model, torch.randn(B, T, C))
    assert len(report.sites) == 1 and not report.sites[0].rewritten
    assert report.sites[0].reason == "matched, but the rewrite could not be put back into the graph: refused by the test"


def test_internal_error_leaves_dynamo_graph_untouched(monkeypatch):
    """Splices happen on copies: when committing fails, Inductor gets Dynamo's graph exactly as it was."""
    def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(RegionCapture, "commit", broken)
    torch.manual_seed(0)
    model = Checkpointed(Block())
    x = torch.randn(B, T, C)
    seen = []

    def spy(gm, example_inputs):
        before = [gm.code] + [m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
        result = make_backend(OPTIONS)(gm, example_inputs)
        after = [gm.code] + [m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
        seen.append(before == after)
        return result

    compiled_model = copy.deepcopy(model)
    out = torch.compile(compiled_model, backend=spy)(x.requires_grad_())
    assert seen == [True]
    counts = torch._dynamo.utils.counters["attn_inductor"]
    assert (counts["rewritten"], counts["not_rewritten"]) == (0, 1)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    ref = model(x)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref)
    for (n, p), (_, q) in zip(compiled_model.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_compile_failure_falls_back_to_stock_inductor(monkeypatch):
    """Inductor failing on the rewritten graph (here: after AOTAutograd traced it) is our failure: the
    site is reported with the reason and Dynamo's own graph is compiled; the step is still right."""
    import torch._inductor.compile_fx as cfx

    real = cfx.compile_fx

    def fail_inner(gm, example_inputs, **kwargs):
        raise RuntimeError("injected by the test\nsecond line")

    def compile_fx(gm, example_inputs, **kwargs):
        ours = any(n.target == torch.ops.attn_inductor.attention.default for m in gm.modules()
                   if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes)
        return real(gm, example_inputs, **(kwargs | {"inner_compile": fail_inner} if ours else kwargs))

    monkeypatch.setattr(cfx, "compile_fx", compile_fx)
    torch.manual_seed(0)
    model = Checkpointed(Block())
    x = torch.randn(B, T, C)
    compiled_model = copy.deepcopy(model)
    weight = torch.randn(B, T, C, dtype=torch.float64)
    with attn_inductor.backend.collect_reports() as reports:
        out, grads = _step(torch.compile(compiled_model, backend="flexattn", options=OPTIONS), compiled_model, [x],
                           weight)
    assert [(r.rewritten, r.reason) for r in reports] == [
        (False, "the rewritten graph failed to compile: RuntimeError: injected by the test")]
    eager, eager_grads = _step(model, model, [x], weight)
    torch.testing.assert_close(out, eager)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], msg=name)


def test_capture_failure_is_a_reason(monkeypatch):
    def fail(self, *args):
        raise regions.CaptureError("refused by the test")

    monkeypatch.setattr(RegionCapture, "_trace", fail)
    report = attn_inductor.explain(Block(), torch.randn(B, T, C, requires_grad=True))
    assert [(s.rewritten, s.reason) for s in report.sites] == [(False, "graph not captured: refused by the test")]


# ----------------------------------------------------------------------------- same answers as the whole-graph path


_SITE_FIELDS = ("rewritten", "reason", "score", "mask", "scale", "q_shape", "k_shape", "v_shape", "gqa_group",
                "captured", "sparsity")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_region_capture_agrees_with_whole_graph_capture(case, monkeypatch):
    """Forced through region capture, every spelling gets the report the whole-graph capture gives it
    (its numerics under region capture are checked by running tests/test_spellings.py with
    ``backend._ALWAYS_REGIONS = True``)."""
    torch.manual_seed(0)
    mod, inputs = case.make(torch.float32)
    whole = attn_inductor.explain(mod, *inputs)
    monkeypatch.setattr(backend, "_ALWAYS_REGIONS", True)
    torch._dynamo.reset()
    region = attn_inductor.explain(mod, *inputs)
    assert len(region.sites) == len(whole.sites) == 1
    for name in _SITE_FIELDS:
        assert getattr(region.sites[0], name) == getattr(whole.sites[0], name), name


def test_opaque_score_tensor_under_checkpoint_trains_like_eager():
    """A 4-D finfo.min mask the body receives as an opaque input (built outside the compiled function) is
    read as an additive score term; row 0's fully masked queries must still get eager's gradients
    (Note [absorbed rows] in cpu.py — this site used to be refused for that reason)."""
    torch.manual_seed(0)
    layer = Attention()
    pad = padding_mask()
    keep = (torch.arange(T)[None, :] <= torch.arange(T)[:, None])[None, None] & pad[:, None, None, :].bool()
    mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, mask):
            return cp.checkpoint(self.layer, x, mask, use_reentrant=False)

    x = torch.randn(B, T, C)
    report = attn_inductor.explain(Layer(), x, mask)
    assert report.sites[0].rewritten, str(report)
    check_training(Layer(), [x, mask], expected_sites=1)
