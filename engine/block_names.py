"""A request's side of prefix caching: the names (chained hashes) of its whole blocks, which
of them a hit may cover, and registering the blocks each step completes.
The cache itself (lookup, per-head hit length, eviction) is `kvcache/prefix_cache.py`;
docs/design.md, "Prefix caching"."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from headwise.engine.sequence import Sequence
from headwise.kvcache.manager import KVCacheManager
from headwise.kvcache.prefix_cache import chain_hashes, seed_hash

Budgets = Callable[[Sequence], tuple[list, np.ndarray]]


class BlockNames:
    def __init__(self, kv_manager: KVCacheManager, model_id: str, dtype: str, budgets: Budgets) -> None:
        """`budgets(seq)`: the request's head budgets and the heads that select at the end of
        its prompt, in the tables' column order (LLMEngine._budgets)."""
        self.kv_manager = kv_manager
        self.model_id = model_id
        self.dtype = dtype
        self.budgets = budgets

    def seed(self, seq: Sequence) -> int:
        """The root of a request's block names: what, besides its tokens, decides the K/V its
        prompt leaves in the cache. While the prompt is computed, full, select and dynamic
        heads all see everything, so those plans share cached blocks with the full plan;
        window and elastic heads name their resolved (sink, recent)."""
        budgets, pending = self.budgets(seq)
        seen = tuple(
            tuple(None if b.full or p else (b.sink, b.recent) for b, p in zip(row, prow))
            for row, prow in zip(budgets, pending)
        )
        return seed_hash(self.model_id, self.dtype, self.kv_manager.block_size, seen)

    def hit_candidates(self, seq: Sequence) -> list[int]:
        """Names of the blocks a prefix-cache hit may cover: whole blocks before the last token
        (the step must compute one to have logits), and for plans that select at the end of
        the prompt none of the positions whose queries the selection needs."""
        if seq.params.prompt_logprobs is not None:
            return []
        bs = self.kv_manager.block_size
        limit = (seq.num_tokens - 1) // bs
        if seq.capture_window:
            limit = min(limit, max(0, seq.num_prompt_tokens - seq.capture_window) // bs)
        return self._hashes(seq, limit)

    def register(self, seq: Sequence) -> None:
        """Name the blocks this step completed, while the request's K/V is what a fresh
        prefill of its tokens would compute (before any select head compacts)."""
        done = seq.num_computed_tokens // self.kv_manager.block_size
        if not seq.cacheable or done <= seq.num_registered:
            return
        first = seq.num_registered
        self.kv_manager.register(seq.kv, self._hashes(seq, done)[first:], first)
        seq.num_registered = done

    def _hashes(self, seq: Sequence, n: int) -> list[int]:
        """The names of `seq`'s first n blocks, extending the chain it has so far."""
        if len(seq.block_hashes) < n:
            bs = self.kv_manager.block_size
            have = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if have else seq.hash_seed
            seq.block_hashes += chain_hashes(parent, seq.all_token_ids[have * bs : n * bs], bs)
        return seq.block_hashes[:n]
