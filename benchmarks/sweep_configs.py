"""Sweep the Triton kernels' tile configs on the GPU (forward and backward) against FlexAttention.

Calls the op directly (no torch.compile around it) for hand-built specs, so each config costs one
Triton compile.  Configs come in through ``ATTN_INDUCTOR_FWD_CONFIG`` / ``ATTN_INDUCTOR_BWD_CONFIG``
(templates/configs.py); results go to ``--out`` as JSON.

    python benchmarks/sweep_configs.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

FWD = ["128,64,8,3", "128,128,8,3", "128,64,4,3", "128,128,8,2", "128,32,4,3", "64,64,4,3", "128,64,8,4"]
BWD = ["32,128,128,64,8,3", "64,128,128,64,8,3", "64,64,64,64,4,3", "32,64,64,32,4,3", "64,128,128,64,8,2",
       "64,64,64,128,8,3", "32,128,128,32,4,3"]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="full,causal,softcap")
    p.add_argument("--fwd", default=";".join(FWD))
    p.add_argument("--bwd", default=";".join(BWD))
    p.add_argument("--shape", default="2,16,8192,128")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args(argv)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from triton.testing import do_bench

    from attn_inductor.lowering import expr as E
    from attn_inductor.lowering.spec import AttentionSpec
    from attn_inductor.ops import call_attention

    B, H, S, D = map(int, a.shape.split(","))
    causal = E.call("ge", E.q_idx, E.kv_idx, dtype=E.BOOL)
    softcap = E.call("mul", E.call("tanh", E.call("truediv", E.score, E.const(50.0, "float32"), dtype="float32"),
                                   dtype="float32"), E.const(50.0, "float32"), dtype="float32")
    specs = {
        "full": (AttentionSpec(score_live=E.score, scale=D ** -0.5), None, None),
        "causal": (AttentionSpec(score_live=E.score, mask=causal, scale=D ** -0.5), None, lambda b, h, q, k: q >= k),
        "softcap": (AttentionSpec(score_live=softcap, mask=causal, scale=D ** -0.5),
                    lambda s, b, h, q, k: torch.tanh(s / 50) * 50, lambda b, h, q, k: q >= k),
    }
    flex_c = torch.compile(flex_attention, dynamic=False)
    rows = []
    q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    g = torch.randn_like(q)

    def time_fwd(fn):
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()
        with torch.no_grad():
            return do_bench(fn, warmup=25, rep=100, return_mode="median")

    def time_bwd(fn):
        def step():
            q.grad = k.grad = v.grad = None
            fn().backward(g)
        step()
        torch.cuda.synchronize()
        return do_bench(step, warmup=25, rep=100, return_mode="median")

    for var in a.variants.split(","):
        spec, sm, mm = specs[var]
        bm = create_block_mask(mm, None, None, S, S, device="cuda") if mm else None
        flex = lambda: flex_c(q, k, v, score_mod=sm, block_mask=bm)  # noqa: E731
        ref = {"fwd": time_fwd(flex), "fwdbwd": time_bwd(flex)}
        print(json.dumps({"variant": var, "impl": "flex", **ref}), flush=True)
        ours = lambda: call_attention(q, k, v, [], spec)  # noqa: E731
        for cfg in a.fwd.split(";"):
            os.environ["ATTN_INDUCTOR_FWD_CONFIG"] = cfg
            try:
                ms = time_fwd(ours)
                rec = {"variant": var, "pass": "fwd", "cfg": cfg, "ms": round(ms, 4), "ratio": round(ref["fwd"] / ms, 3)}
            except Exception as exc:  # noqa: BLE001
                rec = {"variant": var, "pass": "fwd", "cfg": cfg, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            rows.append(rec)
            print(json.dumps(rec), flush=True)
        os.environ.pop("ATTN_INDUCTOR_FWD_CONFIG", None)
        for cfg in a.bwd.split(";"):
            os.environ["ATTN_INDUCTOR_BWD_CONFIG"] = cfg
            try:
                ms = time_bwd(ours)
                rec = {"variant": var, "pass": "fwd+bwd", "cfg": cfg, "ms": round(ms, 4),
                       "ratio": round(ref["fwdbwd"] / ms, 3)}
            except Exception as exc:  # noqa: BLE001
                rec = {"variant": var, "pass": "fwd+bwd", "cfg": cfg, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            rows.append(rec)
            print(json.dumps(rec), flush=True)
        os.environ.pop("ATTN_INDUCTOR_BWD_CONFIG", None)
        rows.append({"variant": var, "impl": "flex", **ref})
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "git_sha": os.environ.get("GIT_SHA", "?"),
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
