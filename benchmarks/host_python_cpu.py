"""Our Python per call of the attention op, on any machine: the Triton launch itself is stubbed out.

With ``TRITON_INTERPRET=1`` the op takes CPU tensors down the same launch path the GPU takes (plans,
sparsity, argument packing), so the host cost of everything but the launch can be tracked without a
GPU.  Regressions it catches: a call site that misses its launch plan every call (what soft masks did
before dd6a531), per-call work that should be cached.

    python benchmarks/host_python_cpu.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import torch  # noqa: E402


def per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = p.parse_args(argv)
    import triton

    from attn_inductor.lowering import expr as E
    from attn_inductor.lowering.spec import AttentionSpec
    from attn_inductor.ops import default_config
    from attn_inductor.templates import launch

    launch._run_kernel = lambda *args, **kwargs: None  # measure the Python around the launch only
    q, k, v, g = (torch.randn(1, 1, 128, 64) for _ in range(4))
    causal = E.call("ge", E.q_idx, E.kv_idx, dtype=E.BOOL)
    keep = torch.ones(1, 128, dtype=torch.bool)
    cases = {
        "causal": (AttentionSpec(score_live=E.score, mask=causal, scale=0.125), []),
        "causal + soft key padding": (AttentionSpec(score_live=E.score, mask=causal, scale=0.125, num_captured=1,
                                                    soft_mask=E.Load(0, (E.b, E.kv_idx), E.BOOL)), [keep]),
        "causal & key padding (hard)": (AttentionSpec(score_live=E.score, mask=E.and_(
            causal, E.Load(0, (E.b, E.kv_idx), E.BOOL)), scale=0.125, num_captured=1), [keep]),
        "causal & document ids": (AttentionSpec(score_live=E.score, mask=E.and_(causal, E.call(
            "eq", E.Load(0, (E.q_idx,), E.INT64), E.Load(0, (E.kv_idx,), E.INT64), dtype=E.BOOL)), scale=0.125,
            num_captured=1), [torch.arange(128) // 40]),
        "causal + ALiBi": (AttentionSpec(score_live=E.call("sub", E.score, E.call(
            "mul", E.Load(0, (E.h,), "float32"), E.call("abs", E.call("sub", E.q_idx, E.kv_idx, dtype=E.INT64),
                                                        dtype=E.INT64), dtype="float32"), dtype="float32"),
            mask=causal, scale=0.125, num_captured=1), [torch.rand(1)]),
    }
    cfg = default_config(impl="triton")
    sha = os.environ.get("GIT_SHA") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                      text=True).stdout.strip()
    head = (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"triton {triton.__version__}, git {sha}, {time.strftime('%Y-%m-%d %H:%M:%S')}; launches stubbed, "
            "B=1 H=1 L=128 D=64 fp32")
    lines = [head, "", "| spec | op forward us | op backward us | plans after |", "|---|---|---|---|"]
    for name, (spec, captured) in cases.items():
        sj = spec.to_json()
        out = torch.ops.attn_inductor.attention.default(q, k, v, captured, sj, cfg)
        needs = [False] * len(captured)
        fwd = min(per_call_us(lambda: torch.ops.attn_inductor.attention.default(q, k, v, captured, sj, cfg), n=1000)
                  for _ in range(5))
        bwd = min(per_call_us(lambda: torch.ops.attn_inductor.attention_backward.default(
            q, k, v, *out, g, captured, needs, sj, cfg), n=1000) for _ in range(5))
        lines.append(f"| {name} | {fwd:.1f} | {bwd:.1f} | {len(launch._plans)} |")
    # a padding mask that is a new tensor every call, as a training loop passes (Note [changing mask tensors])
    spec, _ = cases["causal & key padding (hard)"]
    sj = spec.to_json()
    masks = [torch.rand(1, 128) > 0.1 for _ in range(64)]
    for m in masks:
        m[0, 0] = True
    it = iter(range(10 ** 9))

    def fresh():
        return [masks[next(it) % len(masks)].clone()]

    out = torch.ops.attn_inductor.attention.default(q, k, v, fresh(), sj, cfg)
    fwd = per_call_us(lambda: torch.ops.attn_inductor.attention.default(q, k, v, fresh(), sj, cfg), n=300)
    bwd = per_call_us(lambda: torch.ops.attn_inductor.attention_backward.default(
        q, k, v, *out, g, fresh(), [False], sj, cfg), n=300)
    lines.append(f"| causal & key padding, a new mask every call | {fwd:.1f} | {bwd:.1f} | {len(launch._plans)} |")
    lines += ["", "Compiled naive attention (bench_attention's spellings, B=1 H=2 L=256 D=64 fp32, Inductor caches "
              "off), launches stubbed, us per call:", "",
              "| variant | forward (no grad) | forward+backward |", "|---|---|---|"]
    lines += compiled_rows()
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"host_python_cpu_{sha}.md"), "w") as f:
        f.write(text)


def compiled_rows() -> list[str]:
    """The whole compiled call (Dynamo guards, AOT autograd, Inductor's wrapper, our op) per variant."""
    sys.path.insert(0, os.path.dirname(__file__))
    from bench_attention import Variant, step

    import attn_inductor  # noqa: F401

    torch._inductor.config.force_disable_caches = True
    rows = []
    for name in ("causal", "document", "alibi"):
        vt = Variant(name, 1, 2, 256, "cpu", torch.float32)
        torch._dynamo.reset()
        fn = torch.compile(vt.naive(), backend="flexattn", dynamic=False)
        q, k, v = (torch.randn(1, 2, 256, 64, requires_grad=True) for _ in range(3))
        g = torch.randn(1, 2, 256, 64)
        fn(q, k, v).backward(g)  # compile first (main() has stubbed the launch already)
        fwd, fwd_bwd = step(fn, (q, k, v), False), step(fn, (q, k, v), True, g)
        f = min(per_call_us(fwd, n=300) for _ in range(5))
        b = min(per_call_us(fwd_bwd, n=300) for _ in range(5))
        rows.append(f"| {name} | {f:.1f} | {b:.1f} |")
    return rows


if __name__ == "__main__":
    sys.exit(main())
