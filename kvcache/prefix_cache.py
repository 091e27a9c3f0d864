"""Automatic prefix caching, head-aware (docs/design.md, "Prefix caching").

A logical block of a request's tokens is named by a hash chain: the hash of the previous
block's name and this block's token ids, seeded by everything that changes the numbers
(model, dtype, block size, and what every head attends to while the prompt is computed).
Each (layer, KV head) that wrote the block holds its own physical block, so the index maps
a name to a `[L, Hkv]` array of block ids. A block keeps its name while it is held and
while it is evictable; eviction forgets it.

A hit of k blocks needs, for every head, the blocks that head would hold at position
k * block_size: all of them for positional heads (full heads, and select / dynamic heads,
which hold the whole prompt until it ends), the sink blocks and the blocks overlapping the
recent window for window and elastic heads. The longest such k is reused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from headwise.kvcache.block_pool import NO_HASH, BlockPool
from headwise.kvcache.head_tables import PLACEHOLDER, HeadTables


def _digest(data: bytes) -> int:
    h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)
    return h if h != NO_HASH else 1


def seed_hash(*parts: object) -> int:
    """The chain's root: a hash of everything besides the tokens that changes a block's K/V."""
    return _digest(repr(parts).encode())


def chain_hashes(parent: int, tokens: Sequence[int], block_size: int) -> list[int]:
    """Names of the whole blocks of `tokens`, continuing the chain from `parent`."""
    out = []
    for i in range(0, len(tokens) - block_size + 1, block_size):
        parent = _digest(
            parent.to_bytes(8, "little", signed=True) + np.asarray(tokens[i : i + block_size], dtype=np.int64).tobytes()
        )
        out.append(parent)
    return out


class PrefixCache:
    def __init__(self, pool: BlockPool, num_layers: int, num_kv_heads: int):
        self.pool = pool
        self.shape = (num_layers, num_kv_heads)
        self.index: dict[int, np.ndarray] = {}
        pool.on_evict = self._forget
        self.queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hits = 0  # of which served from the cache

    def register(self, h: int, blocks: np.ndarray) -> None:
        """Name the blocks `[L, Hkv]` (PLACEHOLDER where a head has none) that hold block `h`.
        A head whose cached block under this name is still valid keeps it."""
        entry = self.index.get(h)
        if entry is None:
            entry = np.full(self.shape, PLACEHOLDER, dtype=np.int32)
            self.index[h] = entry
        valid = self._valid(entry, h)
        new = (blocks != PLACEHOLDER) & ~valid
        if new.any():
            fresh = blocks[new]
            fresh_ok = self.pool.block_hash[fresh] == NO_HASH  # a block holds one content
            ids = fresh[fresh_ok]
            target = entry[new]
            target[fresh_ok] = ids
            entry[new] = target
            self.pool.set_hash(ids, h)

    def lookup(self, hashes: Sequence[int]) -> np.ndarray:
        """`[k, L, Hkv]` block ids cached under each name (PLACEHOLDER where none)."""
        out = np.full((len(hashes), *self.shape), PLACEHOLDER, dtype=np.int32)
        for i, h in enumerate(hashes):
            entry = self.index.get(h)
            if entry is not None:
                out[i] = np.where(self._valid(entry, h), entry, PLACEHOLDER)
        return out

    def longest_hit(self, tables: HeadTables, cached: np.ndarray) -> int:
        """The most whole blocks k (<= len(cached)) for which every head has what it needs."""
        kmax = cached.shape[0]
        if kmax == 0:
            return 0
        avail = cached != PLACEHOLDER  # [K, L, Hkv]
        count = np.concatenate([np.zeros((1, *self.shape), dtype=np.int64), np.cumsum(avail, 0)])  # [K + 1, ...]
        k = np.arange(kmax + 1)[:, None, None]
        bs = tables.block_size
        window, ns = tables.window[None], tables.ns[None]
        first = np.maximum(ns, np.maximum(k * bs - tables.recent[None], 0) // bs)
        first = np.minimum(first, k)
        sinks = np.minimum(ns, k)
        take = np.take_along_axis
        sink_ok = take(count, np.broadcast_to(sinks, count.shape), 0) == sinks
        win_ok = (count - take(count, np.broadcast_to(first, count.shape), 0)) == (k - first)
        full_ok = count == k
        ok = np.where(window, sink_ok & win_ok, full_ok) | ~tables.positional[None]
        good = np.nonzero(ok.reshape(kmax + 1, -1).all(1))[0]
        return int(good[-1])

    def reset(self) -> None:
        """Forget every cached block that no request holds."""
        self.pool.evict_all()

    def _valid(self, entry: np.ndarray, h: int) -> np.ndarray:
        ok = entry != PLACEHOLDER
        ok[ok] = self.pool.block_hash[entry[ok]] == h
        return ok

    def _forget(self, ids: np.ndarray, hashes: np.ndarray) -> None:
        for h in set(hashes.tolist()):
            entry = self.index.get(h)
            if entry is not None and not self._valid(entry, h).any():
                del self.index[h]
