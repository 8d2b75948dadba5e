"""Host side of the Triton kernels: the attention core interface.

Same three functions as ``cpu.py`` (``runtime.py`` composes either into the full
spec semantics): ``preferred_blocks``, ``core_forward``, ``core_backward``.

What happens per call: the first call of a call site builds its launch plan
(Note [launch plans]): the score/mask hooks, rendered and loaded once per
(expression, captured layout, index-width bucket) by ``hooks.render_hooks``;
tiles from ``configs``, shrunk to divide the sparsity table's blocks; int32
tables and constexpr flags.  Later calls allocate outputs and launch.  Captured
tensors travel as a tuple of pointers plus a flat tuple of strides (bool tensors
as uint8); everything else is plain strided pointers, so no input is copied,
repeated (GQA) or made contiguous.

Invariants
- q, k, v share one dtype among fp16 / bf16 / fp32; head dims up to
  ``configs.MAX_HEAD_DIM`` (padded to a power of two inside the kernels).
- fp32 inputs honour torch's TF32 setting (``_compat.fp32_matmul_allows_tf32``).
- Outputs are fresh contiguous tensors; out in v's dtype, lse fp32.
- ``deterministic=True`` makes captured-tensor gradients bitwise repeatable
  (Note [captured gradients] in hook_lib); dq, dk, dv are always deterministic
  (each is owned by one program and accumulated in a fixed order; Note [one
  backward launch] in attn_bwd.py says why dQ is not accumulated with atomics).

What it does not do: dropout, fp64 inputs, head dims above 256.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import weakref
from collections import OrderedDict
from typing import Sequence

import torch

from .. import _compat
from ..lowering.expr import Expr
from ..masks.block_sparsity import BlockSparsity
from ..masks.bounds import kv_interval
from . import configs
from .hooks import IndexBounds, captured_meta_of, render_hooks

__all__ = ["preferred_blocks", "core_forward", "core_backward"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PREPROCESS_BLOCK = 64


def preferred_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool = False) -> tuple[int, int]:
    """(block_m, block_n) of the sparsity tables; the same for forward and backward."""
    return configs.sparse_blocks(q.device)


# ----------------------------------------------------------------------------- checks and arguments


def _check(q, k, v, gqa_group: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise TypeError(f"the Triton kernels take q, k, v of one dtype among fp16/bf16/fp32; got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, _, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"q and k head dims differ: {d} vs {k.shape[3]}")
    if hq != k.shape[1] * gqa_group:
        raise ValueError(f"q has {hq} heads, k has {k.shape[1]}, gqa_group={gqa_group}")
    for name, dim in (("q/k", d), ("v", v.shape[3])):
        if dim > configs.MAX_HEAD_DIM:
            raise ValueError(f"{name} head dim {dim} is larger than {configs.MAX_HEAD_DIM}, the largest the Triton "
                             "attention kernels support")
        if dim < 1:
            raise ValueError(f"{name} head dim must be positive")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if q.device.type == "cpu" and not _compat.triton_interpret_enabled():
        raise RuntimeError("the Triton kernels take CPU tensors only under TRITON_INTERPRET=1 (set before import)")


def _dims(q, k, v) -> tuple:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        _check(q, k, v, 1)  # raises the full message
    return tuple(q.shape)


def _check_captured(captured, device) -> None:
    for i, t in enumerate(captured):
        if t.device != device:
            raise ValueError(f"captured tensor {i} is on {t.device}, the inputs on {device}")


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not _compat.fp32_matmul_allows_tf32():
        return "ieee"
    return "tf32"  # Triton's default; ignored for fp16/bf16 operands


def _captured_args(captured: Sequence[torch.Tensor]):
    if not captured:
        return (), ()
    ptrs = tuple(t.view(torch.uint8) if t.dtype == torch.bool else t for t in captured)
    strides = tuple(int(s) for t in captured for s in t.stride())
    return ptrs, strides


def _pow2_at_least(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _tiles(blocks: tuple[int, int] | None, tile_m: int, tile_n: int, q_len: int, kv_len: int):
    """Kernel tiles fitting the table's ``blocks`` (None: no table), and the table's multiples of them."""
    tile_m = min(tile_m, max(16, _pow2_at_least(q_len)))
    tile_n = min(tile_n, max(16, _pow2_at_least(kv_len)))
    if blocks is None:
        return tile_m, tile_n, 1, 1
    bm = configs.fit_tile(tile_m, blocks[0])
    bn = configs.fit_tile(tile_n, blocks[1])
    return bm, bn, blocks[0] // bm, blocks[1] // bn


def _check_sparsity(sp: BlockSparsity, q, k) -> None:
    b, hq, q_len = q.shape[0], q.shape[1], q.shape[2]
    if sp.q_len != q_len or sp.kv_len != k.shape[2]:
        raise ValueError(f"sparsity built for lengths ({sp.q_len}, {sp.kv_len}), inputs have ({q_len}, {k.shape[2]})")
    bm, hm = sp.kv_num_blocks.shape[:2]
    if bm not in (1, b) or hm not in (1, hq):
        raise ValueError(f"sparsity tables have batch/head dims ({bm}, {hm}); inputs ({b}, {hq})")
    if sp.kv_indices.device != q.device:
        raise ValueError(f"sparsity tables on {sp.kv_indices.device}, inputs on {q.device}")


def _table_args(sp: BlockSparsity | None, dummy: torch.Tensor, forward: bool):
    """(NUM, IDX, FULL_NUM, FULL_IDX, 3 strides of the counts, 3 strides of the indices)."""
    if sp is None:
        return (dummy, dummy, dummy, dummy), (0, 0, 0), (0, 0, 0)
    num, idx, fnum, fidx = _tables(sp, forward)
    if num.shape != fnum.shape or idx.shape != fidx.shape:
        raise ValueError("PARTIAL and FULL tables must have the same shapes")

    def bstrides(t):  # broadcast dims (size 1) read with stride 0
        return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(3))

    return (num, idx, fnum, fidx), bstrides(num), bstrides(idx)


# per sparsity object, derived once (a mask that changes every call brings a new object every call):
# its layout and its tables as contiguous int32, forward (kv) and backward (q)
_derived: "weakref.WeakKeyDictionary[BlockSparsity, dict]" = weakref.WeakKeyDictionary()


def _derived_of(sp: BlockSparsity) -> dict:
    got = _derived.get(sp)
    if got is None:
        # what a launch plan depends on: blocks, lengths, table shapes and device (the int32 tables are
        # contiguous, so their strides follow); the tables' contents are per-call data (Note [launch plans])
        got = _derived[sp] = {"layout": (
            sp.block_m, sp.block_n, sp.q_len, sp.kv_len, sp.kv_num_blocks.shape, sp.kv_indices.shape,
            sp.full_kv_num_blocks.shape, sp.full_kv_indices.shape, sp.q_num_blocks.shape, sp.q_indices.shape,
            sp.full_q_num_blocks.shape, sp.full_q_indices.shape, sp.kv_indices.device)}
    return got


def _tables(sp: BlockSparsity, forward: bool) -> tuple:
    """The forward (kv) or backward (q) tables as contiguous int32."""
    derived = _derived_of(sp)
    tabs = derived.get(forward)
    if tabs is None:
        raw = (sp.kv_num_blocks, sp.kv_indices, sp.full_kv_num_blocks, sp.full_kv_indices) if forward else \
            (sp.q_num_blocks, sp.q_indices, sp.full_q_num_blocks, sp.full_q_indices)
        tabs = derived[forward] = tuple(t.to(torch.int32).contiguous() for t in raw)
    return tabs


def sparsity_layout(sp: BlockSparsity | None) -> tuple | None:
    """What a launch plan depends on of a sparsity (runtime's call sites compare it)."""
    return None if sp is None else _derived_of(sp)["layout"]


# Note [fitting the device]
#     A config that suits plain attention can exceed the SM's shared memory once
#     the hooks gather from captured tensors (the pipeliner stages those loads
#     too) or registers spill badly.  Triton reports OutOfResources at the first
#     launch; ``_launch`` then retries with fewer pipeline stages, then with a
#     halved inner-loop tile, and remembers what fitted for that kernel
#     specialisation.  The interpreter never raises it.
_fitted: dict[tuple, int] = {}


@functools.lru_cache(maxsize=256)
def _attempts(cfg, inner) -> list:
    """``cfg``, then fewer stages, then the ``inner`` tile(s) halved (down to 16) at each stage count."""
    inner = (inner,) if isinstance(inner, str) else tuple(inner)
    out = [dataclasses.replace(cfg, num_stages=s) for s in range(cfg.num_stages, 0, -1)]
    tiles = {name: getattr(cfg, name) // 2 for name in inner}
    while tiles and min(tiles.values()) >= 16:
        out += [dataclasses.replace(cfg, num_stages=s, **tiles) for s in range(cfg.num_stages, 0, -1)]
        tiles = {name: t // 2 for name, t in tiles.items()}
    return out


def _launch(kernel, key: tuple, attempts: list, launch_one, kept: dict | None = None) -> None:
    """Run ``launch_one(attempt)`` for the first attempt the device accepts (Note [fitting the device]).

    ``kept``: the call site's dict (Note [launch plans]); a site that has launched goes straight to the
    attempt that fitted, without hashing ``key`` again."""
    if kept is not None:
        fitted = kept.get(("fitted", key[0]))
        if fitted is not None and fitted[0] is key:
            launch_one(attempts[fitted[1]])
            return
    from triton.runtime.errors import OutOfResources

    start = _fitted.get(key, 0)
    error = None
    for i in range(start, len(attempts)):
        try:
            launch_one(attempts[i])
        except OutOfResources as e:
            error = e
            continue
        _fitted[key] = i
        if kept is not None:
            kept[("fitted", key[0])] = (key, i)
        return
    raise error


# Note [static launches]
#     ``kernel[grid](...)`` goes through ``JITFunction.run``: it binds ~100
#     arguments, builds the specialisation key and the options string, and looks
#     up the compiled kernel, on every call (~50 us per launch on the H200 host,
#     three launches per forward+backward).  Inductor's own kernels skip this
#     with precompiled launchers.  Here, once a call site (its launch plan, the
#     kernel, the fitted config) has launched through the JIT, the
#     ``CompiledKernel`` it returned is kept in the plan with the constexpr
#     values, keyed also by the 16-byte alignment of every tensor argument (the
#     only part of Triton's specialisation the plan does not fix: ints, dtypes
#     and constexprs are functions of it), and later calls launch it directly.
#     Triton versions differ in whether the launcher takes the constexpr values
#     (3.9 does); the first direct launch tries both forms, and a launcher that
#     accepts neither raises TypeError while parsing the arguments, before
#     launching, which turns direct launches off for the process.  CUDA tensors only (the
#     interpreter and the cross-compile tests use the JIT).  On by default; ``ATTN_INDUCTOR_STATIC_LAUNCH=0``
#     turns it off.  Measured on the H200 host (Triton 3.6, launcher form "all", two A/B runs,
#     benchmarks/results/h200_host_overhead.md): launch.core_forward 143-153 -> 70-96 us per call,
#     core_backward 272-354 -> 157-210 us, and after hundreds of direct launches the results still
#     equal FlexAttention's as before.
_static_form: dict = {"form": None}  # "all" (constexprs passed), "runtime" (not), or "off"


def _tensor_positions(args) -> tuple:
    """Where the tensors sit in a launch's arguments: (index, None) or (index, index within a tuple)."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            out.append((i, None))
        elif isinstance(a, tuple):
            out.extend((i, j) for j, t in enumerate(a) if isinstance(t, torch.Tensor))
    return tuple(out)


def _tensor_alignment(args, positions) -> tuple:
    return tuple((args[i] if j is None else args[i][j]).data_ptr() % 16 == 0 for i, j in positions)


def _run_kernel(kernel, grid, args: tuple, kwargs: dict, site) -> None:
    """``kernel[grid](*args, **kwargs)``, launched directly when ``site`` has launched before (Note [static launches]).

    ``site`` is None (always the JIT) or (the plan's dict of kept kernels, a key within the plan): kept
    kernels live in their plan, whose identity checks make sure the hooks baked into them are the
    call's own.
    """
    form = _static_form["form"]
    if not site or form == "off":
        kernel[grid](*args, **kwargs)
        return
    kept, local = site
    positions = kept.get(("positions", local))  # the argument layout is fixed per plan and site
    if positions is None:
        positions = kept[("positions", local)] = _tensor_positions(args)
    skey = (local, _tensor_alignment(args, positions))
    hit = kept.get(skey)
    if hit is not None:
        compiled, tail = hit
        forms = (form,) if form is not None else ("all", "runtime")
        for f in forms:
            try:
                compiled[grid](*(args + tail if f == "all" else args))
            except (TypeError, AttributeError):  # raised while binding, before anything is launched
                continue
            _static_form["form"] = f
            return
        _static_form["form"] = "off"  # this Triton's launcher takes neither form: JIT from now on
        del kept[skey]
        kernel[grid](*args, **kwargs)
        return
    compiled = kernel[grid](*args, **kwargs)
    params = getattr(kernel, "params", None)
    if compiled is None or params is None or len(params) < len(args):
        return
    runtime, constexpr = params[:len(args)], params[len(args):]
    if any(p.is_constexpr for p in runtime) or not all(p.is_constexpr for p in constexpr):
        return
    try:
        tail = tuple(kwargs[p.name] for p in constexpr)
    except KeyError:
        return
    kept[skey] = (compiled, tail)


def _fit_key(name: str, hooks, **meta) -> tuple:
    return (name, hooks.key) + tuple(sorted((k, v) for k, v in meta.items()))


def _hooks(score: Expr, mask: Expr | None, captured, needs_grad, q, k, backward: bool):
    metas = captured_meta_of(captured, needs_grad)
    bounds = IndexBounds.bucketed(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    # Note [fast transcendentals] in hook_lib: hardware tanh for 16-bit inputs in compiled kernels
    interpreted = _compat.triton_interpret_enabled() and q.device.type == "cpu"
    fast_math = not interpreted and q.dtype in (torch.float16, torch.bfloat16)
    return render_hooks(score, mask, metas, bounds=bounds, backward=backward, fast_math=fast_math)


# Note [launch plans]
#     Everything a launch needs besides the tensors' data (rendered hooks, tile
#     config, int32 sparsity tables and their strides, constexpr flags, the
#     fitted-config key) depends only on the call site: the spec's expressions,
#     the sparsity tables' layout, shapes, strides, dtypes, device and the
#     policies read from the environment.  Recomputing it on every call was most
#     of the host time of a small attention, so it is kept per call site in
#     ``_plans``, keyed by those values.  Expressions enter the key by identity,
#     and the plan holds them, so an id cannot be reused by another object while
#     the plan lives; a hit also checks identity.  A sparsity object enters by
#     its layout only (``sparsity_layout``): its tables are per-call data, since
#     a padding mask that changes every batch brings new tables every call.
_plans: "OrderedDict[tuple, tuple]" = OrderedDict()
_PLANS_MAX = 256


def _policy_key(dtype: torch.dtype) -> tuple:
    """Everything a plan reads from the environment and torch's matmul settings (raw values: cheap)."""
    return _compat.policy_env(), dtype == torch.float32 and _compat.fp32_matmul_allows_tf32()


def _static_launches_on() -> bool:
    """Note [static launches]: ``ATTN_INDUCTOR_STATIC_LAUNCH=0`` turns them off (read into the plan key)."""
    return _compat.env("ATTN_INDUCTOR_STATIC_LAUNCH", "1") != "0"


# Note [closed-form bounds] in masks/bounds.py: masks with closed-form kv bounds walk their tiles from
# them, and the sparsity tables passed in are not read; ``ATTN_INDUCTOR_SPARSITY=tables`` reads the
# tables instead (A/B measurements, or a way around a problem with the bounds).
SPARSITY_ENV = "ATTN_INDUCTOR_SPARSITY"


def _tables_forced() -> bool:
    return _compat.env(SPARSITY_ENV, "auto") == "tables"


def uses_kv_bounds(hooks) -> bool:
    """The hooks carry the mask's bounds (rendered from ``kv_interval``) and nothing forces tables."""
    return hooks.kv_lo is not None and not _tables_forced()


def walks_bounds(pred: Expr | None) -> bool:
    """Will the kernels walk ``pred``'s closed-form bounds?  Then callers need not build tables."""
    return pred is not None and not _tables_forced() and kv_interval(pred) is not None


def reads_no_tables(pred: Expr | None) -> bool:
    """No mask (every kv tile, all FULL: the kernels' untabled walk) or closed-form bounds: callers pass no
    sparsity tables.  ``ATTN_INDUCTOR_SPARSITY=tables`` makes both read tables (A/B measurements)."""
    return walks_bounds(pred) or (pred is None and not _tables_forced())


_FWD_MODULE, _BWD_MODULE = __package__ + ".attn_fwd", __package__ + ".attn_bwd"


def _kernels() -> dict:
    """The Triton kernels, imported on first use (TRITON_INTERPRET must be set before they are defined).

    Looked up in ``sys.modules`` on every call (cheaper than an import statement) so that a reload of
    the kernel modules, as the tests do to switch the interpreter on and off, is seen."""
    fwd, bwd = sys.modules.get(_FWD_MODULE), sys.modules.get(_BWD_MODULE)
    if fwd is None or bwd is None:
        from . import attn_bwd as bwd, attn_fwd as fwd  # noqa: I001
    return {"fwd": fwd._attn_fwd, "bwd": bwd._attn_bwd, "preprocess": bwd._attn_bwd_preprocess}


def _captured_key(captured) -> tuple:
    return tuple((t.shape, t.stride(), t.dtype, t.device) for t in captured)


def _plan_get(key: tuple, refs: tuple):
    hit = _plans.get(key)
    if hit is None or any(a is not b for a, b in zip(hit[0], refs)):
        return None
    return hit[1]


def _plan_put(key: tuple, refs: tuple, plan) -> None:
    _plans[key] = (refs, plan)
    while len(_plans) > _PLANS_MAX:
        _plans.popitem(last=False)


# ----------------------------------------------------------------------------- forward


def core_forward(q, k, v, captured, *, score, mask, scale, gqa_group, sparsity, row_select=None,
                 empty_rows: str = "zero"):
    """Softmax over entries passing ``mask`` of ``score`` (see cpu.core_forward); -> (out, lse)."""
    plan = forward_plan(q, k, v, captured, score=score, mask=mask, gqa_group=gqa_group, sparsity=sparsity,
                        row_select=row_select is not None, empty_rows=empty_rows)
    return run_forward(plan, q, k, v, captured, scale=scale, sparsity=sparsity, row_select=row_select)


def forward_plan(q, k, v, captured, *, score, mask, gqa_group, sparsity, row_select: bool = False,
                 empty_rows: str = "zero"):
    """The launch plan of a forward call site (Note [launch plans]); None when the output is empty.

    Valid for every call whose tensors match these in shape, strides, dtype and device, with a sparsity
    of the same layout, while the environment's policies stay (``runtime.forward_site`` keeps it)."""
    batch, hq, q_len, _ = _dims(q, k, v)
    if batch * hq * q_len == 0:
        return None
    refs = (score, mask)
    plan_key = ("fwd", id(score), id(mask), sparsity_layout(sparsity), q.shape, q.stride(), k.shape,
                k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
                _captured_key(captured), row_select, empty_rows, gqa_group,
                _policy_key(q.dtype))
    plan = _plan_get(plan_key, refs)
    if plan is None:
        _check(q, k, v, gqa_group)  # the key holds everything it looks at
        plan = _forward_plan(q, k, v, captured, score, mask, gqa_group, sparsity, row_select, empty_rows)
        _plan_put(plan_key, refs, plan)
    return plan


def run_forward(plan, q, k, v, captured, *, scale, sparsity, row_select=None):
    """One forward call on ``plan`` (``forward_plan`` of tensors like these); -> (out, lse)."""
    batch, hq, q_len = q.shape[0], q.shape[1], q.shape[2]
    kv_len = k.shape[2]
    out = torch.empty(batch, hq, q_len, v.shape[3], dtype=v.dtype, device=q.device)
    lse = torch.empty(batch, hq, q_len, dtype=torch.float32, device=q.device)
    if plan is None:
        return out, lse
    _attn_fwd = _kernels()["fwd"]
    hooks, cfg, num_strides, idx_strides, cap_strides, meta, key, kept, blocks = plan
    if meta["HAS_ROW_SELECT"] != (row_select is not None):
        raise ValueError("a forward plan made with(out) row_select run without (with) one")
    static_site = kept["static"]  # Note [static launches]
    tables = _tables(sparsity, forward=True) if blocks is not None else (lse, lse, lse, lse)  # else unused
    cap_ptrs = _captured_args(captured)[0]
    if row_select is not None:
        if row_select.shape != (batch, hq, q_len):
            raise ValueError(f"row_select must be [B, Hq, Lq] = {(batch, hq, q_len)}, got {tuple(row_select.shape)}")
        rs = row_select.to(torch.bool).view(torch.uint8)
        rs_strides = rs.stride()
    else:
        rs, rs_strides = lse, (0, 0, 0)

    strides = kept.get("strides")  # fixed by the plan's key (Note [launch plans])
    if strides is None:
        strides = kept["strides"] = (*q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride())
    tail = (*strides, *rs_strides, *num_strides, *idx_strides, q_len, kv_len, float(scale))

    def launch_one(c):
        site = (tuple(rs_strides), c)
        recipe = kept.get(("recipe", site))  # the grid and constexprs are the site's (Note [launch plans])
        if recipe is None:
            block_m, block_n, q_mult, kv_mult = _tiles(blocks, c.block_m, c.block_n, q_len, kv_len)
            recipe = kept[("recipe", site)] = ((triton_cdiv(q_len, block_m), hq, batch), dict(
                SCORE_MOD=hooks.score_mod, MASK_MOD=hooks.mask_mod, **meta, **_bound_fns(hooks, meta["KV_BOUNDS"]),
                BLOCK_M=block_m, BLOCK_N=block_n, SPARSE_Q_MULT=q_mult, SPARSE_KV_MULT=kv_mult,
                EVEN_M=q_len % block_m == 0, EVEN_N=kv_len % (block_n * kv_mult) == 0,
                num_warps=c.num_warps, num_stages=c.num_stages))
        grid, kwargs = recipe
        args = (q, k, v, out, lse, rs, *tables, cap_ptrs, cap_strides, *tail)
        _run_kernel(_attn_fwd, grid, args, kwargs, (kept, site) if static_site else None)

    _launch(_attn_fwd, key, _attempts(cfg, "block_n"), launch_one, kept)
    return out, lse


def _forward_plan(q, k, v, captured, score, mask, gqa_group, sparsity, row_select: bool, empty_rows) -> tuple:
    """What core_forward needs besides the tensors' data (Note [launch plans]); checks the call site once."""
    d, dv = q.shape[3], v.shape[3]
    if sparsity is not None:
        _check_sparsity(sparsity, q, k)
    _check_captured(captured, q.device)
    hooks = _hooks(score, mask, captured, None, q, k, backward=False)
    bounded = uses_kv_bounds(hooks)
    if bounded:
        sparsity = None
    cfg = configs.forward_config(max(d, dv), q.dtype, q.device, heavy=hooks.heavy,
                                 entry_gathers=hooks.entry_gathers)
    placeholder = torch.empty(0, device=q.device)
    _, num_strides, idx_strides = _table_args(sparsity, placeholder, forward=True)
    cap_strides = _captured_args(captured)[1]
    meta = dict(
        HAS_SCORE_MOD=hooks.has_score_mod, HAS_MASK=hooks.has_mask, IS_SPARSE=sparsity is not None,
        HAS_ROW_SELECT=bool(row_select), GQA_GROUP=gqa_group, HEAD_DIM=d, HEAD_DIM_V=dv,
        BLOCK_D=configs.head_block(d), BLOCK_DV=configs.head_block(dv),
        INPUT_PRECISION=_input_precision(q.dtype), FP32_OPERANDS=_compat.triton_dot_needs_fp32_operands(),
        EMPTY_NAN=empty_rows == "nan", KV_BOUNDS=bounded)
    key = _fit_key("fwd", hooks, cfg=cfg, dtype=q.dtype, device=str(q.device), **meta)
    kept = {"static": q.device.type == "cuda" and _static_launches_on()}  # Note [static launches]
    blocks = (sparsity.block_m, sparsity.block_n) if sparsity is not None else None
    return hooks, cfg, num_strides, idx_strides, cap_strides, meta, key, kept, blocks


def _bound_fns(hooks, bounded: bool) -> dict:
    """KV_LO / KV_HI for the kernels; without bounds a stand-in (never called) keeps direct launches
    possible, which need every constexpr passed (Note [static launches])."""
    if bounded:
        return dict(KV_LO=hooks.kv_lo, KV_HI=hooks.kv_hi)
    return dict(KV_LO=hooks.mask_mod, KV_HI=hooks.mask_mod)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- backward


def _grad_buffers(captured, needs, hooks, deterministic: bool, dummy: torch.Tensor):
    """Per captured tensor: (fp32 grad, int64 fixed-point, int32 max bits, int64 count) or dummies."""
    bufs = []
    for i, t in enumerate(captured):
        if needs[i]:
            g = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
            if deterministic:
                bufs.append((g, torch.zeros(t.shape, dtype=torch.int64, device=t.device),
                             torch.zeros(t.shape, dtype=torch.int32, device=t.device),
                             torch.zeros(t.shape, dtype=torch.int64, device=t.device)))
            else:
                bufs.append((g, dummy, dummy, dummy))
        else:
            bufs.append((dummy, dummy, dummy, dummy))
    return bufs


def _row_buffers(batch: int, hq: int, q_len: int, pre_block: int, with_lse_c: bool, with_dead: bool, device):
    """DELTA, LSE_X, LSE_C and DEAD as rows of one fp32 allocation (a CUDA allocation costs the host
    several times a view).  The kernels read them as flat [B * Hq * Lq] (DEAD [B * Hq * tiles]) arrays;
    each row starts on a 64-byte boundary, keeping the kernels' 16-byte specialisation.  LSE_C and DEAD
    alias DELTA when they are not used."""
    seg = -(-(batch * hq * q_len) // 16) * 16
    n_seg = (3 if with_lse_c else 2) + (1 if with_dead else 0)  # DEAD (B * Hq * tiles <= rows) fits a row
    rows = torch.empty((n_seg, seg), dtype=torch.float32, device=device).unbind(0)
    delta, lse_x = rows[0], rows[1]
    lse_c = rows[2] if with_lse_c else delta
    dead = rows[-1].view(torch.int32) if with_dead else delta
    return delta, lse_x, lse_c, dead


def _decode_fixed_point(grad_f: torch.Tensor, fixed: torch.Tensor, max_bits: torch.Tensor,
                        count: torch.Tensor) -> torch.Tensor:
    """The host half of Note [captured gradients]: fixed-point sums back to floats.

    Uses hook_lib.fixed_point_exponent's formula on the same integers.
    """
    from .hook_lib import FIXED_POINT_GUARD_BITS

    e_max = ((max_bits >> 23) & 0xFF) - 126
    e_cnt = ((count.to(torch.float32).view(torch.int32) >> 23) & 0xFF) - 126
    k = 62 - FIXED_POINT_GUARD_BITS.value - e_max - e_cnt
    val = torch.ldexp(fixed.to(torch.float64), (-k).to(torch.float64))
    finite = max_bits < 0x7F800000
    return torch.where(finite, val, grad_f.to(torch.float64))


def core_backward(q, k, v, out, lse, grad_out, captured, captured_needs_grad, *, score, mask, scale, gqa_group,
                  sparsity, deterministic=False, empty_rows: str = "zero"):
    """-> dq, dk, dv (input dtypes) and per captured tensor its gradient or None.

    ``empty_rows="nan"``: rows whose lse is -inf get eager's NaN dq, and dk/dv of the (batch, kv head)
    they belong to are NaN (Note [dead rows in the backward] in attn_bwd.py); else they contribute 0.
    """
    if grad_out.dtype != v.dtype:
        grad_out = grad_out.to(v.dtype)
    needs = [bool(n) for n in captured_needs_grad]
    plan = backward_plan(q, k, v, out, lse, grad_out, captured, needs, score=score, mask=mask,
                         gqa_group=gqa_group, sparsity=sparsity, deterministic=deterministic, empty_rows=empty_rows)
    return run_backward(plan, q, k, v, out, lse, grad_out, captured, needs, scale=scale, sparsity=sparsity,
                        deterministic=deterministic, empty_rows=empty_rows)


def backward_plan(q, k, v, out, lse, grad_out, captured, needs, *, score, mask, gqa_group, sparsity,
                  deterministic=False, empty_rows: str = "zero"):
    """The launch plan of a backward call site (Note [launch plans]); None when nothing is computed.
    ``grad_out`` in v's dtype, ``needs`` one bool per captured tensor.  Valid as ``forward_plan``'s."""
    batch, hq, q_len, _ = _dims(q, k, v)
    if len(needs) != len(captured):
        raise ValueError(f"{len(captured)} captured tensors but {len(needs)} needs-grad flags")
    if batch * hq * q_len == 0 or k.shape[2] == 0:
        return None
    device = q.device
    refs = (score, mask)
    plan_key = ("bwd", id(score), id(mask), sparsity_layout(sparsity), q.shape, q.stride(), k.shape,
                k.stride(), v.shape, v.stride(), out.stride(), lse.stride(), grad_out.stride(), q.dtype, k.dtype,
                v.dtype, device, k.device, v.device, _captured_key(captured), tuple(needs), gqa_group,
                bool(deterministic), empty_rows, _policy_key(q.dtype))
    plan = _plan_get(plan_key, refs)
    if plan is None:
        _check(q, k, v, gqa_group)  # the key holds everything it looks at
        plan = _backward_plan(q, k, v, captured, needs, score, mask, gqa_group, sparsity, deterministic)
        _plan_put(plan_key, refs, plan)
    return plan


def run_backward(plan, q, k, v, out, lse, grad_out, captured, needs, *, scale, sparsity, deterministic=False,
                 empty_rows: str = "zero"):
    """One backward call on ``plan`` (``backward_plan`` of tensors like these, with the same ``needs``,
    ``deterministic`` and ``empty_rows``); -> as ``core_backward``."""
    if grad_out.dtype != v.dtype:
        grad_out = grad_out.to(v.dtype)
    device = q.device
    # every element is written by exactly one program (zeros where no tile is visited)
    dq = torch.empty(q.shape, dtype=q.dtype, device=device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=device)
    dcap: list[torch.Tensor | None] = [torch.zeros_like(t, memory_format=torch.contiguous_format) if n else None
                                       for t, n in zip(captured, needs)]
    if plan is None:
        return dq.zero_(), dk.zero_(), dv.zero_(), dcap
    kernels = _kernels()
    _attn_bwd, _attn_bwd_preprocess = kernels["bwd"], kernels["preprocess"]
    batch, hq, q_len = q.shape[0], q.shape[1], q.shape[2]
    hkv, kv_len, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    gqa_group = hq // hkv  # backward_plan checked hq == hkv * gqa_group
    (hooks, grad_needs, cfg, meta, fns, fit, fwd_table_strides, table_strides, cap_strides, grad_strides,
     mode_dkdv, mode_dq, pre_block, kept, blocks) = plan
    static_site = kept["static"]  # Note [static launches]
    any_grad = any(grad_needs)

    # preprocess: DELTA = rowsum(dO * O), LSE_X = LSE in the kernels' exponent units (+inf on dead rows),
    # LSE_C (Note [absorbed rows] in attn_bwd.py; the preprocess writes its zeros) and the DEAD flags (Note
    # [dead rows in the backward]: one per (batch, query head, preprocess tile), all written): one allocation
    empty_nan = empty_rows == "nan"
    delta, lse_x, lse_c, dead = _row_buffers(batch, hq, q_len, pre_block, hooks.has_score_mod, empty_nan, device)
    pre_kwargs = kept.get("preprocess kwargs")
    if pre_kwargs is None:
        pre_kwargs = kept["preprocess kwargs"] = dict(
            HEAD_DIM_V=dv_dim, BLOCK_M=pre_block, BLOCK_DV=configs.head_block(dv_dim),
            BASE2=not hooks.has_score_mod, GQA_GROUP=gqa_group, EMPTY_NAN=empty_nan)
    strides = kept.get("strides")  # fixed by the plan's key (Note [launch plans])
    if strides is None:
        strides = kept["strides"] = (
            (*out.stride(), *grad_out.stride(), *lse.stride(), hq, q_len),
            (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
             *fwd_table_strides[0], *fwd_table_strides[1], *table_strides[0], *table_strides[1], hq, q_len, kv_len))
    pre_tail, bwd_strides = strides
    _run_kernel(_attn_bwd_preprocess, (triton_cdiv(q_len, pre_block), hq, batch),
                (out, grad_out, lse, delta, lse_x, lse_c, dead, *pre_tail),
                pre_kwargs, (kept, "preprocess") if static_site else None)

    cap_ptrs = _captured_args(captured)[0]
    bufs = _grad_buffers(captured, grad_needs, hooks, deterministic, delta)
    grads, fixed, max_bits, counts = tuple(zip(*bufs)) if bufs else ((), (), (), ())
    grad_args = (cap_ptrs, cap_strides, grads, fixed, max_bits, counts, grad_strides)
    if blocks is None:
        fwd_tables = tables = (delta, delta, delta, delta)  # unused placeholders
    else:
        fwd_tables, tables = _tables(sparsity, forward=True), _tables(sparsity, forward=False)

    def launch_bwd(c, do_dkdv: bool, do_dq: bool, stats_pass: bool = False):
        """dK/dV programs (a kv tile of one kv head, every query head of its group) and/or dQ programs
        (a q tile of one query head) in one grid: Note [one backward launch] in attn_bwd.py."""
        site = (do_dkdv, do_dq, stats_pass, c)
        recipe = kept.get(("recipe", site))  # the grid and constexprs are the site's (Note [launch plans])
        if recipe is None:
            block_m1, block_n1, q_mult1, kv_mult1 = _tiles(blocks, c.block_m1, c.block_n1, q_len, kv_len)
            block_m2, block_n2, q_mult2, kv_mult2 = _tiles(blocks, c.block_m2, c.block_n2, q_len, kv_len)
            kv_tiles = triton_cdiv(kv_len, block_n1)
            programs = (kv_tiles if do_dkdv else 0) + (triton_cdiv(q_len, block_m2) * gqa_group if do_dq else 0)
            recipe = kept[("recipe", site)] = ((programs, hkv, batch), kv_tiles, dict(
                **fns, **meta,
                DO_DKDV=do_dkdv, DKDV_GRAD_MODE=mode_dkdv, BLOCK_M1=block_m1, BLOCK_N1=block_n1,
                SPARSE_Q_MULT1=q_mult1, SPARSE_KV_MULT1=kv_mult1, EVEN_M1=q_len % (block_m1 * q_mult1) == 0,
                EVEN_N1=kv_len % block_n1 == 0,
                DO_DQ=do_dq, DQ_GRAD_MODE=0 if stats_pass else mode_dq, BLOCK_M2=block_m2, BLOCK_N2=block_n2,
                SPARSE_Q_MULT2=q_mult2, SPARSE_KV_MULT2=kv_mult2, EVEN_M2=q_len % block_m2 == 0,
                EVEN_N2=kv_len % (block_n2 * kv_mult2) == 0, STATS_PASS=stats_pass, FULL_DELTA=any_grad,
                EMPTY_NAN=empty_nan, PRE_BLOCK=pre_block, num_warps=c.num_warps, num_stages=c.num_stages))
        grid, kv_tiles, kwargs = recipe
        args = (q, k, v, grad_out, dq, dk, dv, lse_x, lse_c, delta, dead, *fwd_tables, *tables, *grad_args,
                *bwd_strides, float(scale), kv_tiles)
        _run_kernel(_attn_bwd, grid, args, kwargs, (kept, site) if static_site else None)

    def run(name, do_dkdv, do_dq, stats_pass=False):
        fixed = kept.get(("run", name))
        if fixed is None:  # the fit key and attempts are the site's
            inner = (("block_m1",) if do_dkdv else ()) + (("block_n2",) if do_dq else ())
            key = _fit_key(name, hooks, modes=(mode_dkdv, mode_dq), full=any_grad, nan=empty_nan, **fit)
            fixed = kept[("run", name)] = (key, _attempts(cfg, inner))
        key, attempts = fixed
        _launch(_attn_bwd, key, attempts, lambda c: launch_bwd(c, do_dkdv, do_dq, stats_pass), kept)

    if hooks.has_score_mod:
        # Notes [exact delta] and [absorbed rows] in attn_bwd.py: rewrites DELTA / LSE_X / LSE_C of the q tiles
        # that need it before anything reads them (a tile that does not exits at once)
        run("stats", False, True, stats_pass=True)
    if mode_dkdv == 2:
        # deterministic captured gradients: pass 2 (dK/dV programs) must finish before pass 3 (dQ programs)
        run("dkdv", True, False)
        run("dq", False, True)
    else:
        run("bwd", True, True)

    for i, t in enumerate(captured):
        if not grad_needs[i]:
            continue
        g, fx, mb, cnt = bufs[i]
        val = _decode_fixed_point(g, fx, mb, cnt) if deterministic else g
        dcap[i] = val.to(t.dtype)
    return dq, dk, dv, dcap


def _backward_plan(q, k, v, captured, needs, score, mask, gqa_group, sparsity, deterministic) -> tuple:
    """What core_backward needs besides the tensors' data (Note [launch plans]); checks the call site once."""
    q_len, d, dv_dim = q.shape[2], q.shape[3], v.shape[3]
    device = q.device
    if sparsity is not None:
        _check_sparsity(sparsity, q, k)
    _check_captured(captured, device)
    float_needs = [n and t.is_floating_point() for t, n in zip(captured, needs)]
    hooks = _hooks(score, mask, captured, float_needs, q, k, backward=True)
    bounded = uses_kv_bounds(hooks)
    if bounded:
        sparsity = None
    grad_needs = tuple(n and hooks.grad_loads[i] > 0 for i, n in enumerate(float_needs))
    any_grad = any(grad_needs)
    cfg = configs.backward_config(max(d, dv_dim), q.dtype, device, heavy=hooks.heavy,
                                  score_mod=hooks.has_score_mod, entry_gathers=hooks.entry_gathers)
    cap_strides = _captured_args(captured)[1]
    grad_strides = tuple(int(s) for t in captured for s in torch.empty(t.shape, device="meta").stride())
    mode_dkdv = 2 if (any_grad and deterministic) else 0
    mode_dq = (3 if deterministic else 1) if any_grad else 0
    meta = dict(
        HAS_SCORE_MOD=hooks.has_score_mod, HAS_MASK=hooks.has_mask, HAS_SCORE_GRAD=hooks.has_score_grad,
        IS_SPARSE=sparsity is not None, GQA_GROUP=gqa_group, HEAD_DIM=d, HEAD_DIM_V=dv_dim,
        BLOCK_D=configs.head_block(d), BLOCK_DV=configs.head_block(dv_dim),
        INPUT_PRECISION=_input_precision(q.dtype), FP32_OPERANDS=_compat.triton_dot_needs_fp32_operands(),
        KV_BOUNDS=bounded,
        # Note [backward register pressure] in attn_bwd.py: 16-bit inputs round dS to 16 bits anyway
        DMOD_F16=hooks.score_grad_fits_f16 and q.dtype in (torch.float16, torch.bfloat16))
    fns = dict(SCORE_MOD=hooks.score_mod, MASK_MOD=hooks.mask_mod, SCORE_MOD_GRAD=hooks.score_mod_grad,
               CAPTURED_GRAD=hooks.captured_grad, **_bound_fns(hooks, bounded))
    fit = dict(cfg=cfg, dtype=q.dtype, device=str(device), **meta)
    placeholder = torch.empty(0, device=device)
    fwd_table_strides = _table_args(sparsity, placeholder, forward=True)[1:]
    table_strides = _table_args(sparsity, placeholder, forward=False)[1:]
    pre_block = min(_PREPROCESS_BLOCK, max(16, _pow2_at_least(q_len)))
    if _compat.triton_interpret_enabled() and device.type == "cpu":
        pre_block = configs.INTERPRETER_BLOCK
    kept = {"static": device.type == "cuda" and _static_launches_on()}  # Note [static launches]
    blocks = (sparsity.block_m, sparsity.block_n) if sparsity is not None else None
    return (hooks, grad_needs, cfg, meta, fns, fit, fwd_table_strides, table_strides, cap_strides, grad_strides,
            mode_dkdv, mode_dq, pre_block, kept, blocks)
