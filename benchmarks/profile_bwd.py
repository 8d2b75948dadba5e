"""Kernel-level profile of one variant (ours vs FlexAttention) with torch.profiler.

For each implementation and pass (forward, forward+backward): the per-iteration wall time with
the GPU kept busy (host overhead shows up when it exceeds the kernels' time), the GPU time summed
over kernels, and the table of kernels.

    python benchmarks/profile_bwd.py --variants sliding,document --passes fwd,fwdbwd
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import Variant  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="sliding")
    p.add_argument("--passes", default="fwdbwd")
    p.add_argument("--shape", default="2,16,8192,128")
    p.add_argument("--rows", type=int, default=12)
    a = p.parse_args(argv)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torch.profiler import ProfilerActivity, profile

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
        for kind in a.passes.split(","):
            for name, fn in (("ours", ours), ("flex", flex)):
                if kind == "fwd":
                    def step():
                        with torch.no_grad():
                            fn(q, k, v)
                else:
                    def step():
                        q.grad = k.grad = v.grad = None
                        fn(q, k, v).backward(g)
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                n = 20
                t0 = time.perf_counter()
                for _ in range(n):
                    step()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / n * 1e3
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        step()
                    torch.cuda.synchronize()
                events = prof.key_averages()
                gpu_us = sum(e.self_device_time_total for e in events) / 5
                print(f"===== {var} {kind} {name}: wall {wall:.3f} ms/iter (back to back), kernels {gpu_us / 1e3:.3f} "
                      f"ms/iter", flush=True)
                print(events.table(sort_by="self_device_time_total", row_limit=a.rows, max_name_column_width=50),
                      flush=True)


if __name__ == "__main__":
    sys.exit(main())
