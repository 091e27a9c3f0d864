"""The KV pool and its accounting: admission, growth, compaction and freeing of blocks.

Every request's block need is the sum over (layer, kv_head) of its heads' blocks
(docs/design.md, "KV cache"): bounded heads get their whole capacity once at admission, full
heads grow a block at a time, select/dynamic heads hold the prompt until prefill ends
and then shrink to their budget in the same step.
"""

from __future__ import annotations

import torch

from headwise.kvcache.block_pool import BlockPool
from headwise.kvcache.buffers import KVBuffers
from headwise.kvcache.budget import HeadBudget, compacted_capacity, select_range
from headwise.kvcache.head_tables import HeadTables


class KVCacheManager:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 num_blocks: int, max_model_len: int, dtype: torch.dtype, device: str = "cpu"):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size = block_size
        self.max_blocks_per_head = -(-max_model_len // block_size)
        self.pool = BlockPool(num_blocks)
        self.buffers = KVBuffers(
            k=torch.zeros(num_blocks, block_size, head_dim, dtype=dtype, device=device),
            v=torch.zeros(num_blocks, block_size, head_dim, dtype=dtype, device=device),
            pos=torch.zeros(num_blocks, block_size, dtype=torch.int32, device=device),
        )
        # bytes of K and V in one block (what a request's kv_bytes counts)
        self.block_bytes = 2 * block_size * head_dim * torch.finfo(dtype).bits // 8

    @staticmethod
    def bytes_per_block(block_size: int, head_dim: int, dtype: torch.dtype) -> int:
        """Pool bytes of one block: K, V and the int32 position of each slot."""
        return block_size * (2 * head_dim * torch.finfo(dtype).bits // 8 + 4)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    def new_seq(self, budgets: list[list[HeadBudget]], pending: torch.Tensor, context_len: int) -> HeadTables:
        return HeadTables(budgets, pending, self.block_size, self.max_blocks_per_head, context_len)

    def blocks_needed(self, tables: HeadTables, num_tokens: int) -> int:
        """Blocks to add so that `num_tokens` positions fit."""
        return int((tables.blocks_to_hold(num_tokens) - tables.nblocks).clamp(min=0).sum())

    def grow(self, tables: HeadTables, num_tokens: int) -> None:
        """Allocate the blocks `num_tokens` positions need (caller checked they are free)."""
        need = (tables.blocks_to_hold(num_tokens) - tables.nblocks).clamp(min=0).flatten().tolist()
        for head, n in enumerate(need):
            if n:
                tables.set_blocks(head, tables.blocks[head] + self.pool.allocate(n))
        tables.peak_blocks = max(tables.peak_blocks, tables.num_blocks_held)

    def free(self, tables: HeadTables) -> None:
        for head, ids in enumerate(tables.blocks):
            if ids:
                self.pool.free(ids)
                tables.set_blocks(head, [])

    def compact(self, tables: HeadTables, keep_full: torch.Tensor, scores: list[torch.Tensor]) -> None:
        """End of prefill: pending heads not in `keep_full` `[L, Hkv]` keep sink + the
        `select` best-scored middle tokens (`scores[layer] [Hkv, P]`) + the recent ring;
        their other blocks go back to the pool now."""
        p = tables.num_tokens
        bs = self.block_size
        moves_src, moves_dst = [], []
        for l in range(self.num_layers):
            for h in range(self.num_kv_heads):
                if not tables.pending[l, h]:
                    continue
                tables.pending[l, h] = False
                if keep_full[l, h]:
                    continue
                b = tables.budgets[l][h]
                sink, ring = b.sink, b.recent or 0
                mid_lo, mid_hi, nsel = select_range(b, p)
                chosen = torch.empty(0, dtype=torch.int64)
                if nsel:
                    chosen = torch.topk(scores[l][h, mid_lo:mid_hi], nsel).indices.sort().values + mid_lo
                tail = torch.arange(max(mid_hi, min(sink, p)), p)
                src = torch.cat([torch.arange(min(sink, p)), chosen, tail])
                base = sink + nsel
                dst = torch.cat([torch.arange(min(sink, p)), sink + torch.arange(nsel),
                                 base + (tail - sink) % max(ring, 1)])
                head = l * self.num_kv_heads + h
                old = torch.tensor(tables.blocks[head], dtype=torch.int64)
                moves_src.append(old[src // bs] * bs + src % bs)
                moves_dst.append(old[dst // bs] * bs + dst % bs)
                cap = compacted_capacity(b, p, tables.context_len)
                nkeep = -(-cap // bs)
                # freed blocks are only reused by a later allocation, after the copy below
                self.pool.free(tables.blocks[head][nkeep:])
                tables.set_blocks(head, tables.blocks[head][:nkeep])
                tables.bounded[l, h] = True
                tables.sink[l, h] = sink
                tables.ring[l, h] = ring
                tables.ring_base[l, h] = base
                tables.capacity[l, h] = cap
                tables.lengths[l, h] = len(src) and int(dst.max()) + 1
        if moves_src:
            # heads own disjoint blocks, so every head's move is one gather then one scatter
            device = self.buffers.k.device
            src_flat = torch.cat(moves_src).to(device)
            dst_flat = torch.cat(moves_dst).to(device)
            for t in (self.buffers.k, self.buffers.v, self.buffers.pos):
                flat = t.view(-1, *t.shape[2:])
                flat[dst_flat] = flat[src_flat]
