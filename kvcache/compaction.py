"""What select heads keep when a request's prompt ends: the blocks they need, sealing the
prompt's tail to compact into it, the bounded heads' hand-over of their ring layout, and
the compaction of the whole-prompt heads into sink + selected + ring.

These are the bookkeeping halves (tables and pool); `KVCacheManager` calls them and moves
the K and V data (kvcache/manager.py). Layout rules come from kvcache/budget.py.
"""

from __future__ import annotations

import numpy as np
import torch

from headwise.kvcache.block_pool import BlockPool
from headwise.kvcache.budget import compacted_capacity, select_range
from headwise.kvcache.head_tables import HeadTables

# rank-local (source, destination) slots of one rank's moves, None when it has none
Moves = list[tuple[torch.Tensor, torch.Tensor] | None]


def _kept_blocks(tables: HeadTables, l: int, h: int, prompt_len: int, block_size: int) -> int:
    return -(-compacted_capacity(tables.budgets[l][h], prompt_len, tables.context_len) // block_size)


def blocks_needed(tables: HeadTables, prompt_len: int, block_size: int, in_place: bool) -> np.ndarray:
    """Fresh blocks per rank select heads take when the prompt ends: their whole new
    layout (prefix caching: the prompt blocks stay intact for later hits), or, compacting
    in place into the prompt's last blocks, what those lack (a budget beyond the prompt)."""
    need = np.zeros(tables.pending.shape, dtype=np.int64)
    prompt_blocks = -(-prompt_len // block_size)
    for l, h in zip(*np.nonzero(tables.pending & ~tables.bounded)):
        nkeep = _kept_blocks(tables, l, h, prompt_len, block_size)
        need[l, h] = max(0, nkeep - prompt_blocks) if in_place else nkeep
    return tables.per_rank(need)


def seal_tail(pool: BlockPool, tables: HeadTables, prompt_len: int, block_size: int) -> bool:
    """Prepare select heads to compact in place into the prompt's last blocks: possible
    when this request alone holds them (the ones this step adds are new). Their names
    are forgotten now, so no request admitted before the compaction can hit them."""
    prompt_blocks = -(-prompt_len // block_size)
    tails = []
    for l, h in zip(*np.nonzero(tables.pending & ~tables.bounded)):
        nkeep = _kept_blocks(tables, l, h, prompt_len, block_size)
        row = tables.row_blocks(l, h)
        tail = row[max(0, prompt_blocks - nkeep) :]  # the part of the tail already laid out
        tails.append(tail[tail >= 0])
    tail = np.concatenate(tails) if tails else np.zeros(0, dtype=np.int32)
    if (pool.ref[tail] > 1).any():
        return False
    pool.clear_hash(tail)
    tables.compact_in_place = True
    return True


def finish_bounded(pool: BlockPool, tables: HeadTables, block_size: int) -> None:
    """End of a bounded prefill: the prompt's last chunk wrote every bounded select
    head's ring layout into its first blocks; the head keeps those and gives back the
    rest (its running candidates' room)."""
    if tables.bounded_prefill is None:
        return
    p = tables.num_tokens
    released = []
    for l, h in zip(*np.nonzero(tables.pending & tables.bounded)):
        b = tables.budgets[l][h]
        nsel = select_range(b, p)[2]
        nkeep = _kept_blocks(tables, l, h, p, block_size)
        row = tables.row_blocks(l, h).copy()
        released.append(row[nkeep:])
        tables.to_ring(l, h, row[:nkeep], b.sink, b.sink + nsel, b.recent or 0)
    tables.commit_ring_params()
    for rest in released:
        pool.release(rest)


def compact(
    pool: BlockPool,
    tables: HeadTables,
    keep_full: torch.Tensor,
    scores: list[torch.Tensor],
    block_size: int,
    heads_per_rank: int,
) -> Moves:
    """End of a whole-prompt prefill: pending heads not in `keep_full` `[L, Hkv]` lay out
    sink + the `select` best-scored middle tokens (`scores[layer] [Hkv, P]`) + the recent
    ring in private blocks (the prompt's last ones when compacting in place, else the
    step's reserve); their prompt blocks go back to the pool (or stay in the prefix cache).
    Returns each rank's slot moves, which the caller applies to the K and V data."""
    p, bs = tables.num_tokens, block_size
    assert not (tables.pending & tables.bounded).any(), "bounded select heads end with finish_bounded"
    ranks = len(tables.reserve)
    srcs: list[list[torch.Tensor]] = [[] for _ in range(ranks)]
    dsts: list[list[torch.Tensor]] = [[] for _ in range(ranks)]
    released = []
    reserve = [list(r) for r in tables.reserve]
    for l, h in zip(*np.nonzero(tables.pending)):
        rank = h // heads_per_rank
        if keep_full[l, h]:
            tables.pending[l, h] = False
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
        dst = torch.cat([torch.arange(min(sink, p)), sink + torch.arange(nsel), base + (tail - sink) % max(ring, 1)])
        old = tables.row_blocks(l, h).astype(np.int64)
        nkeep = _kept_blocks(tables, l, h, p, bs)
        own = min(nkeep, len(old)) if tables.compact_in_place else 0
        # in place: the prompt's last blocks become the head's private blocks (the head of
        # the prompt stays cached); the rest, or everything, comes from the reserve
        extra = nkeep - own
        new = np.concatenate([old[len(old) - own :], np.array(reserve[rank][:extra], dtype=np.int64)])
        reserve[rank] = reserve[rank][extra:]
        pool.clear_hash(old[len(old) - own :])
        released.append(old[: len(old) - own])
        offset = rank * pool.blocks_per_rank
        old_t, new_t = torch.from_numpy(old - offset), torch.from_numpy(new - offset)
        srcs[rank].append(old_t[src // bs] * bs + src % bs)
        dsts[rank].append(new_t[dst // bs] * bs + dst % bs)
        tables.to_ring(l, h, new.astype(np.int32), sink, base, ring)
    tables.commit_ring_params()
    tables.reserve = [np.zeros(0, dtype=np.int32)] * ranks
    tables.compact_in_place = False
    for rest in reserve:
        pool.release(np.array(rest, dtype=np.int32))
    for old in released:
        pool.release(old.astype(np.int32))
    return [(torch.cat(s), torch.cat(d)) if s else None for s, d in zip(srcs, dsts)]
