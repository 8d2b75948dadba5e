"""Sweep the Triton kernels' tile configs on the GPU (forward and backward) against FlexAttention.

Runs the naive code of each variant of ``bench_attention.py`` compiled with ``backend="flexattn"``
(so the numbers include the runtime around the kernels, as users see them) next to the same
FlexAttention reference.  Configs reach the kernels through ``ATTN_INDUCTOR_FWD_CONFIG`` /
``ATTN_INDUCTOR_BWD_CONFIG`` (templates/configs.py), which are read at every call: a new config
costs one Triton compile, no recompile of the model.  Results go to ``--out`` as JSON.

    python benchmarks/sweep_configs.py --variants causal,softcap --bwd "64,128,128,64,8,3;32,128,128,64,8,3" \
        --fwd "" --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import Variant, git_sha  # noqa: E402

FWD = ["128,64,8,3", "128,128,8,3", "128,64,4,3", "128,128,8,2", "128,32,4,3", "64,64,4,3", "128,64,8,4"]
BWD = ["64,128,128,64,8,3", "64,128,128,64,8,2", "32,128,128,64,8,3", "64,64,64,64,8,3", "32,64,64,64,4,3"]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="causal,softcap,alibi,document")
    p.add_argument("--fwd", default=";".join(FWD), help="';'-separated block_m,block_n,warps,stages ('' = none)")
    p.add_argument("--bwd", default=";".join(BWD), help="';'-separated block_m1,block_n1,block_m2,block_n2,warps,"
                                                        "stages ('' = none)")
    p.add_argument("--shape", default="2,16,8192,128")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--deterministic", action="store_true", help="also time deterministic=True (unfused dQ)")
    p.add_argument("--deadline", type=float, default=0.0, help="stop starting configs after this many seconds")
    a = p.parse_args(argv)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from triton.testing import do_bench

    import attn_inductor  # noqa: F401

    start = time.time()
    B, H, S, D = map(int, a.shape.split(","))
    flex_c = torch.compile(flex_attention, dynamic=False)
    rows = []
    q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    g = torch.randn_like(q)

    def time_fwd(fn):
        with torch.no_grad():
            fn(q, k, v)
            torch.cuda.synchronize()
            return do_bench(lambda: fn(q, k, v), warmup=25, rep=100, return_mode="median")

    def time_bwd(fn):
        def step():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(g)
        step()
        torch.cuda.synchronize()
        return do_bench(step, warmup=25, rep=100, return_mode="median")

    def sweep(var, kind, configs, env_name, timer, ref):
        for cfg in [c for c in configs.split(";") if c]:
            if a.deadline and time.time() - start > a.deadline:
                print(json.dumps({"skipped": cfg, "variant": var, "reason": "deadline"}), flush=True)
                continue
            os.environ[env_name] = cfg
            try:
                ms = timer(ours)
                rec = {"variant": var, "pass": kind, "cfg": cfg, "ms": round(ms, 4), "ratio": round(ref / ms, 3)}
            except Exception as exc:  # noqa: BLE001
                rec = {"variant": var, "pass": kind, "cfg": cfg, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            rows.append(rec)
            print(json.dumps(rec), flush=True)
        os.environ.pop(env_name, None)

    for var in a.variants.split(","):
        vt = Variant(var, B, H, S, "cuda", torch.bfloat16)
        bm = create_block_mask(vt.mm, None, None, S, S, device="cuda") if vt.mm else None
        flex = lambda q_, k_, v_: flex_c(q_, k_, v_, score_mod=vt.sm, block_mask=bm)  # noqa: E731
        torch._dynamo.reset()
        ours = torch.compile(vt.naive(), backend="flexattn", dynamic=False)
        ref = {"fwd": time_fwd(flex) if a.fwd else None, "fwd+bwd": time_bwd(flex) if a.bwd else None}
        rows.append({"variant": var, "impl": "flex", **ref})
        print(json.dumps(rows[-1]), flush=True)
        if a.fwd:
            sweep(var, "fwd", a.fwd, "ATTN_INDUCTOR_FWD_CONFIG", time_fwd, ref["fwd"])
        if a.bwd:
            sweep(var, "fwd+bwd", a.bwd, "ATTN_INDUCTOR_BWD_CONFIG", time_bwd, ref["fwd+bwd"])
            if a.deterministic:  # the unfused backward (separate dQ kernel) at the default config
                torch._dynamo.reset()
                det = torch.compile(vt.naive(), backend="flexattn", dynamic=False,
                                    options={"deterministic": True})
                ms = time_bwd(det)
                rows.append({"variant": var, "pass": "fwd+bwd", "cfg": "default, deterministic", "ms": round(ms, 4),
                             "ratio": round(ref["fwd+bwd"] / ms, 3)})
                print(json.dumps(rows[-1]), flush=True)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "git_sha": git_sha(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "shape": a.shape}
    with open(os.path.join(a.out, "sweep.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    best = {}
    for r in rows:
        if "ratio" in r:
            key = (r["variant"], r["pass"])
            if key not in best or r["ratio"] > best[key]["ratio"]:
                best[key] = r
    for key, r in sorted(best.items()):
        print("BEST", key, r["cfg"], r["ms"], r["ratio"])


if __name__ == "__main__":
    sys.exit(main())
