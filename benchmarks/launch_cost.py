"""Host cost of one kernel launch, layer by layer, on the GPU host (µs per call, back to back).

Separates what Triton's launcher costs for a kernel with few arguments, for one with as many
arguments as ours, and for our kernels themselves (the JIT path, the kept CompiledKernel, a cached
runner), so host-time work is aimed at the layer that costs.

    python benchmarks/launch_cost.py
"""
from __future__ import annotations

import sys
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _tiny(X, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _many(X, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9,
          c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9,
          e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, f0, f1, f2, f3, f4, f5, f6, f7, f8, f9,
          Y0, Y1, Y2, Y3, Y4, Y5, Y6, Y7, Y8, Y9, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs) + a0 + f9)


def per_call(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    x = torch.zeros(1024, device="cuda")
    ys = [torch.zeros(16, device="cuda") for _ in range(10)]
    ints = list(range(3, 63))
    k = _tiny[(1,)](x, 100, BLOCK=128)
    print(f"tiny kernel, JIT launch            {per_call(lambda: _tiny[(1,)](x, 100, BLOCK=128)):7.1f} us")
    tiny_args, many_args = [(x, 100)], [(x, *ints, *ys)]
    for form in ("with constexprs", "runtime only"):
        extra = (128,) if form == "with constexprs" else ()
        try:
            k[(1, 1, 1)](*tiny_args[0], *extra)
        except TypeError:
            continue
        print(f"tiny kernel, CompiledKernel[grid] ({form})  {per_call(lambda: k[(1, 1, 1)](x, 100, *extra)):7.1f} us")
        run = k[(1, 1, 1)]
        print(f"tiny kernel, cached runner         {per_call(lambda: run(x, 100, *extra)):7.1f} us")
        m = _many[(1,)](*many_args[0], BLOCK=128)
        print(f"70-arg kernel, JIT launch          "
              f"{per_call(lambda: _many[(1,)](*many_args[0], BLOCK=128)):7.1f} us")
        print(f"70-arg kernel, CompiledKernel      {per_call(lambda: m[(1, 1, 1)](*many_args[0], *extra)):7.1f} us")
        break
    print(f"torch.empty(1024)                  {per_call(lambda: torch.empty(1024, device='cuda')):7.1f} us")
    print(f"x.data_ptr()                       {per_call(lambda: x.data_ptr()):7.1f} us")
    print(f"x.stride()                         {per_call(lambda: x.stride()):7.1f} us")

    # our kernels: capture the direct launches of a causal forward+backward and time them alone
    sys.path.insert(0, "src")
    from attn_inductor.lowering import expr as E
    from attn_inductor.templates import launch

    q, kk, v = [torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    g = torch.randn_like(q)
    mask = E.call("ge", E.q_idx, E.kv_idx, dtype=E.BOOL)

    def fwd():
        return launch.core_forward(q, kk, v, [], score=E.score, mask=mask, scale=0.125, gqa_group=1, sparsity=None)

    def bwd(o, lse):
        launch.core_backward(q, kk, v, o, lse, g, [], [], score=E.score, mask=mask, scale=0.125, gqa_group=1,
                             sparsity=None)
    o, lse = fwd()
    bwd(o, lse)
    o, lse = fwd()
    bwd(o, lse)
    print(f"launch.core_forward                {per_call(fwd):7.1f} us")
    print(f"launch.core_backward               {per_call(lambda: bwd(o, lse)):7.1f} us")
    captured = []
    real = launch._run_kernel

    def spy(kernel, grid, args, kwargs, site):
        captured.append((kernel, grid, args, kwargs, site))
        return real(kernel, grid, args, kwargs, site)
    launch._run_kernel = spy
    try:
        fwd()
        bwd(o, lse)
    finally:
        launch._run_kernel = real
    for kernel, grid, args, kwargs, site in captured:
        name = kernel.fn.__name__
        print(f"{name}: {len(args)} runtime arguments")
        print(f"  _run_kernel (direct launch path) {per_call(lambda: real(kernel, grid, args, kwargs, site)):7.1f} us")
        print(f"  JIT kernel[grid](...)            {per_call(lambda: kernel[grid](*args, **kwargs)):7.1f} us")
        kept, local = site
        hits = [val for key, val in kept.items() if key[0] == local and key != ("positions", local)]
        if hits:
            compiled, tail = hits[0]
            grid3 = tuple(grid) + (1,) * (3 - len(grid))
            print(f"  CompiledKernel[grid](*args,tail) {per_call(lambda: compiled[grid3](*(args + tail))):7.1f} us")
            runner = compiled[grid3]
            print(f"  cached runner(*args, tail)       {per_call(lambda: runner(*(args + tail))):7.1f} us")


if __name__ == "__main__":
    main()
