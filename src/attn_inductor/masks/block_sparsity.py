"""Block sparsity of a mask predicate: which (q block, kv block) tiles to visit.

Tables follow FlexAttention's layout so kernels loop over explicit index lists:
PARTIAL tiles evaluate the mask per entry, FULL tiles skip it, EMPTY tiles are
never loaded.  ``Bm``/``Hm`` are 1 when the predicate does not depend on ``b``
/ ``h`` (kernels broadcast with stride 0).

Soundness: a tile is FULL only if the predicate is True on every in-range entry
of it (entries past ``q_len``/``kv_len`` are masked by the kernel's bounds checks
regardless) and EMPTY only if it is False on every in-range entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    """Every tile FULL (no predicate) or PARTIAL (predicate with no usable structure)."""
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    bm = torch.full((1, 1, nq, nk), kind, dtype=torch.int8, device=device)
    return from_block_map(bm, block_m=block_m, block_n=block_n, q_len=q_len, kv_len=kv_len)
