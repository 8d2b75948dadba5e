"""Host (CPU) time per call of the rewritten attention, next to FlexAttention's, at a tiny shape where
the kernels take microseconds, plus a cProfile of ours: where the Python time goes.

    python benchmarks/host_overhead.py --variants causal,document
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import Variant, step as make_step  # noqa: E402


def per_call_us(step, n=300):
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


LAYER_SPECS = ("causal",)


def layers(var, q, k, v, g):
    """The same attention one layer at a time: the Triton launcher alone, the op, the op with autograd."""
    from attn_inductor.lowering import expr as E
    from attn_inductor.lowering.spec import AttentionSpec
    from attn_inductor.ops import call_attention, default_config
    from attn_inductor.runtime import block_sparsity_for
    from attn_inductor.templates import launch

    mask = E.call("ge", E.q_idx, E.kv_idx, dtype=E.BOOL)
    scale = q.shape[-1] ** -0.5
    spec = AttentionSpec(score_live=E.score, mask=mask, scale=scale)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    sp = block_sparsity_for(mask, qd, kd, [], *launch.preferred_blocks(qd, kd, vd))
    out, lse = launch.core_forward(qd, kd, vd, [], score=E.score, mask=mask, scale=scale, gqa_group=1, sparsity=sp)
    spec_json, cfg = spec.to_json(), default_config()

    def core_fwd():
        launch.core_forward(qd, kd, vd, [], score=E.score, mask=mask, scale=scale, gqa_group=1, sparsity=sp)

    def core_bwd():
        launch.core_backward(qd, kd, vd, out, lse, g, [], [], score=E.score, mask=mask, scale=scale, gqa_group=1,
                             sparsity=sp)

    def op_fwd():
        torch.ops.attn_inductor.attention(qd, kd, vd, [], spec_json, cfg)

    o3, l3, fb3 = torch.ops.attn_inductor.attention(qd, kd, vd, [], spec_json, cfg)

    def op_bwd():
        torch.ops.attn_inductor.attention_backward(qd, kd, vd, o3, l3, fb3, g, [], [], spec_json, cfg)

    def op_fwdbwd():
        q.grad = k.grad = v.grad = None
        call_attention(q, k, v, [], spec).backward(g)

    from attn_inductor import ops, runtime
    impl = launch

    def runtime_fwd():
        runtime.attention_forward(spec, qd, kd, vd, [], impl)

    def impl_fwd():
        ops._attention_impl(qd, kd, vd, [], spec_json, cfg)

    def runtime_bwd():
        runtime.attention_backward(spec, qd, kd, vd, o3, l3, fb3, g, [], [], impl)

    # a soft mask (key padding held as a bool tensor, eager's finfo.min fill): the fallback pass runs too
    keep = torch.ones(qd.shape[0], kd.shape[2], dtype=torch.bool, device=qd.device)
    soft = AttentionSpec(score_live=E.score, mask=mask, soft_mask=E.Load(0, (E.b, E.kv_idx), E.BOOL), scale=scale,
                         num_captured=1)
    soft_json = soft.to_json()
    o4, l4, fb4 = torch.ops.attn_inductor.attention(qd, kd, vd, [keep], soft_json, cfg)

    def soft_fwd():
        torch.ops.attn_inductor.attention(qd, kd, vd, [keep], soft_json, cfg)

    def soft_bwd():
        torch.ops.attn_inductor.attention_backward(qd, kd, vd, o4, l4, fb4, g, [keep], [False], soft_json, cfg)

    def empty():
        torch.empty(qd.shape, dtype=qd.dtype, device=qd.device)

    def python_only():  # the host's speed at plain Python, to compare hosts
        sum(range(200))

    for name, step in (("launch.core_forward", core_fwd), ("launch.core_backward", core_bwd),
                       ("runtime.attention_forward", runtime_fwd), ("ops._attention_impl", impl_fwd),
                       ("runtime.attention_backward", runtime_bwd),
                       ("op forward", op_fwd), ("op backward", op_bwd), ("op forward+backward (autograd)", op_fwdbwd),
                       ("op forward, soft mask", soft_fwd), ("op backward, soft mask", soft_bwd),
                       ("torch.empty like q", empty), ("python sum(range(200))", python_only)):
        def synced():
            step()
            torch.cuda.synchronize()
        print(f"  {var} {name:32s} {per_call_us(step):7.1f} us/call back to back, {per_call_us(synced):7.1f} synced",
              flush=True)


def breakdown(var, fn, q, k, v, g, n=300):
    """Host time per compiled forward+backward, split by layer: each of our Python layers is wrapped with a
    timer (inclusive times); what is left is dispatch, AOT autograd and the autograd engine."""
    from attn_inductor import runtime
    from attn_inductor.templates import launch

    # after a site's first call the op skips runtime.attention_* and core_* (Note [call sites] in runtime.py):
    # run_forward / run_backward are what every call runs
    layers_ = [(runtime, "attention_forward"), (runtime, "attention_backward"), (launch, "core_forward"),
               (launch, "core_backward"), (launch, "run_forward"), (launch, "run_backward"),
               (launch, "_run_kernel")]
    spent = {name: 0.0 for _, name in layers_}
    saved = {}

    def timed(mod, name):
        inner = getattr(mod, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0
        return inner, wrapper

    for mod, name in layers_:
        saved[(mod, name)], wrapped = timed(mod, name)
        setattr(mod, name, wrapped)
    try:
        def fwdbwd():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(g)
        for _ in range(20):
            fwdbwd()
        torch.cuda.synchronize()
        for key in spent:
            spent[key] = 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            fwdbwd()
        torch.cuda.synchronize()
        total = (time.perf_counter() - t0) / n * 1e6
    finally:
        for (mod, name), inner in saved.items():
            setattr(mod, name, inner)
    parts = ", ".join(f"{name} {spent[name] / n * 1e6:.1f}" for _, name in layers_)
    print(f"  {var} breakdown of a compiled fwd+bwd ({total:.1f} us/call): {parts} us/call (inclusive)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="causal,document")
    p.add_argument("--shape", default="1,1,128,64")
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument("--trace", action="store_true", help="torch.profiler table of ours (CPU ops and kernels)")
    a = p.parse_args(argv)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import attn_inductor  # noqa: F401

    B, H, S, D = map(int, a.shape.split(","))
    q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    g = torch.randn_like(q)
    flex_c = torch.compile(flex_attention, dynamic=False)
    for var in a.variants.split(","):
        vt = Variant(var, B, H, S, "cuda", torch.bfloat16)
        torch._dynamo.reset()
        ours = torch.compile(vt.naive(), backend="flexattn", dynamic=False)
        bm = create_block_mask(vt.mm, None, None, S, S, device="cuda") if vt.mm else None
        flex = lambda q, k, v: flex_c(q, k, v, score_mod=vt.sm, block_mask=bm)  # noqa: E731
        for name, fn in (("ours", ours), ("flex", flex)):
            fwd, fwdbwd = make_step(fn, (q, k, v), False), make_step(fn, (q, k, v), True, g)
            print(f"{var:9s} {name:5s} fwd {per_call_us(fwd):7.1f} us   fwd+bwd {per_call_us(fwdbwd):7.1f} us",
                  flush=True)
        # after hundreds of calls (direct launches, Note [static launches]) ours still computes what Flex does
        q.grad = k.grad = v.grad = None
        out = ours(q, k, v)
        out.backward(g)
        mine = [out.detach().float()] + [t.grad.float() for t in (q, k, v)]
        q.grad = k.grad = v.grad = None
        ref = flex(q, k, v)
        ref.backward(g)
        theirs = [ref.detach().float()] + [t.grad.float() for t in (q, k, v)]
        errs = [(a - b).abs().max().item() / max(b.abs().max().item(), 1e-6) for a, b in zip(mine, theirs)]
        from attn_inductor.templates import launch
        print(f"  {var} max rel. difference to Flex (out, dq, dk, dv): " + ", ".join(f"{e:.1e}" for e in errs)
              + f"; direct-launch form {launch._static_form['form']}", flush=True)
        assert max(errs) < 5e-2, errs
        breakdown(var, ours, q, k, v, g)
        if var in LAYER_SPECS:
            layers(var, q, k, v, g)
        if a.trace:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
                for _ in range(20):
                    q.grad = k.grad = v.grad = None
                    ours(q, k, v).backward(g)
                torch.cuda.synchronize()
            table = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.profile_rows,
                                            max_name_column_width=70)
            print(table, flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            q.grad = k.grad = v.grad = None
            ours(q, k, v).backward(g)
        torch.cuda.synchronize()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(a.profile_rows)
        print(s.getvalue(), flush=True)


if __name__ == "__main__":
    sys.exit(main())
