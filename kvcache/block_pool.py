"""Refcounted blocks shared by every layer and KV head: a free stack, and cached blocks.

A block is free (no user, no content worth keeping), held (its refcount counts the
requests whose tables name it) or evictable: no user, but it carries a content hash, so a
later request with the same tokens may take it back (prefix caching, docs/design.md
"Prefix caching"). Allocation takes free blocks first, then evicts the least recently
released evictable ones. Evictable blocks count as available everywhere (admission,
`kv_cache_usage_perc`).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np

NO_HASH = 0  # block_hash of a block whose content is not cached


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref = np.zeros(num_blocks, dtype=np.int32)
        self.block_hash = np.zeros(num_blocks, dtype=np.int64)
        self._free = np.arange(num_blocks - 1, -1, -1, dtype=np.int32)  # a stack: pop from the end
        self._num_free = num_blocks
        # evictable blocks in release order; an entry is live while its epoch matches
        self._lru: deque[tuple[int, int]] = deque()
        self._epoch = np.zeros(num_blocks, dtype=np.int64)
        self._evictable = np.zeros(num_blocks, dtype=bool)
        self.num_evictable = 0
        self._tick = 0
        self.on_evict: Callable[[np.ndarray, np.ndarray], None] | None = None  # (blocks, their hashes)

    @property
    def num_free(self) -> int:
        """Blocks a new allocation may take: free and evictable."""
        return self._num_free + self.num_evictable

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self, n: int) -> np.ndarray:
        """`n` blocks with refcount 1 (the caller checked `num_free`)."""
        assert n <= self.num_free, f"allocate({n}) with {self.num_free} available"
        if n > self._num_free:
            self._evict(n - self._num_free)
        ids = self._free[self._num_free - n:self._num_free][::-1].copy()
        self._num_free -= n
        self.ref[ids] = 1
        return ids

    def take(self, ids: np.ndarray) -> None:
        """Add a user to cached blocks (a prefix-cache hit), evictable ones included."""
        revived = ids[self._evictable[ids]]
        self._evictable[revived] = False
        self.num_evictable -= len(revived)
        np.add.at(self.ref, ids, 1)

    def release(self, ids: np.ndarray) -> None:
        """Drop one user of each block; blocks left without users become evictable when
        they carry a hash (in the given order: the first are evicted first), else free."""
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
            self.num_evictable += len(keep)
            self._lru.extend(zip(keep.tolist(), [self._tick] * len(keep)))

    def set_hash(self, ids: np.ndarray, h: int) -> None:
        self.block_hash[ids] = h

    def clear_hash(self, ids: np.ndarray) -> None:
        """Forget cached content (the block is about to be rewritten)."""
        self.block_hash[ids] = NO_HASH

    def evict_all(self) -> None:
        """Drop every cached block (e.g. `reset_prefix_cache`)."""
        if self.num_evictable:
            self._evict(self.num_evictable)

    def _evict(self, n: int) -> None:
        out = []
        while len(out) < n:
            b, epoch = self._lru.popleft()
            if self._evictable[b] and self._epoch[b] == epoch:
                out.append(b)
        ids = np.array(out, dtype=np.int32)
        self._evictable[ids] = False
        self.num_evictable -= len(ids)
        hashes = self.block_hash[ids].copy()
        self.block_hash[ids] = NO_HASH
        self._push_free(ids)
        if self.on_evict is not None:
            self.on_evict(ids, hashes)

    def _push_free(self, ids: np.ndarray) -> None:
        # freed blocks are reused last-in first-out (warm in caches); order within a call kept
        self._free[self._num_free:self._num_free + len(ids)] = ids[::-1]
        self._num_free += len(ids)
