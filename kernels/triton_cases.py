"""Paged-cache cases for checking and benchmarking the kernels against their references.

Builds what the engine builds, in miniature: per-(sequence, KV head) block tables over a
shared pool, sink + recent-ring slot mappings (docs/design.md, "KV cache") and the lengths / keep
vectors the ops take. Used by the kernel tests and by `headwise.kernels.bench`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.kernels.layout import UNBOUNDED


@dataclass
class PagedCache:
    """A pool plus the tables and per-head lengths of S sequences x Hkv heads."""

    k_cache: torch.Tensor  # [num_blocks, block_size, D]
    v_cache: torch.Tensor
    pos_cache: torch.Tensor  # [num_blocks, block_size] int32
    block_tables: torch.Tensor  # [S, Hkv, max_blocks] int32
    lengths: torch.Tensor  # [S, Hkv] int32

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]


def head_capacity(sink: int, recent: int, tokens: int) -> int:
    """Slots a head needs to hold `tokens` tokens: all of them, or sink + a recent ring."""
    return tokens if recent >= UNBOUNDED else min(tokens, sink + recent)


def allocate(
    capacities: torch.Tensor,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator,
    fill: str = "randn",
) -> PagedCache:
    """A pool with ceil(capacity / block_size) shuffled blocks per head; lengths start at 0.

    fill: "randn" for random K/V, "empty" to leave the pool uninitialised (large benchmarks).
    Unused table entries point at block 0, which the ops never read past `lengths`.
    """
    caps = capacities.to("cpu", torch.int64)
    need = (caps + block_size - 1) // block_size
    num_blocks = int(need.sum()) + 1
    order = torch.randperm(num_blocks, generator=generator)
    tables = torch.zeros(*caps.shape, max(1, int(need.max()) if need.numel() else 1), dtype=torch.int32)
    flat_need = need.reshape(-1).tolist()
    start = 0
    flat_tables = tables.view(-1, tables.shape[-1])
    for i, n in enumerate(flat_need):
        flat_tables[i, :n] = order[start : start + n]
        start += n
    shape = (num_blocks, block_size, head_dim)
    if fill == "randn":
        k = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
        v = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    else:
        k = torch.empty(shape, device=device, dtype=dtype)
        v = torch.empty(shape, device=device, dtype=dtype)
    pos = torch.zeros(num_blocks, block_size, dtype=torch.int32, device=device)
    lengths = torch.zeros(caps.shape, dtype=torch.int32, device=device)
    return PagedCache(k, v, pos, tables.to(device), lengths)


def ring_slots(positions: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """A head's own slot index for each token position: sinks first, then a ring of `recent`."""
    if recent >= UNBOUNDED:
        return positions
    return torch.where(positions < sink, positions, sink + (positions - sink) % recent)


def slot_mapping(
    cache: PagedCache, positions: torch.Tensor, seqs: torch.Tensor, sink: torch.Tensor, recent: torch.Tensor
) -> torch.Tensor:
    """Flat slots `[T, Hkv]` for writing tokens (consecutive positions per sequence).

    A ring row that a newer token of the same write overwrites is dropped (-1), so no slot
    is written twice; this is what the budget keeps. Also advances `cache.lengths`.
    """
    bs = cache.block_size
    pos, seq = positions.to("cpu", torch.int64), seqs.to("cpu", torch.int64)
    tables = cache.block_tables.cpu().long()
    out = torch.full((pos.shape[0], tables.shape[1]), -1, dtype=torch.int32)
    lengths = cache.lengths.cpu()
    for s in seq.unique().tolist():
        rows = (seq == s).nonzero().squeeze(1)
        p = pos[rows]
        last = int(p.max())
        for h in range(tables.shape[1]):
            keep_s, recent_s = int(sink[s, h]), int(recent[s, h])
            slot = ring_slots(p, keep_s, recent_s)
            kept = (p < keep_s) | (p > last - recent_s)
            flat = tables[s, h, slot // bs] * bs + slot % bs
            out[rows[kept], h] = flat[kept].to(torch.int32)
            lengths[s, h] = max(int(lengths[s, h]), head_capacity(keep_s, recent_s, last + 1))
    cache.lengths.copy_(lengths)
    return out.to(positions.device)


def keep_of(cache: PagedCache, sink: torch.Tensor) -> torch.Tensor:
    """`keep` for paged_prefix: the sink slots that exist so far."""
    return torch.minimum(sink.to(cache.lengths), cache.lengths)


def rows_of(cache: PagedCache) -> torch.Tensor:
    """Table rows of the cache's sequences: sequence s owns row s."""
    return torch.arange(cache.block_tables.shape[0], dtype=torch.int32, device=cache.block_tables.device)


def decode_args(
    cache: PagedCache, q: torch.Tensor, q_pos: torch.Tensor, sink: torch.Tensor, recent: torch.Tensor, scale: float
) -> tuple:
    """paged_decode's arguments for one newest token per sequence at `q_pos [S]`."""
    return (
        q,
        cache.k_cache,
        cache.v_cache,
        cache.pos_cache,
        cache.block_tables,
        rows_of(cache),
        cache.lengths,
        keep_of(cache, sink),
        recent.to(cache.lengths),
        q_pos.to(cache.lengths),
        scale,
    )


def prefill_in_chunks(
    ops,
    cache: PagedCache,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: list[int],
    sink: torch.Tensor,
    recent: torch.Tensor,
    chunk: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill prompts (rows of q / k / v grouped by sequence) `chunk` tokens at a time.

    Each step is what the engine does (docs/design.md, "KV cache"): attention of the chunk over
    the cached slots (paged_prefix) merged with causal attention inside the chunk
    (sink_window_prefill), then the chunk's kept K/V are written. `ops` is
    `headwise.kernels.reference` or `headwise.kernels.triton_ops`. Returns out and lse
    for every row.
    """
    device = q.device
    starts = [sum(seq_lens[:s]) for s in range(len(seq_lens))]
    done = [0] * len(seq_lens)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=device)
    while any(d < n for d, n in zip(done, seq_lens)):
        rows: list[int] = []
        pos: list[int] = []
        seqs: list[int] = []
        cu = [0]
        for s, n in enumerate(seq_lens):
            take = min(chunk, n - done[s])
            rows += range(starts[s] + done[s], starts[s] + done[s] + take)
            pos += range(done[s], done[s] + take)
            seqs += [s] * take
            cu.append(cu[-1] + take)
            done[s] += take
        idx = torch.tensor(rows, device=device)
        pos_t = torch.tensor(pos, device=device)
        seq_t = torch.tensor(seqs, device=device)
        cu_t = torch.tensor(cu, device=device, dtype=torch.int32)
        qc = q[idx]
        o1, l1 = ops.paged_prefix(
            qc,
            pos_t,
            seq_t,
            cache.k_cache,
            cache.v_cache,
            cache.pos_cache,
            cache.block_tables,
            rows_of(cache),
            cache.lengths,
            keep_of(cache, sink),
            recent,
            scale,
        )
        o2, l2 = ops.sink_window_prefill(qc, k[idx], v[idx], pos_t, cu_t, sink, recent, scale)
        out[idx], lse[idx] = ops.merge_states(o1, l1, o2, l2)
        slots = slot_mapping(cache, pos_t, seq_t, sink, recent)
        ops.kv_write(k[idx], v[idx], pos_t, slots, cache.k_cache, cache.v_cache, cache.pos_cache)
    return out, lse


def position_aligned_cache(
    newest: list[int],
    sink: torch.Tensor,
    recent: torch.Tensor,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator,
) -> tuple[PagedCache, torch.Tensor, torch.Tensor]:
    """The engine's layout: each (sequence, head) keeps its sink blocks, then the blocks that
    overlap its window (newest - recent, newest]; blocks in between were freed. The oldest
    window block may still hold positions that left the window (the kernels mask them).

    Returns the cache (every position of a kept block written, lengths set) and the K and V
    of every position `[S, max(newest) + 1, Hkv, D]` (fp32) for a dense check.
    """
    s_count, hkv = sink.shape
    n_pos = max(newest) + 1
    k_all = torch.randn(s_count, n_pos, hkv, head_dim, generator=generator)
    v_all = torch.randn(s_count, n_pos, hkv, head_dim, generator=generator)
    kept: list[list[list[int]]] = []
    for s, p in enumerate(newest):
        row = []
        for h in range(hkv):
            last = p // block_size
            if recent[s, h] >= UNBOUNDED:
                row.append(list(range(last + 1)))
                continue
            ns = -(-int(sink[s, h]) // block_size)
            first = max(ns, max(0, p - int(recent[s, h]) + 1) // block_size)
            row.append(sorted(set(range(min(ns, last + 1))) | set(range(first, last + 1))))
        kept.append(row)
    width = max(len(lb) for row in kept for lb in row)
    num_blocks = sum(len(lb) for row in kept for lb in row) + 1
    order = torch.randperm(num_blocks, generator=generator)[: num_blocks - 1].tolist()
    tables = torch.zeros(s_count, hkv, width, dtype=torch.int32)
    lengths = torch.zeros(s_count, hkv, dtype=torch.int32)
    k_cache = torch.zeros(num_blocks, block_size, head_dim)
    v_cache = torch.zeros_like(k_cache)
    pos_cache = torch.full((num_blocks, block_size), -1, dtype=torch.int32)
    for s, p in enumerate(newest):
        for h in range(hkv):
            for i, lb in enumerate(kept[s][h]):
                blk = order.pop()
                tables[s, h, i] = blk
                for j in range(lb * block_size, min((lb + 1) * block_size, p + 1)):
                    k_cache[blk, j % block_size] = k_all[s, j, h]
                    v_cache[blk, j % block_size] = v_all[s, j, h]
                    pos_cache[blk, j % block_size] = j
            lengths[s, h] = (len(kept[s][h]) - 1) * block_size + p % block_size + 1
    cache = PagedCache(
        k_cache.to(device=device, dtype=dtype),
        v_cache.to(device=device, dtype=dtype),
        pos_cache.to(device),
        tables.to(device),
        lengths.to(device),
    )
    return cache, k_all, v_all
