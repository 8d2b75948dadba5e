"""Kernel-level profile of one variant's forward+backward (ours vs FlexAttention) with torch.profiler.

    python benchmarks/profile_bwd.py --variant sliding
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import Variant  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="sliding")
    p.add_argument("--shape", default="2,16,8192,128")
    a = p.parse_args(argv)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torch.profiler import ProfilerActivity, profile

    import attn_inductor  # noqa: F401

    B, H, S, D = map(int, a.shape.split(","))
    vt = Variant(a.variant, B, H, S, "cuda", torch.bfloat16)
    q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    g = torch.randn_like(q)
    ours = torch.compile(vt.naive(), backend="flexattn", dynamic=False)
    bm = create_block_mask(vt.mm, None, None, S, S, device="cuda") if vt.mm else None
    flex_c = torch.compile(flex_attention, dynamic=False)
    flex = lambda q, k, v: flex_c(q, k, v, score_mod=vt.sm, block_mask=bm)  # noqa: E731
    for name, fn in (("ours", ours), ("flex", flex)):
        for _ in range(3):
            fn(q, k, v).backward(g)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn(q, k, v).backward(g)
            torch.cuda.synchronize()
        print(f"===== {name} {a.variant} (5 iterations)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    sys.exit(main())
