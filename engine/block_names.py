"""A request's side of prefix caching: the names (chained hashes) of its whole blocks, which
of them a hit may cover, and registering the blocks each step completes.
The cache itself (lookup, per-head hit length, eviction) is `kvcache/prefix_cache.py`;
docs/design.md, "Prefix caching"."""

from __future__ import annotations

from headwise.engine.sequence import Sequence
from headwise.kvcache.manager import KVCacheManager
from headwise.kvcache.prefix_cache import chain_hashes, seed_hash


def name_seed(seq: Sequence, model_id: str, dtype: str, block_size: int) -> int:
    """The root of a request's block names: what, besides its tokens, decides the K/V its
    prompt leaves in the cache. While the prompt is computed, full, select and dynamic
    heads all see everything, so those plans share cached blocks with the full plan;
    window and elastic heads name their resolved (sink, recent). Needs `seq.budgets`."""
    seen = tuple(
        tuple(None if b.full or p else (b.sink, b.recent) for b, p in zip(row, prow))
        for row, prow in zip(seq.budgets, seq.pending_heads)
    )
    return seed_hash(model_id, dtype, block_size, seen)


def hit_candidates(seq: Sequence, block_size: int) -> list[int]:
    """Names of the blocks a prefix-cache hit may cover: whole blocks before the last token
    (the step must compute one to have logits), and for plans that select at the end of
    the prompt none of the positions whose queries the selection needs."""
    if seq.params.prompt_logprobs is not None:
        return []
    limit = (seq.num_tokens - 1) // block_size
    if seq.probe_window:
        limit = min(limit, max(0, seq.num_prompt_tokens - seq.probe_window) // block_size)
    return block_hashes(seq, limit, block_size)


def register_blocks(seq: Sequence, kv_manager: KVCacheManager, written: int) -> None:
    """Name the blocks completed once positions up to `written` are in the cache, while the
    request's K/V is what a fresh prefill of its tokens would compute (before any select
    head compacts)."""
    done = written // kv_manager.block_size
    if not seq.cacheable or done <= seq.num_registered:
        return
    first = seq.num_registered
    kv_manager.register(seq.kv, block_hashes(seq, done, kv_manager.block_size)[first:], first)
    seq.num_registered = done


def block_hashes(seq: Sequence, n: int, block_size: int) -> list[int]:
    """The names of `seq`'s first n blocks, extending the chain it has so far."""
    if len(seq.block_hashes) < n:
        have = len(seq.block_hashes)
        parent = seq.block_hashes[-1] if have else seq.hash_seed
        seq.block_hashes += chain_hashes(parent, seq.all_token_ids[have * block_size : n * block_size], block_size)
    return seq.block_hashes[:n]
