"""The KV cache: pool tensors, refcounted blocks, per-head tables of the running requests,
and the prefix cache. Growth, release, compaction and prefix hits of one request's heads
(docs/design.md, "KV cache").

Every head grows a block at a time as its request's tokens are computed; window heads also
release the blocks that leave their window; select / dynamic heads hold the prompt until
it ends and then keep sink + selected + ring in private blocks. A request's block count is
the sum over (layer, kv_head), so a plan that keeps 25% of the KV admits ~4x the requests.

With tensor parallelism (`ranks` > 1) this process holds rank 0's pool tensors and the
bookkeeping of every rank: `num_blocks` blocks per rank, every count per rank, and a request
fits when it fits on every rank. Compaction moves of other ranks' heads wait in
`remote_moves` for their workers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from headwise.kernels.kv_quant import is_fp8
from headwise.kvcache import compaction
from headwise.kvcache.block_pool import BlockPool
from headwise.kvcache.block_tables import BlockTables, Edits
from headwise.kvcache.budget import HeadBudget
from headwise.kvcache.buffers import KVBuffers
from headwise.kvcache.head_tables import HeadTables
from headwise.kvcache.prefill_selection import BoundedPrefill
from headwise.kvcache.prefix_cache import PrefixCache
from headwise.kvcache.worker_kv import WorkerKV


class KVCacheManager:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        max_model_len: int,
        dtype: torch.dtype,
        device: str = "cpu",
        max_num_seqs: int = 64,
        enable_prefix_caching: bool = False,
        ranks: int = 1,
        scales: tuple[torch.Tensor, torch.Tensor] | None = None,
        pool_tensors: bool = True,
    ):
        """`dtype` is the cache's element dtype (an fp8 one stores 1 byte per element with
        per-head scales: rank 0's `scales` `[L, Hkv / ranks]`, or None to calibrate them).
        Without `pool_tensors` the manager keeps the books only (kvcache/request_blocks.py's
        forecast): its pool tensors are empty and compaction moves no data."""
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size = block_size
        self.ranks = ranks
        # +1: a request's window head may hold one partly expired block beyond its positions
        self.max_blocks_per_head = -(-max_model_len // block_size) + 1
        self.pool = BlockPool(num_blocks, ranks)
        self.pool_tensors = pool_tensors
        self.buffers = make_buffers(
            num_blocks if pool_tensors else 0,
            block_size,
            head_dim,
            dtype,
            device,
            num_layers,
            num_kv_heads // ranks,
            scales,
        )
        self.tables = BlockTables(
            num_layers, num_kv_heads, max_num_seqs, self.max_blocks_per_head, device, ranks, num_blocks
        )
        self.prefix_cache = PrefixCache(self.pool, num_layers, num_kv_heads) if enable_prefix_caching else None
        # blocks per rank the running requests' window heads may still take (HeadTables.promise)
        self.promised = np.zeros(ranks, dtype=np.int64)
        # other ranks' compaction moves (rank-local source and destination slots), for their workers
        self.remote_moves: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(ranks)]
        # bytes of K and V in one block (what a request's kv_bytes counts)
        self.block_bytes = 2 * block_size * head_dim * torch.finfo(dtype).bits // 8

    @staticmethod
    def bytes_per_block(block_size: int, head_dim: int, dtype: torch.dtype) -> int:
        """Pool bytes of one block: K, V (in the cache dtype: 1 byte each in fp8) and the
        int32 position of each slot."""
        return block_size * (2 * head_dim * torch.finfo(dtype).bits // 8 + 4)

    @property
    def num_blocks(self) -> int:
        """Blocks of one rank's pool (the whole pool with one rank)."""
        return self.pool.blocks_per_rank

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take on the tightest rank: free and evictable ones."""
        return int(self.pool.num_free_per_rank.min())

    @property
    def available(self) -> np.ndarray:
        """Free blocks per rank that no running request's windows are promised."""
        return self.pool.num_free_per_rank - self.promised

    # -- requests --------------------------------------------------------------------
    def new_tables(
        self,
        budgets: list[list[HeadBudget]],
        pending: np.ndarray,
        context_len: int,
        bounded: BoundedPrefill | None = None,
    ) -> HeadTables | None:
        """Tables in a fresh row, or None when every row is taken. `bounded`: the select
        heads that prefill with a bounded peak (kvcache/prefill_selection.py)."""
        if not self.tables.num_free_rows:
            return None
        row = self.tables.allocate_row()
        return HeadTables(budgets, pending, self.block_size, context_len, self.tables, row, self.ranks, bounded)

    def can_grow(self, tables: HeadTables, end: int, reserve: np.ndarray | int = 0) -> bool:
        """Whether a step computing positions up to `end` (plus a compaction reserve) can
        allocate on every rank: window heads draw on their own promise, everything else on
        `available`."""
        window, other = tables.blocks_needed_split(end)
        need = other + reserve + np.maximum(window - tables.promise(), 0)
        return bool((need <= self.available).all())

    def can_admit(
        self, tables: HeadTables, prompt_end: int, first_end: int, taken: np.ndarray, reserve: np.ndarray | int = 0
    ) -> bool:
        """Whether a request (its tables laid out over a cached prefix whose blocks are
        `taken`) fits on every rank: its prompt, its windows' most, the cached blocks it
        revives, what its first chunk (up to `first_end`) needs beyond its windows' promise,
        and the compaction reserve when that chunk ends the prompt."""
        unique = np.unique(taken)
        revived = np.bincount(self.pool.rank_of(unique[self.pool.ref[unique] == 0]), minlength=self.ranks)
        window = tables.blocks_needed_split(first_end)[0]
        over = np.maximum(window - tables.promise(), 0)
        need = tables.admission_need(prompt_end) + revived + over + reserve
        return bool((need <= self.available).all())

    def admit(self, tables: HeadTables, taken: np.ndarray) -> None:
        """Take a hit's cached blocks and lay out the bounded select heads' blocks (the
        caller checked `can_admit`)."""
        self.pool.take(taken)
        bounded = tables.bounded_to_lay_out()
        if bounded.any():
            tables.lay_out_bounded(self.pool.allocate_per_rank(tables.per_rank(bounded)))
        self.promised += tables.promise()

    def grow(self, tables: HeadTables, end: int, reserve: np.ndarray | int = 0) -> None:
        """Allocate a step's blocks (the caller checked `can_grow`)."""
        before = tables.promise()
        tables.grow(end, self.pool.allocate_per_rank(tables.blocks_needed(end)))
        self.promised += tables.promise() - before
        if np.any(reserve):
            tables.reserve = self.pool.allocate_per_rank(np.broadcast_to(reserve, (self.ranks,)))
            tables.peak_blocks = max(tables.peak_blocks, tables.num_blocks_held + int(np.sum(reserve)))

    def fill_placeholders(self, tables: HeadTables) -> bool:
        """Once a step's growth is done: give the window heads' skipped blocks transient
        blocks when every rank has room, so the prefix cache gets every block of a prompt
        (a later prompt that shares only its beginning can then hit)."""
        n = tables.num_placeholders
        if self.prefix_cache is None or not n.any() or (n > self.available).any():
            return False
        tables.fill_placeholders(self.pool.allocate_per_rank(n))
        return True

    def finish_step(self, tables: HeadTables, end: int) -> None:
        """Positions up to `end` are written: release what the window heads dropped."""
        before = tables.promise()
        self.pool.release(tables.finish_step(end), cold=True)  # they only serve hits inside a prompt
        self.promised += tables.promise() - before

    def free(self, tables: HeadTables) -> None:
        """Give back every block and the row (finish, abort, preemption)."""
        self.promised -= tables.promise()
        self.pool.release(tables.all_blocks())
        for reserve in tables.reserve:
            self.pool.release(reserve)
        self.tables.free_row(tables.row)

    def discard(self, tables: HeadTables) -> None:
        """Drop tables that were laid out but never admitted (they hold no blocks yet)."""
        self.tables.free_row(tables.row)

    def count_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        """A prompt's first admission asked the prefix cache for `prompt_tokens` and got
        `hit_tokens` (the prefix_cache_queries / _hits counters)."""
        if self.prefix_cache is not None:
            self.prefix_cache.queries += prompt_tokens
            self.prefix_cache.hits += hit_tokens

    def worker_view(self) -> WorkerKV:
        """Rank 0's device tables and pool tensors, for the model runner."""
        return WorkerKV(self.tables.local, self.buffers, self.block_size)

    def commit_tables(self) -> list[tuple[Edits | None, Edits | None]]:
        """Apply the table edits since the last step to rank 0's device tables (before a
        step runs); returns the other ranks' edits, for their workers."""
        return self.tables.commit()

    def take_remote_moves(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The compaction moves of every rank's heads since the last step (rank 0's are applied)."""
        moves, self.remote_moves = self.remote_moves, [[] for _ in range(self.ranks)]
        return moves

    def census(self, live: list[HeadTables]) -> dict[str, int]:
        """Every block is free, evictable (cached, unused) or held: the refcount of each block
        equals the number of live requests' tables (compaction reserves included) naming it.
        Raises AssertionError on a leak or a double free; returns the three counts."""
        named = [t.all_blocks() for t in live] + [r for t in live for r in t.reserve]
        counts = np.bincount(
            np.concatenate(named or [np.zeros(0, dtype=np.int32)]).astype(np.int64), minlength=self.pool.num_blocks
        )
        assert (counts == self.pool.ref).all(), "block refcounts disagree with the live tables"
        held = int((self.pool.ref > 0).sum())
        evictable = self.pool.num_evictable
        free = self.pool.num_blocks - held - evictable
        assert free == self.pool.num_free - evictable, "free + evictable + held != num_blocks"
        promised = sum((t.promise() for t in live), np.zeros(self.ranks, dtype=np.int64))
        assert (self.promised == promised).all(), "window promises drifted"
        return {"held": held, "evictable": evictable, "free": free}

    # -- prefix cache ----------------------------------------------------------------
    def match_prefix(self, tables: HeadTables, hashes: list[int]) -> tuple[int, np.ndarray]:
        """(k, cached blocks `[k, L, Hkv]`): the longest usable cached prefix of `hashes`."""
        # bounded select heads hold no positional prompt blocks: nothing to hit or name
        if self.prefix_cache is None or not hashes or tables.bounded.any():
            return 0, np.zeros((0, self.num_layers, self.num_kv_heads), dtype=np.int32)
        cached = self.prefix_cache.lookup(hashes)
        k = self.prefix_cache.longest_hit(tables, cached)
        return k, cached[:k]

    def register(self, tables: HeadTables, hashes: list[int], first: int) -> None:
        """Name the logical blocks [first, first + len(hashes)) every head holds now."""
        if self.prefix_cache is None or tables.bounded.any():
            return
        width = tables.lb_end
        row = self.tables.table[:, tables.row, :, :]
        for i, h in enumerate(hashes):
            lb = first + i
            index = np.where(lb >= tables.ns, lb - tables.gap, lb)
            ok = tables.positional & (index < tables.nent) & (lb < width)
            if tables.window.any():
                ok &= ~tables.window | (lb < tables.ns) | (lb >= tables.ns + tables.gap)
            blocks = np.take_along_axis(row, np.clip(index, 0, row.shape[-1] - 1)[..., None], -1)[..., 0]
            self.prefix_cache.register(h, np.where(ok, blocks, -1).astype(np.int32))

    # -- end of prompt (kvcache/compaction.py) -------------------------------------------
    def compaction_reserve(
        self, tables: HeadTables, prompt_len: int, fits: Callable[[np.ndarray], bool], may_seal: bool = True
    ) -> np.ndarray:
        """Blocks per rank the step that ends the prompt sets aside for the select heads'
        compaction. With the prefix cache, new blocks for their whole layout when `fits` them
        (the prompt blocks stay cached); otherwise (or when `may_seal` is False: the prompt's
        blocks are a hit's, not this request's) they compact in place into the prompt's last
        blocks, when this request alone holds them, and only what those lack is set aside."""
        bs = self.block_size
        if self.prefix_cache is not None:
            fresh = compaction.blocks_needed(tables, prompt_len, bs, in_place=False)
            if fits(fresh) or not may_seal or not compaction.seal_tail(self.pool, tables, prompt_len, bs):
                return fresh
        else:
            tables.compact_in_place = True
        return compaction.blocks_needed(tables, prompt_len, bs, in_place=True)

    def finish_bounded(self, tables: HeadTables) -> None:
        """End of a bounded prefill: each bounded select head keeps its ring layout's blocks."""
        compaction.finish_bounded(self.pool, tables, self.block_size)

    def compact(self, tables: HeadTables, keep_full: torch.Tensor, scores: list[torch.Tensor]) -> None:
        """End of prefill: pending heads not in `keep_full` `[L, Hkv]` keep sink + the
        `select` best-scored middle tokens (`scores[layer] [Hkv, P]`) + the recent ring in
        private blocks; their K and V move there (rank 0's now, other ranks' by their workers)."""
        moves = compaction.compact(
            self.pool, tables, keep_full, scores, self.block_size, self.num_kv_heads // self.ranks
        )
        for rank, pair in enumerate(moves):
            if pair is None:
                continue
            if rank:
                self.remote_moves[rank].append(pair)
            elif self.pool_tensors:
                apply_moves(self.buffers, *pair)


def make_buffers(
    num_blocks: int,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    device,
    num_layers: int = 0,
    num_kv_heads: int = 0,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> KVBuffers:
    """One rank's pool tensors; an fp8 `dtype` adds this rank's scales `[L, Hkv]` (given, or
    calibrated by the first prefill step)."""
    buffers = KVBuffers(
        k=torch.zeros(num_blocks, block_size, head_dim, dtype=dtype, device=device),
        v=torch.zeros(num_blocks, block_size, head_dim, dtype=dtype, device=device),
        pos=torch.zeros(num_blocks, block_size, dtype=torch.int32, device=device),
    )
    if is_fp8(dtype):
        if scales is None:
            scales = (torch.ones(num_layers, num_kv_heads), torch.ones(num_layers, num_kv_heads))
            buffers.calibrating = True
        buffers.k_scale, buffers.v_scale = (s.to(device=device, dtype=torch.float32).contiguous() for s in scales)
    return buffers


def apply_moves(buffers: KVBuffers, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy slots `src` to slots `dst` (flat, this rank's pool) for K, V and positions: one
    gather then one scatter, so a slot may be read and written in one call."""
    device = buffers.k.device
    src, dst = src.to(device), dst.to(device)
    for t in (buffers.k, buffers.v, buffers.pos):
        flat = t.view(-1, *t.shape[2:])
        flat[dst] = flat[src]
