"""Refcounted blocks shared by every layer and KV head: a free stack, and cached blocks.

A block is free (no user, no content worth keeping), held (its refcount counts the
requests whose tables name it) or evictable: no user, but it carries a content hash, so a
later request with the same tokens may take it back (prefix caching, docs/design.md
"Prefix caching"). Allocation takes free blocks first, then evicts the least recently
released evictable ones, *cold* ones first: blocks released while their request still ran
(a window head's blocks that left its window, transient blocks) only serve hits that end
inside a prompt, while the blocks a request held to its end serve any re-send of it. So a
pool under a head-aware plan keeps about 1 / (KV ratio) as many whole prompts cached.
Evictable blocks count as available everywhere (admission, `kv_cache_usage_perc`).

With tensor parallelism each rank's KV pool holds the blocks of its own heads: block ids
[r * P, (r + 1) * P) are rank r's (P blocks per rank), each rank has its own free stack and
eviction order, and every count is per rank (`num_free_per_rank`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

NO_HASH = 0  # block_hash of a block whose content is not cached


class BlockPool:
    def __init__(self, blocks_per_rank: int, ranks: int = 1):
        self.blocks_per_rank, self.ranks = blocks_per_rank, ranks
        self.num_blocks = blocks_per_rank * ranks
        self.ref = np.zeros(self.num_blocks, dtype=np.int32)
        self.block_hash = np.zeros(self.num_blocks, dtype=np.int64)
        # per rank, a stack popped from the end (its lowest ids first)
        self._free = [
            np.arange((r + 1) * blocks_per_rank - 1, r * blocks_per_rank - 1, -1, dtype=np.int32) for r in range(ranks)
        ]
        self._num_free = np.full(ranks, blocks_per_rank, dtype=np.int64)
        # evictable blocks in release order per rank and tier (cold, warm); an entry is live
        # while its epoch matches
        self._lru: list[tuple[deque[tuple[int, int]], deque[tuple[int, int]]]] = [
            (deque(), deque()) for _ in range(ranks)
        ]
        self._epoch = np.zeros(self.num_blocks, dtype=np.int64)
        self._evictable = np.zeros(self.num_blocks, dtype=bool)
        self._num_evictable = np.zeros(ranks, dtype=np.int64)
        self._tick = 0
        self.on_evict: Callable[[np.ndarray, np.ndarray], None] | None = None  # (blocks, their hashes)

    @property
    def num_free_per_rank(self) -> np.ndarray:
        """Blocks a new allocation on each rank may take: free and evictable."""
        return self._num_free + self._num_evictable

    @property
    def num_free(self) -> int:
        return int(self.num_free_per_rank.sum())

    @property
    def num_evictable(self) -> int:
        return int(self._num_evictable.sum())

    def rank_of(self, ids: np.ndarray) -> np.ndarray:
        return ids // self.blocks_per_rank

    def allocate(self, n: int, rank: int = 0) -> np.ndarray:
        """`n` blocks of `rank` with refcount 1 (the caller checked `num_free_per_rank`)."""
        assert n <= self.num_free_per_rank[rank], (
            f"allocate({n}) on rank {rank} with {self.num_free_per_rank[rank]} available"
        )
        if n > self._num_free[rank]:
            self._evict(n - int(self._num_free[rank]), rank)
        top = int(self._num_free[rank])
        ids = self._free[rank][top - n : top][::-1].copy()
        self._num_free[rank] -= n
        self.ref[ids] = 1
        return ids

    def allocate_per_rank(self, counts: np.ndarray) -> list[np.ndarray]:
        return [self.allocate(int(n), r) for r, n in enumerate(counts)]

    def take(self, ids: np.ndarray) -> None:
        """Add a user to cached blocks (a prefix-cache hit), evictable ones included."""
        revived = np.unique(ids[self._evictable[ids]])
        self._evictable[revived] = False
        np.subtract.at(self._num_evictable, self.rank_of(revived), 1)
        np.add.at(self.ref, ids, 1)

    def release(self, ids: np.ndarray, cold: bool = False) -> None:
        """Drop one user of each block; blocks left without users become evictable when
        they carry a hash (in the given order: the first are evicted first; `cold` ones
        before every warm one), else free."""
        if not len(ids):
            return
        np.subtract.at(self.ref, ids, 1)
        idle = ids[self.ref[ids] == 0]
        if not len(idle):
            return
        idle = idle[np.sort(np.unique(idle, return_index=True)[1])]  # keep order, drop repeats
        cached = self.block_hash[idle] != NO_HASH
        self._push_free(idle[~cached])
        keep = idle[cached]
        if len(keep):
            self._tick += 1
            self._epoch[keep] = self._tick
            self._evictable[keep] = True
            ranks = self.rank_of(keep)
            np.add.at(self._num_evictable, ranks, 1)
            for r in np.unique(ranks).tolist():
                mine = keep[ranks == r]
                self._lru[r][0 if cold else 1].extend(zip(mine.tolist(), [self._tick] * len(mine)))

    def set_hash(self, ids: np.ndarray, h: int) -> None:
        self.block_hash[ids] = h

    def clear_hash(self, ids: np.ndarray) -> None:
        """Forget cached content (the block is about to be rewritten)."""
        self.block_hash[ids] = NO_HASH

    def evict_all(self) -> None:
        """Drop every cached block (e.g. `reset_prefix_cache`)."""
        for r in range(self.ranks):
            if self._num_evictable[r]:
                self._evict(int(self._num_evictable[r]), r)

    def _evict(self, n: int, rank: int) -> None:
        out: list[int] = []
        cold, warm = self._lru[rank]
        while len(out) < n:
            b, epoch = (cold or warm).popleft()
            if self._evictable[b] and self._epoch[b] == epoch:
                out.append(b)
        ids = np.array(out, dtype=np.int32)
        self._evictable[ids] = False
        self._num_evictable[rank] -= len(ids)
        hashes = self.block_hash[ids].copy()
        self.block_hash[ids] = NO_HASH
        self._push_free(ids)
        if self.on_evict is not None:
            self.on_evict(ids, hashes)

    def _push_free(self, ids: np.ndarray) -> None:
        # freed blocks are reused last-in first-out (warm in caches); order within a call kept
        ranks = self.rank_of(ids)
        for r in np.unique(ranks).tolist():
            mine = ids[ranks == r]
            top = int(self._num_free[r])
            self._free[r][top : top + len(mine)] = mine[::-1]
            self._num_free[r] += len(mine)
