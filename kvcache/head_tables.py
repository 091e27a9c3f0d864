"""Per-sequence, per-(layer, kv_head) cache state: block lists, lengths, budgets.

Slot layout of a head (slot r lives in block r // block_size of the head's list):
- unbounded (full, or select/dynamic before prefill ends): slot = position;
- bounded: positions < sink at slot = position; slots [sink, ring_base) hold the selected
  middle tokens; later positions j go to the ring, slot ring_base + (j - sink) % ring,
  overwriting the oldest.
"""

from __future__ import annotations

import torch

from headwise.kernels.layout import UNBOUNDED
from headwise.kvcache.budget import HeadBudget


class HeadTables:
    def __init__(self, budgets: list[list[HeadBudget]], pending: torch.Tensor, block_size: int,
                 max_blocks: int, context_len: int):
        self.budgets = budgets
        layers, heads = len(budgets), len(budgets[0])
        self.block_size = block_size
        self.context_len = context_len
        self.blocks: list[list[int]] = [[] for _ in range(layers * heads)]
        self.table = torch.zeros(layers, heads, max_blocks, dtype=torch.int32)
        self.nblocks = torch.zeros(layers, heads, dtype=torch.int64)
        self.lengths = torch.zeros(layers, heads, dtype=torch.int32)
        self.num_tokens = 0  # positions written so far
        self.peak_blocks = 0
        # heads that hold everything until prefill ends, then get their select budget
        self.pending = pending.clone()
        bounded = torch.tensor([[not b.full for b in row] for row in budgets]) & ~self.pending
        self.bounded = bounded
        self.sink = torch.tensor([[b.sink for b in row] for row in budgets], dtype=torch.int64)
        self.ring = torch.tensor([[b.recent or 0 for b in row] for row in budgets], dtype=torch.int64)
        self.ring_base = self.sink.clone()  # grows by the number of selected tokens
        self.sink = torch.where(bounded, self.sink, torch.zeros_like(self.sink))
        self.capacity = torch.tensor([[b.capacity(context_len) for b in row] for row in budgets],
                                     dtype=torch.int64)

    @property
    def num_blocks_held(self) -> int:
        return int(self.nblocks.sum())

    # -- kernel arguments (per head) -------------------------------------------------
    def mask_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keep, sink, recent) `[L, Hkv]` int32 for the attention ops."""
        unbounded = torch.full_like(self.ring, UNBOUNDED)
        recent = torch.where(self.bounded, self.ring, unbounded)
        keep = torch.where(self.bounded, self.ring_base, torch.zeros_like(self.ring))
        sink = torch.where(self.bounded, self.sink, torch.zeros_like(self.sink))
        return keep.int(), sink.int(), recent.int()

    # -- slots -----------------------------------------------------------------------
    def slots_for(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head slot index `[L, n, Hkv]` (-1 = not kept) for positions [start, end),
        and the lengths after writing them."""
        j = torch.arange(start, end, dtype=torch.int64)[None, :, None]  # [1, n, 1]
        b = self.bounded[:, None, :]
        sink = self.sink[:, None, :]
        ring = self.ring[:, None, :]
        base = self.ring_base[:, None, :]
        in_ring = b & (j >= sink)
        r = torch.where(in_ring, base + (j - sink) % ring.clamp(min=1), j)
        # a later token of the same chunk overwrites this ring slot, or the ring is empty
        dropped = in_ring & ((j < end - ring) | (ring == 0))
        r = torch.where(dropped, torch.full_like(r, -1), r)
        e = torch.tensor(end, dtype=torch.int64)
        bounded_len = torch.where(e <= self.sink, e, self.ring_base + torch.minimum(self.ring, e - self.sink))
        lengths = torch.where(self.bounded, bounded_len, e.expand_as(self.sink)).int()
        return r, lengths

    def flat_slots(self, r: torch.Tensor) -> torch.Tensor:
        """Head slot indices `[L, n, Hkv]` -> pool slots (-1 stays -1)."""
        bs = self.block_size
        idx = (r.clamp(min=0) // bs).permute(0, 2, 1)  # [L, Hkv, n]
        block = torch.gather(self.table, 2, idx.int().long()).permute(0, 2, 1).long()
        return torch.where(r >= 0, block * bs + r % bs, r)

    # -- blocks ----------------------------------------------------------------------
    def blocks_to_hold(self, num_tokens: int) -> torch.Tensor:
        """Blocks each head needs once `num_tokens` positions are written `[L, Hkv]`."""
        bs = self.block_size
        unbounded_need = torch.full_like(self.capacity, -(-num_tokens // bs))
        return torch.where(self.bounded, -(-self.capacity // bs), unbounded_need)

    def set_blocks(self, head: int, ids: list[int]) -> None:
        layers, heads = self.table.shape[:2]
        l, h = divmod(head, heads)
        self.blocks[head] = ids
        self.table[l, h, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        self.nblocks[l, h] = len(ids)
