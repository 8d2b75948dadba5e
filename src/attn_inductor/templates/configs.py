"""Tile sizes, warps and pipeline stages for the Triton kernels.

One table per device generation, keyed by the padded head dim and the element
size; Hopper first.  Starting points follow FlexAttention's Hopper defaults
(forward BLOCK_M=128, BLOCK_N=64 at D=128 with 8 warps and 3 stages; backward
64x128 tiles) and must be confirmed by a sweep on the GPU: set
``ATTN_INDUCTOR_FWD_CONFIG="block_m,block_n,num_warps,num_stages"`` or
``ATTN_INDUCTOR_BWD_CONFIG="block_m1,block_n1,block_m2,block_n2,num_warps,num_stages"``
to override every pick without editing this file (``benchmarks/`` can loop
over them).

Sparsity tables use ``SPARSE_BLOCK`` (128 x 128, FlexAttention's default) on the
GPU; kernel tiles must divide it (``fit_tile``), so one table serves the
forward and both backward kernels.  Under the interpreter everything is 16
(small tiles keep CPU tests fast and still exercise several tiles per table block
when a test builds its tables with 32).

Note [heavy hooks]
    A score mod, a gather from a captured tensor or a captured gradient keeps
    extra [BLOCK_M, BLOCK_N] tiles live (the score-mod derivative, gathered
    values, contributions).  Cross-compiling for sm_90 (Triton 3.9, ptxas)
    showed FlexAttention's dK/dV tile (64 x 128, 8 warps) spilling ~100 bytes
    for plain causal and 400-2000 bytes with softcap or a relative-bias table,
    none with a 32-row q tile in dK/dV and, for heavy hooks, a 32-column kv
    tile in dQ; and the D=64 forward spilling with a document-id mask at 4 warps
    and not at 8.  So the D<=128 default uses 32 x 128 for dK/dV, heavy hooks
    also halve dQ's kv tile, and 128 x 128 forward tiles get 8 warps.  Spill-free
    is not the same as fastest: to be confirmed by timing on the GPU (the env
    overrides above; ``ATTN_INDUCTOR_PTXAS_REPORT=1 pytest -s
    tests/test_triton_compile.py`` prints registers and spills without a GPU).

Invariants: every block is a power of two >= 16 (``tl.dot``'s minimum);
``block_m1``/``block_n1`` are the dK/dV kernel's q and kv tiles,
``block_m2``/``block_n2`` the dQ kernel's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import _compat

SPARSE_BLOCK = (128, 128)
INTERPRETER_BLOCK = 16
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BwdConfig:
    block_m1: int  # dK/dV kernel: q tile
    block_n1: int  # dK/dV kernel: kv tile (owned by the program)
    block_m2: int  # dQ kernel: q tile (owned by the program)
    block_n2: int  # dQ kernel: kv tile
    num_warps: int
    num_stages: int


def head_block(d: int) -> int:
    """Padded head dim: next power of two, at least 16."""
    return max(16, 1 << (int(d) - 1).bit_length())


# (capability major, padded head dim, element bytes) -> config; the first key not
# larger than the request wins (see _lookup).
_FWD = {
    9: {  # Hopper
        (64, 2): FwdConfig(128, 128, 4, 3),
        (128, 2): FwdConfig(128, 128, 8, 3),  # H200 sweep (benchmarks/results/h200_sweep.json): 0.94-1.06x Flex
        (256, 2): FwdConfig(64, 32, 4, 3),
        # fp32: tiles small enough for the FMA path (input_precision="ieee") not to spill
        (64, 4): FwdConfig(64, 32, 4, 2),
        (128, 4): FwdConfig(32, 16, 4, 2),
        (256, 4): FwdConfig(16, 16, 4, 1),
    },
    8: {  # Ampere / Ada
        (64, 2): FwdConfig(128, 64, 4, 3),
        (128, 2): FwdConfig(128, 64, 8, 2),
        (256, 2): FwdConfig(64, 32, 4, 2),
        (64, 4): FwdConfig(64, 32, 4, 2),
        (128, 4): FwdConfig(32, 16, 4, 2),
        (256, 4): FwdConfig(16, 16, 4, 1),
    },
}
_BWD = {
    9: {
        (64, 2): BwdConfig(64, 128, 128, 64, 8, 3),
        # H200 sweep: Flex's 64 x 128 dK/dV tile beats the spill-free 32 x 128 one by 5-12% despite ~100 B of spills
        (128, 2): BwdConfig(64, 128, 128, 64, 8, 3),
        (256, 2): BwdConfig(32, 64, 64, 32, 8, 2),
        (64, 4): BwdConfig(16, 32, 32, 16, 4, 1),
        (128, 4): BwdConfig(16, 32, 32, 16, 4, 1),
        (256, 4): BwdConfig(16, 16, 16, 16, 4, 1),
    },
    8: {
        (64, 2): BwdConfig(64, 64, 64, 64, 4, 2),
        (128, 2): BwdConfig(32, 64, 64, 32, 4, 2),
        (256, 2): BwdConfig(16, 32, 32, 16, 4, 1),
        (64, 4): BwdConfig(16, 32, 32, 16, 4, 1),
        (128, 4): BwdConfig(16, 32, 32, 16, 4, 1),
        (256, 4): BwdConfig(16, 16, 16, 16, 4, 1),
    },
}


def _capability(device: torch.device) -> int:
    if device.type != "cuda":
        return 9
    major, _ = torch.cuda.get_device_capability(device)
    return 9 if major >= 9 else 8


def _lookup(table: dict, head_dim: int, dtype: torch.dtype):
    d = head_block(head_dim)
    size = 4 if dtype == torch.float32 else 2
    keys = sorted(k for k in table if k[1] == size)
    for key in keys:
        if d <= key[0]:
            return table[key]
    return table[keys[-1]]


def _env_ints(name: str, n: int):
    text = _compat.env(name)
    if not text:
        return None
    vals = tuple(int(x) for x in text.replace(" ", "").split(","))
    if len(vals) != n:
        raise ValueError(f"{name} needs {n} comma-separated integers, got {text!r}")
    return vals


def sparse_blocks(device: torch.device) -> tuple[int, int]:
    """(block_m, block_n) of the sparsity tables the kernels want."""
    if _compat.triton_interpret_enabled() and device.type == "cpu":
        return (INTERPRETER_BLOCK, INTERPRETER_BLOCK)
    return SPARSE_BLOCK


def fit_tile(tile: int, sparse: int) -> int:
    """Largest power of two <= ``tile`` dividing the table's block ``sparse``."""
    t = min(tile, sparse)
    while sparse % t:
        t //= 2
    if t < 16:
        raise ValueError(f"sparsity block {sparse} needs a multiple of 16 (power-of-two tiles >= 16)")
    return t


# Hopper, D=128, 16-bit, a score that gathers one table entry per (query, key) (a relative-position bias):
# 64 x 64 tiles on 4 warps in both passes (H200 sweeps, ours/Flex: B=2 H=16 S=8192 forward 0.959 -> 1.021,
# forward+backward 0.906 -> 0.94; B=16 S=1024 forward 0.877 -> 1.006, forward+backward 0.877 -> 0.893;
# benchmarks/results/h200_sweep_relbias_215ca47.json).
_FWD_ENTRY_GATHERS = FwdConfig(64, 64, 4, 3)
_BWD_ENTRY_GATHERS = BwdConfig(64, 64, 64, 64, 4, 3)


def _entry_gathers_apply(head_dim: int, dtype: torch.dtype, device: torch.device, entry_gathers: bool) -> bool:
    return (entry_gathers and _capability(device) == 9 and head_block(head_dim) == 128
            and dtype in (torch.bfloat16, torch.float16))


def forward_config(head_dim: int, dtype: torch.dtype, device: torch.device, heavy: bool = False,
                   entry_gathers: bool = False) -> FwdConfig:
    """``heavy``: the hooks gather from captured tensors or modify the score (Note [heavy hooks]);
    ``entry_gathers``: they gather one entry per (query, key) (``Hooks.entry_gathers``)."""
    env = _env_ints("ATTN_INDUCTOR_FWD_CONFIG", 4)
    if env is not None:
        return FwdConfig(*env)
    if _compat.triton_interpret_enabled() and device.type == "cpu":
        return FwdConfig(INTERPRETER_BLOCK, INTERPRETER_BLOCK, 1, 1)
    if _entry_gathers_apply(head_dim, dtype, device, entry_gathers):
        return _FWD_ENTRY_GATHERS
    cfg = _lookup(_FWD[_capability(device)], head_dim, dtype)
    if heavy and cfg.block_m >= 128 and cfg.block_n >= 128:
        cfg = dataclasses.replace(cfg, num_warps=max(cfg.num_warps, 8))
    return cfg


# Hopper, D=64, 16-bit, no score mod: 128 x 128 tiles in both backward programs (H200, B=4 H=32 S=4096,
# ours/Flex fwd+bwd: full 0.88 -> 0.975, causal 1.013 -> 1.027, document 0.989 -> 1.107, sliding even);
# with a score mod they lose (ALiBi 0.986 -> 0.936, softcap 2.05 -> 1.38): benchmarks/results/h200_sweep_d64_*.
_BWD_D64_PLAIN = BwdConfig(128, 128, 128, 128, 8, 2)


def backward_config(head_dim: int, dtype: torch.dtype, device: torch.device, heavy: bool = False,
                    score_mod: bool = False, entry_gathers: bool = False) -> BwdConfig:
    """``heavy``: score gradient or captured gradients or gathers (Note [heavy hooks]); ``score_mod``:
    the score is modified (ALiBi, softcap, biases); ``entry_gathers``: as in ``forward_config``."""
    env = _env_ints("ATTN_INDUCTOR_BWD_CONFIG", 6)
    if env is not None:
        return BwdConfig(*env)
    if _compat.triton_interpret_enabled() and device.type == "cpu":
        b = INTERPRETER_BLOCK
        return BwdConfig(b, b, b, b, 1, 1)
    if _entry_gathers_apply(head_dim, dtype, device, entry_gathers):
        return _BWD_ENTRY_GATHERS
    cap = _capability(device)
    if cap == 9 and head_block(head_dim) == 64 and dtype in (torch.bfloat16, torch.float16) and not score_mod:
        return _BWD_D64_PLAIN
    cfg = _lookup(_BWD[cap], head_dim, dtype)
    # On Hopper with 16-bit inputs the full-size tiles win even with heavy hooks (H200, B=2 H=16 S=8192
    # D=128: ALiBi 7.29 -> 6.05 ms, relbias 19.8 -> 17.0, document 3.29 -> 2.76, softcap 11.3 -> 10.3;
    # benchmarks/results/attention_heavy_*.md); elsewhere keep the smaller, spill-free tiles.
    if heavy and not (cap == 9 and dtype in (torch.bfloat16, torch.float16)):
        cfg = dataclasses.replace(cfg, block_m1=min(cfg.block_m1, 32), block_n2=max(16, cfg.block_n2 // 2))
    return cfg
