"""Is a call host-bound?  Per variant and implementation: do_bench's median, the GPU's own time per call
(calls queued behind a GPU sleep, so the host never starves the GPU), and the host's time per call
(measured while the GPU is still asleep, so the host never waits for it).

If ``host`` exceeds ``gpu``, the call is host-bound and ``bench`` follows the host; ``blocked`` says a
call waited for the GPU (a sync, or a host slower than the sleep).  Variants and naive spellings are
``bench_attention.py``'s; ``*_ro`` impls compile with ``mode="reduce-overhead"`` (CUDA graphs).

    python benchmarks/host_vs_gpu.py --shape 16x1024 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import Variant, git_sha, step  # noqa: E402


def host_and_gpu_ms(run, calls=20, sleep_cycles=int(4e8)):
    """Host ms per call (GPU kept busy by a sleep queued first) and GPU ms per call (back to back)."""
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(sleep_cycles)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        run()
    host = (time.perf_counter() - t0) / calls * 1e3
    blocked = start.query()  # the sleep ended before the host finished queuing
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / calls, blocked


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="16x1024")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--variants", default="full,causal,alibi,document")
    p.add_argument("--impls", default="ours,flex")
    p.add_argument("--passes", default="fwd,bwd")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)

    import triton
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from triton.testing import do_bench

    import attn_inductor  # noqa: F401

    dev, dt = "cuda", torch.bfloat16
    B, S = map(int, a.shape.split("x"))
    H, D = a.heads, a.dim
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "git_sha": git_sha(), "shape": f"B{B} H{H} S{S} D{D} bf16", "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps(env), flush=True)
    rows = []
    for var in a.variants.split(","):
        for pas in a.passes.split(","):
            bwd = pas == "bwd"
            for impl in a.impls.split(","):
                torch._dynamo.reset()
                torch.manual_seed(0)
                q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt, requires_grad=bwd) for _ in range(3))
                vt = Variant(var, B, H, S, dev, dt)
                mode = "reduce-overhead" if impl.endswith("_ro") else None
                rec = dict(variant=var, impl=impl, bwd=bwd)
                try:
                    if impl.startswith("ours"):
                        fn = torch.compile(vt.naive(), backend="flexattn", dynamic=False, mode=mode)
                    else:
                        bm = create_block_mask(vt.mm, None, None, S, S, device=dev) if vt.mm else None
                        flex_c = torch.compile(flex_attention, dynamic=False, mode=mode)
                        fn = (lambda bm_: lambda q, k, v: flex_c(q, k, v, score_mod=vt.sm, block_mask=bm_))(bm)
                    run = step(fn, (q, k, v), bwd)
                    for _ in range(3):
                        run()
                    host, gpu, blocked = host_and_gpu_ms(run)
                    bench = do_bench(run, warmup=25, rep=100, return_mode="median")
                    rec.update(bench_ms=round(bench, 4), gpu_ms=round(gpu, 4), host_ms=round(host, 4),
                               blocked=bool(blocked), status="ok")
                except Exception as exc:  # noqa: BLE001
                    rec["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
                    traceback.print_exc()
                rows.append(rec)
                print(json.dumps(rec), flush=True)
                del q, k, v
                torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    tag = a.tag or a.shape
    path = os.path.join(a.out, f"host_vs_gpu_{tag}.json")
    with open(path, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    lines = [f"GPU {env['gpu']}, torch {env['torch']}, triton {env['triton']}, git {env['git_sha'][:10]}, "
             f"{env['shape']}, {env['date']}", "",
             "| variant | pass | impl | bench ms | GPU ms (back to back) | host ms per call | host waited |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {'fwd+bwd' if r['bwd'] else 'fwd'} | {r['impl']} | {r['status']} | | | |")
            continue
        lines.append(f"| {r['variant']} | {'fwd+bwd' if r['bwd'] else 'fwd'} | {r['impl']} | {r['bench_ms']:.3f} | "
                     f"{r['gpu_ms']:.3f} | {r['host_ms']:.3f} | {'yes' if r['blocked'] else 'no'} |")
    with open(path.replace(".json", ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
