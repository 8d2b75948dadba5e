"""CPU path vs stock Inductor on the naive attention a model writes (fp32, forward and training).

Baseline: the unmodified function ``softmax(q·kᵀ·scale + mask) · v`` under
``torch.compile`` with the default backend, which materialises the score
matrix.  Ours: ``runtime`` composing ``cpu.py`` (what the flexattn backend runs
on CPU) for the same AttentionSpec; eager is run once per shape, as the
correctness check.  Rows go to ``benchmarks/results/bench_cpu_t{threads}.{json,md}``
with the CPU name, thread count, load average (the machine may be shared),
torch version and git SHA.

    PYTHONPATH=src python benchmarks/bench_cpu.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from attn_inductor import cpu, runtime
from attn_inductor.lowering import expr as E
from attn_inductor.lowering.spec import AttentionSpec

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW = 256


# ----------------------------------------------------------------------------- the two sides


def naive_attention(q, k, v, mask_kind: str):
    """What a model writes: a -inf additive mask built from aranges, softmax, matmul."""
    lq, lk = q.shape[-2], k.shape[-2]
    qi = torch.arange(lq, device=q.device)[:, None]
    ki = torch.arange(lk, device=q.device)[None, :]
    keep = ki <= qi
    if mask_kind == "sliding":
        keep = keep & (qi - ki < WINDOW)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def spec_for(mask_kind: str, d: int) -> AttentionSpec:
    mask = E.call("le", E.kv_idx, E.q_idx, dtype=E.BOOL)
    if mask_kind == "sliding":
        diff = E.call("sub", E.q_idx, E.kv_idx, dtype=E.INT64)
        mask = E.and_(mask, E.call("lt", diff, E.const(WINDOW, E.INT64), dtype=E.BOOL))
    return AttentionSpec(score_live=E.score, mask=mask, scale=d ** -0.5)


def ours_forward(spec, q, k, v):
    return runtime.attention_forward(spec, q, k, v, [], cpu)[0]


def ours_training(spec, q, k, v, grad_out):
    out, lse, lse_fb = runtime.attention_forward(spec, q, k, v, [], cpu)
    return runtime.attention_backward(spec, q, k, v, out, lse, lse_fb, grad_out, [], [], cpu)


def autograd_training(fn, q, k, v, grad_out):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)


# ----------------------------------------------------------------------------- harness


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and compile, for Inductor)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def machine() -> dict:
    name = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    return {"cpu": name, "threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
            "torch": torch.__version__, "git_sha": sha,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run(shapes, repeats: int) -> list[dict]:
    rows = []
    for (b, h, s, d) in shapes:
        for mask_kind in ("causal", "sliding"):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
            grad_out = torch.randn(b, h, s, d, generator=g)
            spec = spec_for(mask_kind, d)
            eager = lambda q, k, v: naive_attention(q, k, v, mask_kind)  # noqa: E731
            torch._dynamo.reset()
            inductor = torch.compile(eager, dynamic=False)
            with torch.no_grad():
                want = eager(q, k, v)
                err = (ours_forward(spec, q, k, v) - want).abs().max().item()
                fwd = {
                    "inductor": median_ms(lambda: inductor(q, k, v), repeats),
                    "ours": median_ms(lambda: ours_forward(spec, q, k, v), repeats),
                }
            train = {
                "inductor": median_ms(lambda: autograd_training(inductor, q, k, v, grad_out), repeats),
                "ours": median_ms(lambda: ours_training(spec, q, k, v, grad_out), repeats),
            }
            for mode, ms in (("fwd", fwd), ("fwd+bwd", train)):
                row = {"mask": mask_kind, "B": b, "H": h, "S": s, "D": d, "dtype": "float32", "mode": mode,
                       **{f"{k}_ms": round(t, 2) for k, t in ms.items()},
                       "speedup_vs_inductor": round(ms["inductor"] / ms["ours"], 2),
                       "max_abs_err_vs_eager": err}
                rows.append(row)
                print(json.dumps(row))
    return rows


def write(rows, info):
    RESULTS.mkdir(exist_ok=True)
    stem = f"bench_cpu_t{info['threads']}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# CPU path vs stock Inductor — {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
        f"git {info['git_sha']}, {info['date']} (1-min load average at start: {info['load_avg_1m']:.2f})",
        "",
        "Median of 3 runs after a warm-up, milliseconds; fp32; sliding = causal window of "
        f"{WINDOW}.  fwd+bwd = forward then gradients of q, k, v.",
        "",
        "| mask | B×H×S×D | mode | stock Inductor | ours | ours vs Inductor |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mask']} | {r['B']}×{r['H']}×{r['S']}×{r['D']} | {r['mode']} | "
                     f"{r['inductor_ms']} | {r['ours_ms']} | {r['speedup_vs_inductor']}× |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="S=1024 only")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [(1, 8, 1024, 64)] if args.quick else [(1, 8, 1024, 64), (1, 8, 2048, 64)]
    info = machine()
    rows = run(shapes, repeats=3)
    write(rows, info)
    assert all(math.isfinite(r["max_abs_err_vs_eager"]) and r["max_abs_err_vs_eager"] < 1e-4 for r in rows)


if __name__ == "__main__":
    main()
