"""GPU correctness sweep for the rewritten naive variants (forward and backward), judged by the
project's numerics rule against an fp64 oracle.  Prints one line per case and a summary; exits 1 on
any failure.  Run on the device machine:  python benchmarks/gpu_check.py --shapes 2x1024,1x4097
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import Variant  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="2x1024,1x1000")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dims", default="64,128")
    p.add_argument("--variants", default="full,causal,alibi,softcap,sliding,document,relbias")
    p.add_argument("--dtypes", default="bfloat16")
    a = p.parse_args(argv)
    import attn_inductor  # noqa: F401
    from attn_inductor.testing.numerics import assert_close_to_reference

    failures = 0
    total = 0
    for shape in a.shapes.split(","):
        B, S = map(int, shape.split("x"))
        for D in map(int, a.dims.split(",")):
            for dtn in a.dtypes.split(","):
                dt = getattr(torch, dtn)
                for var in a.variants.split(","):
                    total += 1
                    name = f"{var:9s} B{B} S{S} D{D} {dtn}"
                    try:
                        torch.manual_seed(0)
                        vt = Variant(var, B, a.heads, S, "cuda", dt)
                        fn = vt.naive()
                        base = [torch.randn(B, a.heads, S, D, device="cuda") for _ in range(3)]
                        x_lp = [t.to(dt).requires_grad_(True) for t in base]
                        x_ours = [t.to(dt).requires_grad_(True) for t in base]
                        x_64 = [t.to(dt).double().requires_grad_(True) for t in base]
                        torch._dynamo.reset()
                        torch._dynamo.utils.counters.clear()
                        ours = torch.compile(fn, backend="flexattn", dynamic=False)(*x_ours)
                        assert torch._dynamo.utils.counters["attn_inductor"]["rewritten"] == 1, "not rewritten"
                        ref = fn(*x_64)
                        eager = fn(*x_lp)
                        g = torch.randn_like(ref)
                        ours.backward(g.to(dt))
                        ref.backward(g)
                        eager.backward(g.to(dt))
                        assert_close_to_reference(ours.detach(), ref.detach(), eager.detach(), name="out")
                        for i, n in enumerate("qkv"):
                            assert_close_to_reference(x_ours[i].grad, x_64[i].grad, x_lp[i].grad, name=f"d{n}")
                        err = (ours.double() - ref).abs().max().item()
                        eerr = (eager.double() - ref).abs().max().item()
                        print(f"PASS {name}  out err {err:.2e} (eager {eerr:.2e})", flush=True)
                    except Exception as exc:  # noqa: BLE001
                        failures += 1
                        print(f"FAIL {name}  {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                        traceback.print_exc(limit=3)
    print(f"{total - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
