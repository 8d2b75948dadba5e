"""Block sparsity of a mask predicate: which (q block, kv block) tiles to visit.

Tables follow FlexAttention's layout so kernels loop over explicit index lists:
PARTIAL tiles evaluate the mask per entry, FULL tiles skip it, EMPTY tiles are
never loaded.  ``Bm``/``Hm`` are 1 when the predicate does not depend on ``b``
/ ``h`` (kernels broadcast with stride 0).

Soundness: a tile is FULL only if the predicate is True on every in-range entry
of it (entries past ``q_len``/``kv_len`` are masked by the kernel's bounds checks
regardless) and EMPTY only if it is False on every in-range entry.

``classify_blocks`` proves that by interval evaluation of the predicate over
each tile (``intervals.py``); ``get_block_sparsity`` is its cached front door;
``describe_block_map`` draws the map for ``explain``.
"""

from __future__ import annotations

import functools

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .. import _compat
from ..lowering import expr as E
from . import intervals

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True, eq=False)
class BlockSparsity:
    block_m: int
    block_n: int
    q_len: int
    kv_len: int
    # forward: per q block                                     shapes
    kv_num_blocks: torch.Tensor        # int32 [Bm, Hm, NQ]     PARTIAL kv blocks
    kv_indices: torch.Tensor           # int32 [Bm, Hm, NQ, NK] ascending, first kv_num_blocks valid
    full_kv_num_blocks: torch.Tensor   # int32 [Bm, Hm, NQ]     FULL kv blocks
    full_kv_indices: torch.Tensor      # int32 [Bm, Hm, NQ, NK]
    # backward (dK/dV): per kv block, the transpose
    q_num_blocks: torch.Tensor         # int32 [Bm, Hm, NK]
    q_indices: torch.Tensor            # int32 [Bm, Hm, NK, NQ]
    full_q_num_blocks: torch.Tensor    # int32 [Bm, Hm, NK]
    full_q_indices: torch.Tensor       # int32 [Bm, Hm, NK, NQ]

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_m)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_n)

    def block_map(self) -> torch.Tensor:
        """int8 [Bm, Hm, NQ, NK] with EMPTY / PARTIAL / FULL."""
        nk = self.num_kv_blocks
        out = torch.zeros(*self.kv_num_blocks.shape, nk + 1, dtype=torch.int8, device=self.kv_indices.device)
        ar = torch.arange(self.kv_indices.shape[-1], device=self.kv_indices.device)
        for num, idx, kind in ((self.kv_num_blocks, self.kv_indices, PARTIAL),
                               (self.full_kv_num_blocks, self.full_kv_indices, FULL)):
            valid = ar < num.unsqueeze(-1)
            tgt = torch.where(valid, idx.long(), torch.full_like(idx.long(), nk))
            out.scatter_(-1, tgt, torch.full_like(tgt, kind, dtype=torch.int8))
        return out[..., :nk]

    @property
    def density(self) -> float:
        """Fraction of tiles that are not EMPTY (mean over batch/heads)."""
        total = self.num_q_blocks * self.num_kv_blocks
        live = (self.kv_num_blocks + self.full_kv_num_blocks).sum(-1).double().mean().item()
        return live / total if total else 1.0


def from_block_map(block_map: torch.Tensor, *, block_m: int, block_n: int, q_len: int, kv_len: int) -> BlockSparsity:
    """Build the index tables from an int8 [Bm, Hm, NQ, NK] map of EMPTY/PARTIAL/FULL."""

    def tables(kind_mask: torch.Tensor):
        num = kind_mask.sum(-1, dtype=torch.int32)
        # stable sort puts selected block ids first, in ascending order
        order = torch.argsort((~kind_mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num.contiguous(), order.contiguous()

    partial = block_map == PARTIAL
    full = block_map == FULL
    kv_num, kv_idx = tables(partial)
    fkv_num, fkv_idx = tables(full)
    q_num, q_idx = tables(partial.transpose(-1, -2))
    fq_num, fq_idx = tables(full.transpose(-1, -2))
    return BlockSparsity(block_m, block_n, q_len, kv_len, kv_num, kv_idx, fkv_num, fkv_idx,
                         q_num, q_idx, fq_num, fq_idx)


def dense(*, block_m: int, block_n: int, q_len: int, kv_len: int, device="cpu", kind: int = FULL) -> BlockSparsity:
    """Every tile FULL (no predicate) or PARTIAL (predicate with no usable structure).

    Cached: unmasked attention asks for this on every call, and building the tables is a
    dozen small device launches."""
    device = torch.device(device)
    if _compat.cuda_graph_pool_active(device):  # Note [CUDA graphs]
        return _dense_cached.__wrapped__(block_m, block_n, q_len, kv_len, str(device), kind)
    return _dense_cached(block_m, block_n, q_len, kv_len, str(device), kind)


@functools.lru_cache(maxsize=64)
def _dense_cached(block_m: int, block_n: int, q_len: int, kv_len: int, device: str, kind: int) -> BlockSparsity:
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    bm = torch.full((1, 1, nq, nk), kind, dtype=torch.int8, device=device)
    return from_block_map(bm, block_m=block_m, block_n=block_n, q_len=q_len, kv_len=kv_len)


# ----------------------------------------------------------------------------- classification


def classify_blocks(pred, *, batch: int, heads: int, q_len: int, kv_len: int, captured, block_m: int,
                    block_n: int, device, unknown_loads: bool = False) -> BlockSparsity:
    """Classify every tile of a bool predicate by interval evaluation (see ``intervals.py``).

    ``pred`` is a bool ``Expr`` or None (no mask: every tile FULL).  The map is
    [Bm, Hm, NQ, NK] with ``Bm = batch`` only if the predicate mentions ``b``
    (directly or inside a load index), likewise ``Hm``.  Sound by construction:
    FULL and EMPTY are claimed only when proven for every in-range entry.
    """
    if pred is None:
        return dense(block_m=block_m, block_n=block_n, q_len=q_len, kv_len=kv_len, device=device, kind=FULL)
    symbols = E.free_symbols(pred) if not unknown_loads else _index_symbols(pred)
    bm = batch if "b" in symbols else 1
    hm = heads if "h" in symbols else 1
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    if nq == 0 or nk == 0:
        empty = torch.zeros((bm, hm, nq, nk), dtype=torch.int8, device=device)
        return from_block_map(empty, block_m=block_m, block_n=block_n, q_len=q_len, kv_len=kv_len)
    box = intervals.tile_box(batch=bm, heads=hm, q_len=q_len, kv_len=kv_len,
                             block_m=block_m, block_n=block_n, device=device)
    truth = intervals.bound_predicate(pred, box, captured, device=device, unknown_loads=unknown_loads)
    must, may = truth.must.expand(bm, hm, nq, nk), truth.may.expand(bm, hm, nq, nk)
    # must & ~may cannot happen for a sound analysis of a non-empty tile; PARTIAL is the safe reading
    # torch.where, not masked assignment: a boolean index_put syncs with the device
    block_map = torch.where(must & may, FULL, torch.where(~may & ~must, EMPTY, PARTIAL)).to(torch.int8)
    return from_block_map(block_map, block_m=block_m, block_n=block_n, q_len=q_len, kv_len=kv_len)


# ----------------------------------------------------------------------------- cache
#
# Note [block sparsity cache keys]
#   Index-only predicates are keyed by value.  A predicate that loads captured
#   tensors is keyed additionally by each referenced tensor's id, _version,
#   shape, strides, storage offset, dtype and device, and the entry keeps a
#   weakref that must still point at the very object passed in: an id (or a
#   data_ptr) of a freed tensor is reused by the next allocation, and a stale
#   hit would silently return a wrong map.  The version counter sees in-place
#   ops on the tensor and its views; it does not see writes through `.data`,
#   numpy views or raw storage, nor exist for inference tensors (not cached).
#   Call `clear_block_sparsity_cache()` after such writes.

_CACHE_SIZE = 64
_cache: "OrderedDict[tuple, tuple[tuple, BlockSparsity]]" = OrderedDict()


def _tensor_key(t: torch.Tensor) -> tuple | None:
    if not isinstance(t, torch.Tensor) or t.is_inference():
        return None
    return (id(t), t._version, t.shape, t.stride(), t.storage_offset(), t.dtype, t.device)


@functools.lru_cache(maxsize=256)
def _buffers(pred) -> tuple[int, ...]:
    return tuple(sorted({load.buffer for load in E.loads(pred)})) if pred is not None else ()


# Note [changing mask tensors]
#   A predicate whose loads are indexed by plain indices (``pad[b, kv_idx]``,
#   ``doc[q_idx] == doc[kv_idx]``: padding and document masks) is classified
#   by a few small device ops with no value read on the host
#   (``intervals._tile_load_bounds``), so a tensor that changes every call
#   (a padding mask per batch) is classified exactly every call, on the
#   stream, at the cost of those launches.  Any other load (a gather at
#   ``q_idx - kv_idx``, say) needs ``load_bounds``: several device-to-host
#   syncs, each of which stalls the host until the GPU has finished
#   everything queued before it.  Right for a constant buffer, classified once
#   and cached; ruinous for a tensor that changes every call.  So with
#   ``on_change="unknown_loads"`` (what the runtime asks for), such a call
#   site (predicate, shapes, blocks, device) is classified exactly the first
#   time only; once it misses its cache entry with other tensors (a new
#   object, an in-place change, or an inference tensor, which has no version
#   to key on), it is classified with every load unknown: the index-only part
#   of the predicate still gives EMPTY tiles (causal, windows), every other
#   tile is PARTIAL and the kernel evaluates the mask there.  Sound, no sync,
#   and cached by value.  A hit (the very tensor object, same version) still
#   gets the exact map; ``on_change="exact"`` (explain, tests) classifies
#   exactly every time.
#
# Note [CUDA graphs]
#   Under ``mode="reduce-overhead"`` Inductor's CUDA graph trees run a call
#   once to warm up and once more under stream capture, both allocating from
#   the graph's private pool, then replay the graph with no Python at all.
#   A sparsity table cached then would be pool memory the trees do not know
#   of (they refuse: "allocated but not accounted for") and that later
#   replays overwrite; a table cached earlier and read into a capture would
#   be read by every replay, after the cache may have freed it.  So while
#   ``_compat.cuda_graph_pool_active`` the caches are neither read nor
#   filled: the classification runs as device ops that the graph records and
#   replays on each call's mask.  Gathered loads need host syncs, which a
#   capture forbids: they are classified with loads unknown (sound).
_SITES_MAX = 256
_sites: "OrderedDict[tuple, bool]" = OrderedDict()  # call site -> its loads have changed


def _index_symbols(pred) -> set:
    """The index symbols ``pred`` uses outside loads (what a loads-unknown classification depends on)."""
    found: set = set()

    def walk(e):
        if isinstance(e, E.Load):
            return
        if isinstance(e, E.Index):
            found.add(e.name)
        for c in e.children():
            walk(c)
    walk(pred)
    return found


@functools.lru_cache(maxsize=256)
def loads_at_plain_indices(pred) -> bool:
    """Every load of ``pred`` is ``intervals.at_plain_indices``: its tiles are classified by device ops
    alone, so a tensor that changes every call can be classified every call (Note [changing mask
    tensors])."""
    return all(intervals.at_plain_indices(ld.indices) for ld in E.loads(pred))


@functools.lru_cache(maxsize=128)
def _loads_unknown(pred, batch: int, heads: int, q_len: int, kv_len: int, block_m: int, block_n: int,
                   device: str) -> BlockSparsity:
    return classify_blocks(pred, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, captured=(),
                           block_m=block_m, block_n=block_n, device=device, unknown_loads=True)


def get_block_sparsity(pred, *, batch: int, heads: int, q_len: int, kv_len: int, captured, block_m: int,
                       block_n: int, device, on_change: str = "exact") -> BlockSparsity:
    """Cached :func:`classify_blocks`; see Notes [block sparsity cache keys] and [changing mask tensors]."""
    if on_change not in ("exact", "unknown_loads"):
        raise ValueError(f"on_change must be 'exact' or 'unknown_loads', got {on_change!r}")
    device = torch.device(device)
    if _compat.cuda_graph_pool_active(device):  # Note [CUDA graphs]: neither read nor fill the caches
        unknown = (pred is not None and on_change == "unknown_loads" and torch.cuda.is_current_stream_capturing()
                   and not loads_at_plain_indices(pred))
        return classify_blocks(pred, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len,
                               captured=() if unknown else captured, block_m=block_m, block_n=block_n,
                               device=device, unknown_loads=unknown)
    buffers = _buffers(pred)
    tensor_keys = tuple(_tensor_key(captured[i]) for i in buffers)
    site = (pred, batch, heads, q_len, kv_len, block_m, block_n, device)
    if None in tensor_keys:
        if on_change == "unknown_loads" and not loads_at_plain_indices(pred) and site in _sites:
            return _loads_unknown(pred, batch, heads, q_len, kv_len, block_m, block_n, str(device))
        _remember_site(site, changed=True)
        return classify_blocks(pred, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, captured=captured,
                               block_m=block_m, block_n=block_n, device=device)
    key = site + (buffers, tensor_keys)
    hit = _cache.get(key)
    if hit is not None:
        refs, bs = hit
        if all(ref() is captured[i] for i, ref in zip(buffers, refs)):
            _cache.move_to_end(key)
            return bs
        del _cache[key]  # an id reused by a new object
    if on_change == "unknown_loads" and buffers and not loads_at_plain_indices(pred) and _sites.get(site) is not None:
        _sites[site] = True
        return _loads_unknown(pred, batch, heads, q_len, kv_len, block_m, block_n, str(device))
    if buffers:
        _remember_site(site, changed=False)
    args = dict(batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, captured=captured,
                block_m=block_m, block_n=block_n, device=device)
    bs = classify_blocks(pred, **args)
    _cache[key] = (tuple(weakref.ref(captured[i]) for i in buffers), bs)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return bs


def _remember_site(site: tuple, changed: bool) -> None:
    _sites[site] = changed or _sites.get(site, False)
    _sites.move_to_end(site)
    while len(_sites) > _SITES_MAX:
        _sites.popitem(last=False)


def clear_block_sparsity_cache() -> None:
    _cache.clear()
    _sites.clear()
    _loads_unknown.cache_clear()


# ----------------------------------------------------------------------------- explain

_GLYPHS = {FULL: "█", PARTIAL: "░", EMPTY: "·"}


def describe_block_map(bs: BlockSparsity, max_side: int = 16) -> str:
    """A text picture of the (first batch/head) block map plus the density, for ``explain``.

    '█' FULL, '░' PARTIAL, '·' EMPTY.  Larger maps are downsampled: a cell is
    FULL or EMPTY only if every tile under it is, otherwise '░'.
    """
    full_map = bs.block_map()
    nq, nk = full_map.shape[-2:]
    bm, hm = full_map.shape[:2]
    tiles = full_map[0, 0].cpu()
    rows, cols = min(nq, max_side), min(nk, max_side)
    lines = []
    for r in range(rows):
        r0, r1 = r * nq // rows, (r + 1) * nq // rows
        line = []
        for c in range(cols):
            cell = tiles[r0:r1, c * nk // cols:(c + 1) * nk // cols]
            kind = FULL if bool((cell == FULL).all()) else EMPTY if bool((cell == EMPTY).all()) else PARTIAL
            line.append(_GLYPHS[kind])
        lines.append("".join(line))
    counts = {kind: int((full_map == kind).sum()) for kind in (FULL, PARTIAL, EMPTY)}
    total = max(full_map.numel(), 1)
    scope = f"b=0, h=0 of {bm}×{hm}" if bm * hm > 1 else "all batches/heads"
    summary = (f"density {bs.density:.1%}  ({nq}×{nk} tiles of {bs.block_m}×{bs.block_n}; "
               f"full {counts[FULL] / total:.1%}, partial {counts[PARTIAL] / total:.1%}, "
               f"empty {counts[EMPTY] / total:.1%}; picture: {scope}"
               + (f", downsampled to {rows}×{cols}" if (rows, cols) != (nq, nk) else "") + ")")
    return "\n".join(lines + [summary])
