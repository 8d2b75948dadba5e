"""Cross-compile the Triton kernels for Hopper (sm_90a) on a machine without a GPU.

The interpreter runs kernels as Python, so it accepts things the Triton compiler
rejects (non-constexpr globals, unsupported constructs in hooks) and it never
runs out of shared memory.  Here the real compiler (Triton's frontend, MLIR
passes, LLVM and ptxas, all shipped in the wheel) builds every kernel the
launcher would launch for a set of representative cases; a fake driver stands
in for CUDA and refuses kernels that exceed an H100's 227 KiB of shared memory,
exercising the launcher's fallback (Note [fitting the device] in launch.py).

Slow (about two minutes); skipped when the NVIDIA backend is not importable or
when TRITON_INTERPRET is set for the whole session.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
pytestmark = pytest.mark.slow

from attn_inductor.lowering import expr as E  # noqa: E402
from attn_inductor.masks.block_sparsity import FULL, PARTIAL, dense, from_block_map  # noqa: E402
from attn_inductor.templates import configs, launch  # noqa: E402

F32, I64, BOOL = "float32", "int64", "bool"
H100_SHARED_MEMORY = 232448  # bytes of dynamic shared memory per block on sm_90


@pytest.fixture(scope="module")
def sm90(request):
    """Kernels compiled (not run) for sm_90a; yields the list of (kernel name, CompiledKernel)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set for this session")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.runtime.driver import driver
        from triton.runtime.errors import OutOfResources
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
        importlib.import_module("triton.backends.nvidia.compiler")
    except ImportError as e:  # pragma: no cover - depends on the wheel
        pytest.skip(f"the NVIDIA backend of Triton is unavailable: {e}")

    from attn_inductor.templates import attn_fwd

    if isinstance(attn_fwd._attn_fwd, InterpretedFunction):  # defined under the interpreter earlier
        for name in ("hook_lib", "attn_fwd", "attn_bwd"):
            importlib.reload(importlib.import_module(f"attn_inductor.templates.{name}"))

    class FakeCudaDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    compiled = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel.metadata.shared > H100_SHARED_MEMORY:
            raise OutOfResources(kernel.metadata.shared, H100_SHARED_MEMORY, "shared memory")
        compiled.append((self.fn.__name__, kernel))
        return kernel

    mp = pytest.MonkeyPatch()
    mp.setattr(JITFunction, "run", compile_only)
    mp.setattr(launch, "_check", lambda *a, **k: None)  # CPU tensors stand in for CUDA ones
    mp.setattr(configs, "_capability", lambda device: 9)
    mp.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    previous = driver._active  # reset_active() would create the real (absent) CUDA driver
    driver.set_active(FakeCudaDriver())
    launch._fitted.clear()
    launch._plans.clear()  # plans remember the attempt that fitted (Note [launch plans])
    try:
        yield compiled
    finally:
        driver.set_active(previous)
        mp.undo()
        launch._fitted.clear()
        launch._plans.clear()
        del triton


def _causal_map(length: int, block: int = 128):
    n = -(-length // block)
    bm = torch.zeros(1, 1, n, n, dtype=torch.int8)
    for i in range(n):
        for j in range(i + 1):
            bm[0, 0, i, j] = FULL if j < i else PARTIAL
    return from_block_map(bm, block_m=block, block_n=block, q_len=length, kv_len=length)


def _run(sm90, score, mask, *, captured=(), needs=(), b=1, h=2, hkv=2, lq=1000, lk=1000, d=128, dv=None,
         dtype=torch.bfloat16, sparsity="map", row_select=False, deterministic=False):
    sm90.clear()
    q = torch.randn(b, h, lq, d).to(dtype)
    k = torch.randn(b, hkv, lk, d).to(dtype)
    v = torch.randn(b, hkv, lk, dv or d).to(dtype)
    if sparsity == "map":
        sp = _causal_map(lk)
    elif sparsity == "dense":
        sp = dense(block_m=128, block_n=128, q_len=lq, kv_len=lk, kind=PARTIAL if mask is not None else FULL)
    else:
        sp = None
    rs = torch.ones(b, h, lq, dtype=torch.bool) if row_select else None
    out, lse = launch.core_forward(q, k, v, list(captured), score=score, mask=mask, scale=0.1, gqa_group=h // hkv,
                                   sparsity=sp, row_select=rs)
    launch.core_backward(q, k, v, out, lse, torch.randn_like(out), list(captured), list(needs), score=score,
                         mask=mask, scale=0.1, gqa_group=h // hkv, sparsity=sp, deterministic=deterministic)
    names = [n for n, _ in sm90]
    # a score mod adds the STATS pass; deterministic captured gradients split dK/dV and dQ into two launches
    launches = (score != E.score) + (2 if deterministic and any(needs) else 1)
    expected = ["_attn_fwd", "_attn_bwd_preprocess"] + ["_attn_bwd"] * launches
    assert names == expected, names
    for name, kernel in sm90:
        assert kernel.asm.get("cubin"), name
        assert kernel.metadata.shared <= H100_SHARED_MEMORY, name
        if os.environ.get("ATTN_INDUCTOR_PTXAS_REPORT"):  # registers / spills per kernel, for tuning configs
            print(f"\n{name}: shared={kernel.metadata.shared} warps={kernel.metadata.num_warps} "
                  f"stages={kernel.metadata.num_stages} {_ptxas_report(kernel.asm['ptx'])}")


def _ptxas_report(ptx: str) -> str:
    """ptxas -v of the kernel (the wheel's newest ptxas accepts Triton 3.9's PTX version)."""
    import subprocess
    import tempfile

    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for exe in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bin_dir, exe)
        if not os.path.exists(path):
            continue
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            r = subprocess.run([path, "--gpu-name", "sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                               capture_output=True, text=True)
        lines = [ln.split(":", 1)[-1].strip() for ln in (r.stdout + r.stderr).splitlines()
                 if "registers" in ln or "spill" in ln]
        if lines:
            return " | ".join(lines)
    return "(ptxas unavailable)"


def _causal():
    return E.call("ge", E.q_idx, E.kv_idx, dtype=BOOL)


def test_causal_bf16(sm90):
    _run(sm90, E.score, _causal())


def test_relative_bias_and_alibi_grads_deterministic(sm90):
    lk = 1000
    idx = E.call("add", E.call("sub", E.q_idx, E.kv_idx, dtype=I64), E.const(lk - 1, I64), dtype=I64)
    score = E.call("add", E.score, E.Load(0, (E.h, idx), F32), dtype=F32)
    rel = E.call("to", E.call("sub", E.kv_idx, E.q_idx, dtype=I64), dtype=F32)
    score = E.call("add", score, E.call("mul", E.Load(1, (E.h,), F32), rel, dtype=F32), dtype=F32)
    for det in (False, True):
        _run(sm90, score, _causal(), captured=[torch.randn(2, 2 * lk - 1), torch.randn(2)], needs=[True, True],
             d=80, deterministic=det)


def test_softcap_row_select_gqa(sm90):
    t = E.call("tanh", E.call("truediv", E.score, E.const(30.0, F32), dtype=F32), dtype=F32)
    _run(sm90, E.call("mul", t, E.const(30.0, F32), dtype=F32), _causal(), h=4, hkv=1, row_select=True)
    # bf16 inputs: the hardware tanh (Note [fast transcendentals] in hook_lib)
    assert all("tanh.approx.f32" in kernel.asm["ptx"] for name, kernel in sm90 if name != "_attn_bwd_preprocess")
    # and s / 30 as a product with the fp32 reciprocal of 30 (no per-score division); fp32 inputs keep "/"
    from attn_inductor.templates.hooks import render_source

    fast = render_source(E.call("mul", t, E.const(30.0, F32), dtype=F32), _causal(), (), fast_math=True).source
    exact = render_source(E.call("mul", t, E.const(30.0, F32), dtype=F32), _causal(), ()).source
    assert "(score * 0.03333333507180214)" in fast and "/ 30.0" not in fast and "(score / 30.0)" in exact


def test_document_mask_fp16_d64(sm90):
    same = E.call("eq", E.Load(0, (E.b, E.q_idx), I64), E.Load(0, (E.b, E.kv_idx), I64), dtype=BOOL)
    _run(sm90, E.score, E.and_(_causal(), same), captured=[torch.randint(0, 3, (1, 1000))], needs=[False], d=64,
         dtype=torch.float16)


def test_fp32_and_odd_shapes(sm90):
    _run(sm90, E.score, _causal(), dtype=torch.float32, sparsity=None)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed: operands rounded to nearest tf32 in asm
    try:
        _run(sm90, E.score, _causal(), dtype=torch.float32, sparsity=None)
    finally:
        torch.set_float32_matmul_precision(before)
    assert all("cvt.rna.tf32.f32" in kernel.asm["ptx"] for name, kernel in sm90 if name != "_attn_bwd_preprocess")
    _run(sm90, E.score, None, d=256, dv=64, sparsity="dense")
    _run(sm90, E.score, None, lq=1, sparsity="dense")


def test_every_float_op(sm90):
    """The printer's libdevice / tl spellings of every float op compile (interpreter uses portable ones)."""
    def f(op, *args):
        return E.call(op, *args, dtype=F32)

    x = f("mul", E.score, E.const(0.3, F32))
    pos = f("add", f("abs", x), E.const(1.0, F32))
    terms = [f(op, x) for op in ("sigmoid", "erf", "exp", "exp2", "expm1", "sin", "cos", "tanh", "neg", "round",
                                 "floor", "ceil", "trunc", "sign")]
    terms += [f(op, pos) for op in ("log", "log2", "log1p", "sqrt", "rsqrt", "reciprocal")]
    terms += [f("pow", pos, E.const(1.5, F32)), f("minimum", x, E.const(0.2, F32)),
              f("floordiv", x, E.const(0.7, F32)), f("remainder", x, E.const(0.7, F32)),
              E.call("to", f("mul", x, E.const(3.0, F32)), dtype="bfloat16")]
    score = E.score
    for t in terms:
        score = f("add", score, E.call("to", t, dtype=F32))
    _run(sm90, score, _causal())
