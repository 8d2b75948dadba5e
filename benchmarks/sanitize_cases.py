"""A few small forward+backward cases for ``compute-sanitizer`` (out-of-bounds and racy accesses).

Odd lengths (tiles hanging over the end), GQA, a captured tensor with a gradient, a document-id
mask, fp32 and a non-power-of-two head dim: the places where masked loads and stores matter.
Run on the GPU machine:

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_cases.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/sanitize_cases.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def _chunked(size):
    from attn_inductor.lowering import expr as E

    c = E.const(size, E.INT64)
    return E.call("eq", E.call("floordiv", E.q_idx, c, dtype=E.INT64), E.call("floordiv", E.kv_idx, c, dtype=E.INT64),
                  dtype=E.BOOL)


def _live_rows(b, h, n):
    live = torch.ones(b, h, n, dtype=torch.bool)
    live[0, 1, n // 2:] = False  # rows that see nothing: NaN dq, NaN dk/dv of their kv head
    return live


def main() -> int:
    from attn_inductor.lowering import expr as E
    from attn_inductor.runtime import block_sparsity_for
    from attn_inductor.templates import launch
    from test_triton_kernels import alibi_score, causal_mask, document_mask, relbias_score, softcap_score

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run under TRITON_INTERPRET=1
    torch.manual_seed(0)
    cases = [
        ("causal gqa bf16 1000", dict(b=1, hq=4, hkv=2, lq=1000, lk=1000, d=128, score=E.score, mask=causal_mask())),
        ("softcap bf16 777", dict(b=1, hq=2, hkv=2, lq=777, lk=777, d=64, score=softcap_score(30.0),
                                  mask=causal_mask())),
        ("relbias+alibi grads bf16 513", dict(b=1, hq=2, hkv=2, lq=513, lk=513, d=80,
                                               score=E.call("add", relbias_score(513, 0),
                                                            E.call("sub", alibi_score(1), E.score, dtype="float32"),
                                                            dtype="float32"),
                                               mask=causal_mask(),
                                               captured=[torch.randn(2, 2 * 513 - 1), torch.rand(2)],
                                               needs=[True, True])),
        ("document fp32 300x451", dict(b=2, hq=2, hkv=1, lq=300, lk=451, d=96, score=E.score,
                                       mask=document_mask(), dtype=torch.float32,
                                       captured=[torch.randint(0, 3, (2, 451)).sort(-1).values], needs=[False])),
        ("chunked (closed-form bounds) bf16 700x901", dict(b=1, hq=4, hkv=1, lq=700, lk=901, d=64, score=E.score,
                                                           mask=_chunked(64))),
        ("dead rows, NaN gradients bf16 600", dict(b=2, hq=4, hkv=2, lq=600, lk=600, d=128, score=E.score,
                                                   mask=E.and_(causal_mask(), E.Load(0, (E.b, E.h, E.q_idx), "bool")),
                                                   captured=[_live_rows(2, 4, 600)], needs=[False], empty_rows="nan")),
    ]
    for name, c in cases:
        dtype = c.pop("dtype", torch.bfloat16)
        captured = [t.to(dev) for t in c.pop("captured", [])]
        needs = c.pop("needs", [False] * len(captured))
        b, hq, hkv, lq, lk, d = (c.pop(x) for x in ("b", "hq", "hkv", "lq", "lk", "d"))
        q = torch.randn(b, hq, lq, d, device=dev, dtype=dtype)
        k = torch.randn(b, hkv, lk, d, device=dev, dtype=dtype)
        v = torch.randn(b, hkv, lk, d, device=dev, dtype=dtype)
        sp = block_sparsity_for(c["mask"], q, k, captured, *launch.preferred_blocks(q, k, v))
        out, lse = launch.core_forward(q, k, v, captured, scale=d ** -0.5, gqa_group=hq // hkv, sparsity=sp, **c)
        grads = launch.core_backward(q, k, v, out, lse, torch.randn_like(out), captured, needs, scale=d ** -0.5,
                                     gqa_group=hq // hkv, sparsity=sp, **c)
        if dev == "cuda":
            torch.cuda.synchronize()
        finite = all(bool(torch.isfinite(t).all()) for t in (out, *grads[:3]))
        print(f"{name}: ran, outputs finite: {finite}" + (" (NaN expected)" if c.get("empty_rows") else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
