"""SiteReport: what happened at one attention site, in words a user can act on.

Built at compile time by the backend (one per softmax it found) and printed by
``explain``.  Refusal reasons are the matcher's ``MatchFailure`` text verbatim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx

from . import ops
from .lowering.extract import node_shape
from .lowering.match import AttentionMatch, MatchFailure


@dataclass
class SiteReport:
    graph: int
    site: int
    node: str | None
    rewritten: bool
    reason: str | None = None
    score: str | None = None
    mask: str | None = None
    scale: float | None = None
    sparsity: float | None = None       # fraction of tiles visited (1.0 = dense); None: decided at run time
    sparsity_note: str | None = None
    block_map: str | None = None
    q_shape: tuple | None = None
    k_shape: tuple | None = None
    v_shape: tuple | None = None
    gqa_group: int | None = None
    implementation: str | None = None
    blocks: tuple | None = None
    walk: str | None = None             # how the kernels find their tiles: closed-form bounds or tables
    lengths: str | None = None          # symbolic sizes: every length, or why not (Note [dynamic sizes])
    captured: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _captured_name(node: fx.Node, source_names: dict) -> str:
    return source_names.get(node) or node.name


def describe_failure(graph_id: int, site: int, softmax: fx.Node, failure: MatchFailure) -> SiteReport:
    return SiteReport(graph=graph_id, site=site, node=failure.node or softmax.name, rewritten=False,
                      reason=failure.reason)


def describe_match(graph_id: int, site: int, m: AttentionMatch, real_inputs: dict, options,
                   source_names: dict | None = None) -> SiteReport:
    names = [_captured_name(n, source_names or {}) for n in m.captured]
    desc = m.spec.describe(names)
    q_val = m.softmax.meta.get("val")
    device = q_val.device if isinstance(q_val, torch.Tensor) else torch.device("cpu")
    try:
        impl = ops.implementation_name(device, options.impl)
    except RuntimeError as exc:
        impl = f"error: {exc}"
    rep = SiteReport(
        graph=graph_id, site=site, node=m.softmax.name, rewritten=True, score=desc["score"], mask=desc["mask"],
        scale=m.spec.scale, q_shape=tuple(m.q_shape), k_shape=tuple(m.k_shape),
        v_shape=tuple(m.v_shape), gqa_group=m.spec.gqa_group, implementation=impl,
        captured=[f"{n}{list(node_shape(c))}" for n, c in zip(names, m.captured)],
    )
    _fill_sparsity(rep, m, real_inputs, device, impl)
    return rep


def _fill_sparsity(rep: SiteReport, m: AttentionMatch, real_inputs: dict, device, impl: str) -> None:
    pred = m.spec.live_mask
    B, Hq, Lq, _ = rep.q_shape
    Lk = rep.k_shape[2]
    try:
        if impl.startswith("triton"):
            from .templates import launch as impl_mod
        else:
            from . import cpu as impl_mod
        meta = lambda shape, dt: torch.empty(shape, dtype=dt, device="meta")  # noqa: E731
        qv = m.softmax.meta.get("val")
        dt = qv.dtype if isinstance(qv, torch.Tensor) else torch.float32
        fake_q = meta(rep.q_shape, dt)
        fake_k = meta(rep.k_shape, dt)
        fake_v = meta(rep.v_shape, dt)
        block_m, block_n = impl_mod.preferred_blocks(fake_q, fake_k, fake_v)
        rep.blocks = (block_m, block_n)
    except Exception as exc:  # noqa: BLE001 - the report must not fail the compile
        rep.sparsity_note = f"block configuration unavailable: {type(exc).__name__}: {exc}"
        return
    if pred is None:
        rep.sparsity = 1.0
        rep.sparsity_note = "no mask: dense"
        return
    if impl.startswith("triton"):  # Note [closed-form bounds] in masks/bounds.py
        from .masks.bounds import kv_interval

        if impl_mod.walks_bounds(pred):
            rep.walk = f"closed-form kv bounds {kv_interval(pred).describe()} (in the kernel, no tables)"
        else:
            rep.walk = "block-sparsity tables"
    captured = []
    for c in m.captured:
        real = real_inputs.get(c)
        if real is None:
            captured.append(None)
        else:
            captured.append(real)
    from .lowering import expr as E

    needed = {ld.buffer for ld in E.loads(pred)}
    if any(captured[i] is None for i in needed):
        rep.sparsity_note = "mask reads a tensor computed inside the graph: sparsity decided at run time"
        return
    try:
        from .masks.block_sparsity import get_block_sparsity

        cpu_caps = [c.detach().cpu() if isinstance(c, torch.Tensor) else c for c in captured]
        bs = get_block_sparsity(pred, batch=B, heads=Hq, q_len=Lq, kv_len=Lk, captured=cpu_caps,
                                block_m=block_m, block_n=block_n, device="cpu")
        rep.sparsity = bs.density
        try:
            from .masks.block_sparsity import describe_block_map

            rep.block_map = describe_block_map(bs)
        except Exception:  # noqa: BLE001
            rep.block_map = None
        if needed:
            from .masks.block_sparsity import loads_at_plain_indices

            rep.sparsity_note = ("from the example inputs; recomputed on the device when the tensor changes"
                                 if loads_at_plain_indices(pred) else
                                 "from the example inputs; a tensor that changes between calls gets index-only "
                                 "tile skipping")
    except Exception as exc:  # noqa: BLE001
        rep.sparsity_note = f"sparsity not computed: {type(exc).__name__}: {exc}"
