"""One harness, one GPU, one run: naive attention rewritten by attn_inductor vs FlexAttention vs SDPA vs
stock Inductor, for the variants of shared/ANCHORS.md, forward and forward+backward.

``ours`` is the *naive* code of each variant — written the way a model writes it, masks built from
``arange`` inside the function — compiled with ``backend="flexattn"``.  ``flex`` is hand-written
``score_mod``/``mask_mod`` with a compiled ``create_block_mask`` (built once, outside the timing, as
FlexAttention users do); ``sdpa`` uses ``is_causal`` where it can, else a dense additive mask;
``inductor`` is the naive code under stock ``torch.compile``.

Cells: median ms (``triton.testing.do_bench``), effective TFLOP/s (dense FLOPs × fraction of
unmasked scores; forward+backward counted as 3.5 × forward), extra peak memory (GiB).  Each row
also carries ``max_err_vs_flex`` for ours.  Results: JSON + markdown under ``--out`` with the GPU
name, torch / triton versions and the git SHA (``GIT_SHA`` env or ``git rev-parse``).

    python benchmarks/bench_attention.py --shapes 2x8192 --bwd both --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

WINDOW, SOFTCAP, NDOCS = 1024, 50.0, 4


def alibi_slopes(h, dev):
    return torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device=dev)


def document_ids(S, dev):
    g = torch.Generator().manual_seed(0)
    cuts = sorted(torch.randint(1, S, (NDOCS - 1,), generator=g).tolist())
    doc = torch.zeros(S, dtype=torch.long)
    for c in cuts:
        doc[c:] += 1
    return doc.to(dev)


class Variant:
    """Naive module (what a model writes) + FlexAttention score_mod/mask_mod + SDPA kwargs."""

    def __init__(self, name, B, H, S, dev, dt):
        self.name, self.B, self.H, self.S = name, B, H, S
        self.extra = {}
        pos = torch.arange(S, device=dev)
        rel = pos[:, None] - pos[None, :]
        causal = rel >= 0
        self.sm = self.mm = None
        self.sdpa = {}
        self.density = 1.0
        if name in ("causal", "alibi", "softcap"):
            self.mm = lambda b, h, q, k: q >= k
            self.density = (S + 1) / (2 * S)
            self.sdpa = {"is_causal": True}
        if name == "alibi":
            sl = alibi_slopes(H, dev)
            self.extra["slopes"] = sl
            self.sm = lambda score, b, h, q, k: score - sl[h] * (q - k).abs()
            self.sdpa = {"attn_mask": (-sl[:, None, None] * rel[None].abs()).masked_fill(~causal, float("-inf"))
                         .to(dt)[None]}
        if name == "softcap":
            self.sm = lambda score, b, h, q, k: torch.tanh(score / SOFTCAP) * SOFTCAP
            self.sdpa = None
        if name == "sliding":
            m = causal & (rel < WINDOW)
            self.mm = lambda b, h, q, k: (q >= k) & (q - k < WINDOW)
            self.density = m.float().mean().item()
            self.sdpa = {"attn_mask": torch.zeros(S, S, device=dev, dtype=dt).masked_fill(~m, float("-inf"))}
        if name == "document":
            doc = document_ids(S, dev)
            self.extra["doc"] = doc
            m = causal & (doc[:, None] == doc[None, :])
            self.mm = lambda b, h, q, k: (q >= k) & (doc[q] == doc[k])
            self.density = m.float().mean().item()
            self.sdpa = {"attn_mask": torch.zeros(S, S, device=dev, dtype=dt).masked_fill(~m, float("-inf"))}
        if name == "relbias":
            table = torch.randn(H, 2 * S - 1, device=dev) * 0.1
            self.extra["table"] = table
            self.sm = lambda score, b, h, q, k: score + table[h, q - k + S - 1]
            self.sdpa = {"attn_mask": table[:, rel + S - 1].to(dt)[None]}

    def naive(self):
        """The unmodified-model spelling of this variant."""
        name, S = self.name, self.S
        ex = self.extra

        def fn(q, k, v):
            s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            s = s.float()
            i = torch.arange(s.shape[-2], device=s.device)[:, None]
            j = torch.arange(s.shape[-1], device=s.device)[None, :]
            if name == "alibi":
                s = s - ex["slopes"][:, None, None] * (i - j).abs()
            if name == "softcap":
                s = torch.tanh(s / SOFTCAP) * SOFTCAP
            if name == "relbias":
                s = s + ex["table"][:, i - j + S - 1]
            if name in ("causal", "alibi", "softcap"):
                s = s.masked_fill(i < j, float("-inf"))
            if name == "sliding":
                s = s.masked_fill((i < j) | (i - j >= WINDOW), float("-inf"))
            if name == "document":
                doc = ex["doc"]
                s = s.masked_fill((i < j) | (doc[:, None] != doc[None, :]), float("-inf"))
            return torch.matmul(torch.softmax(s, dim=-1).to(q.dtype), v)

        return fn


def step(fn, args, bwd, grad=None):
    """One timed call: ``fn(*args)`` without grad, or forward + backward of ``grad`` (random by default)
    with the inputs' gradients cleared first.  Every benchmark here times this same step."""
    if not bwd:
        def run():
            with torch.no_grad():
                return fn(*args)
        return run
    g = torch.randn_like(fn(*args)) if grad is None else grad

    def run():
        for a in args:
            a.grad = None
        fn(*args).backward(g)
    return run


def bench(fn, args, bwd):
    from triton.testing import do_bench

    run = step(fn, args, bwd)
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    ms = do_bench(run, warmup=25, rep=100, return_mode="median")
    return ms, peak


def git_sha():
    sha = os.environ.get("GIT_SHA")
    if sha:
        return sha
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="2x8192")          # BxS[,BxS...]
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--variants", default="full,causal,alibi,softcap,sliding,document,relbias")
    p.add_argument("--impls", default="ours,flex,sdpa,inductor")
    p.add_argument("--bwd", default="both", choices=("fwd", "bwd", "both"))
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)

    import triton
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import attn_inductor  # noqa: F401

    dev, dt = "cuda", torch.bfloat16
    flex_c = torch.compile(flex_attention, dynamic=False)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "git_sha": git_sha(), "dtype": "bfloat16", "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps(env), flush=True)
    rows = []
    modes = {"fwd": [False], "bwd": [True], "both": [False, True]}[a.bwd]
    for shape in a.shapes.split(","):
        B, S = map(int, shape.split("x"))
        H, D = a.heads, a.dim
        for var in a.variants.split(","):
            for bwd in modes:
                torch.manual_seed(0)
                q, k, v = [torch.randn(B, H, S, D, device=dev, dtype=dt, requires_grad=bwd) for _ in range(3)]
                vt = Variant(var, B, H, S, dev, dt)
                flops = 4 * B * H * S * S * D * vt.density * (3.5 if bwd else 1.0)
                flex_out = None
                results = {}
                for impl in a.impls.split(","):
                    rec = dict(shape=shape, B=B, S=S, H=H, D=D, variant=var, impl=impl, bwd=bwd,
                               density=round(vt.density, 4))
                    try:
                        torch._dynamo.reset()
                        counters.clear()
                        if impl == "ours":
                            fn = torch.compile(vt.naive(), backend="flexattn", dynamic=False)
                        elif impl == "inductor":
                            fn = torch.compile(vt.naive(), dynamic=False)
                        elif impl == "flex":
                            bm = None
                            if vt.mm is not None:
                                bm = create_block_mask(vt.mm, None, None, S, S, device=dev, _compile=True)
                            fn = (lambda bm_: lambda q, k, v: flex_c(q, k, v, score_mod=vt.sm, block_mask=bm_))(bm)
                        elif impl == "sdpa":
                            if vt.sdpa is None:
                                rec["status"] = "n/a (no softcap in SDPA)"
                                rows.append(rec)
                                continue
                            kw = vt.sdpa
                            fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw)  # noqa: E731
                        else:
                            raise ValueError(impl)
                        with torch.no_grad():
                            o = fn(q, k, v)
                        if impl == "flex":
                            flex_out = o.float()
                        if impl == "ours":
                            rec["rewritten"] = int(counters["attn_inductor"]["rewritten"])
                            results["ours_out"] = o.float()
                        ms, peak = bench(fn, (q, k, v), bwd)
                        rec.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1), peak_gib=round(peak, 3),
                                   status="ok")
                    except Exception as exc:  # noqa: BLE001
                        rec["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
                        traceback.print_exc()
                    rows.append(rec)
                    results[impl] = rec
                    print(json.dumps(rec), flush=True)
                if flex_out is not None and "ours_out" in results and "ours" in results:
                    results["ours"]["max_err_vs_flex"] = (results["ours_out"] - flex_out).abs().max().item()
                o_r, f_r = results.get("ours", {}), results.get("flex", {})
                if o_r.get("ms") and f_r.get("ms"):
                    o_r["ratio_vs_flex"] = round(f_r["ms"] / o_r["ms"], 3)   # ≥ 0.9 is the bar
                i_r = results.get("inductor", {})
                if o_r.get("ms") and i_r.get("ms"):
                    o_r["speedup_vs_inductor"] = round(i_r["ms"] / o_r["ms"], 2)
                del q, k, v
                torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    tag = a.tag or f"{a.shapes.replace(',', '_')}_H{a.heads}_D{a.dim}"
    path = os.path.join(a.out, f"attention_{tag}.json")
    with open(path, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    md = render_markdown(env, rows)
    with open(path.replace(".json", ".md"), "w") as f:
        f.write(md)
    print(md)


def render_markdown(env, rows) -> str:
    lines = [f"GPU {env['gpu']}, torch {env['torch']}, triton {env['triton']}, git {env['git_sha'][:10]}, "
             f"{env['dtype']}, {env['date']}", "",
             "| shape | variant | pass | ours ms (TF/s) | flex ms | sdpa ms | inductor ms | ours/flex speed | "
             "ours vs inductor | peak GiB ours/flex | max err vs flex |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["shape"], r["H"], r["D"], r["variant"], r["bwd"]), {})[r["impl"]] = r
    for (shape, H, D, var, bwd), rs in keyed.items():
        def ms(impl):
            r = rs.get(impl, {})
            return f"{r['ms']:.3f}" if r.get("ms") else (r.get("status", "-")[:20] if r else "-")
        o = rs.get("ours", {})
        f = rs.get("flex", {})
        lines.append(
            f"| {shape} H{H} D{D} | {var} | {'fwd+bwd' if bwd else 'fwd'} | "
            f"{ms('ours')} ({o.get('tflops', '-')}) | {ms('flex')} | {ms('sdpa')} | {ms('inductor')} | "
            f"{o.get('ratio_vs_flex', '-')} | {o.get('speedup_vs_inductor', '-')}x | "
            f"{o.get('peak_gib', '-')}/{f.get('peak_gib', '-')} | {o.get('max_err_vs_flex', '-')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
