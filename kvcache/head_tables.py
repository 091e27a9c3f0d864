"""One request's cache layout: every (layer, KV head)'s blocks, in its row of `BlockTables`.

Three layouts (docs/design.md, "KV cache"):
- positional (full heads, and select / dynamic heads until their prompt ends): the block
  of position j is logical block j // block_size; the row lists blocks in position order;
- positional window (window and elastic heads): the row holds the sink blocks, then the
  blocks that overlap the recent window; blocks that leave the window are released after
  the step that pushed them out (to the prefix cache when they carry a hash) and the row
  shifts, so slot(j) = j - gap * block_size. Shared (cached) blocks are never written;
- ring (a select head after compaction): private blocks, slots [0, sink) hold the sinks,
  [sink, keep) the selected middle tokens and [keep, keep + ring) a ring of recent tokens;
- bounded (a select head while its prompt is prefilled with a bounded peak): the private
  blocks it keeps after the prompt too, laid out at admission; slots [0, keep) hold its
  sinks, running candidates and the last `recent` positions, all visible (ring 0: a chunk
  writes only its sinks through the slot mapping; the chunk's selection writes the rest,
  kvcache/prefill_selection.py). The prompt's last chunk writes the ring layout into them.

During a step whose chunk is longer than a window, the logical blocks the window skips
are placeholders (entry 0, their positions dropped) or, when the prefix cache wants them
and the pool has room, transient blocks: written, hashed, and released after the step.
All per-head state is numpy `[L, Hkv]`; nothing loops over heads per step. With tensor
parallelism, the columns are rank-major (rank r's heads are [r * k, (r + 1) * k)) and block
counts are per rank, since each rank's pool holds its own heads' blocks.
"""

from __future__ import annotations

import numpy as np

from headwise.kernels.layout import UNBOUNDED
from headwise.kvcache.block_tables import PARAMS, BlockTables
from headwise.kvcache.budget import HeadBudget, window_first_block
from headwise.kvcache.prefill_selection import BoundedPrefill

_GAP = PARAMS.index("gap")
PLACEHOLDER = -1  # a row entry for a logical block a window head skipped: its positions are dropped


class HeadTables:
    def __init__(
        self,
        budgets: list[list[HeadBudget]],
        pending: np.ndarray,
        block_size: int,
        context_len: int,
        tables: BlockTables,
        row: int,
        ranks: int = 1,
        bounded: BoundedPrefill | None = None,
    ):
        self.budgets = budgets
        self.block_size = block_size
        self.context_len = context_len
        self.tables = tables
        self.row = row
        self.ranks = ranks
        full = np.array([[b.full for b in r] for r in budgets])
        self.pending = np.asarray(pending, dtype=bool).copy()
        self.window = ~full & ~self.pending  # positional heads that drop blocks
        self.ring_mode = np.zeros_like(self.pending)
        self.sink = np.array([[b.sink for b in r] for r in budgets], dtype=np.int64)
        recent = np.array(
            [[b.recent if b.recent is not None else UNBOUNDED for b in r] for r in budgets], dtype=np.int64
        )
        self.recent = np.where(self.window, recent, UNBOUNDED)
        self.ns = np.where(self.window, -(-self.sink // block_size), 0)  # sink blocks
        shape = self.pending.shape
        self.ring = np.zeros(shape, dtype=np.int64)  # ring-mode heads: ring size and keep (sink + selected)
        self.ring_keep = np.zeros(shape, dtype=np.int64)
        self.nent = np.zeros(shape, dtype=np.int64)  # row entries (placeholders included)
        self.held = np.zeros(shape, dtype=np.int64)  # blocks in the row (no placeholders, no transient)
        self.lb_end = 0  # positional heads: logical blocks [0, lb_end) are laid out
        self.num_tokens = 0  # positions written so far
        self.peak_blocks = 0
        self.transient = np.zeros(0, dtype=np.int32)  # this step's transient blocks (not in `held`)
        self._placeholders = (np.zeros(0, dtype=np.int64),) * 3  # (layer, head, index) of the last grow
        self.reserve = [np.zeros(0, dtype=np.int32)] * ranks  # blocks set aside for compaction, per rank
        self.compact_in_place = False  # select heads compact into the prompt's last blocks
        self.bounded_prefill = bounded
        self.bounded = np.zeros(shape, dtype=bool) if bounded is None else bounded.slots > 0
        self.ring_mode |= self.bounded
        sink_w = np.where(self.window, self.sink, 0)
        tables.set_params(
            row,
            gap=np.zeros(shape, dtype=np.int64),
            ring=np.where(self.bounded, 0, -1),
            sink=np.where(self.bounded, self.sink, sink_w),
            keep=sink_w,
            recent=self.recent,
        )

    # -- queries ---------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.pending.shape[0]

    @property
    def num_blocks_held(self) -> int:
        return int(self.held.sum())

    @property
    def positional(self) -> np.ndarray:
        return ~self.ring_mode

    @property
    def all_unbounded(self) -> bool:
        """Every head sees everything cached (plain causal attention in prefill); a bounded
        select head sees every slot it holds."""
        return not (self.window.any() or (self.ring_mode & ~self.bounded).any())

    def min_recent(self) -> int:
        """The narrowest window any head has (a chunk's token sees itself iff it is >= 1)."""
        return int(np.where(self.ring_mode & ~self.bounded, self.ring, self.recent).min())

    @property
    def gap(self) -> np.ndarray:
        """Window heads: the logical blocks dropped between the sinks and the window
        `[L, Hkv]`, kept once, as the row's `gap` parameter the kernels read."""
        return self.tables.params[_GAP, :, self.row]

    @gap.setter
    def gap(self, value: np.ndarray) -> None:
        self.tables.set_params(self.row, gap=value)

    def row_blocks(self, layer: int, head: int) -> np.ndarray:
        return self.tables.table[layer, self.row, head, : self.nent[layer, head]]

    def kept_from(self, end: int) -> np.ndarray:
        """First logical block a positional head keeps after `end` positions `[L, Hkv]`."""
        return np.where(self.window, window_first_block(self.ns, self.recent, end, self.block_size), 0)

    # -- growth ----------------------------------------------------------------------
    def new_entries(self, end: int) -> tuple[np.ndarray, np.ndarray]:
        """The logical blocks a step writing up to `end` adds, and `[L, Hkv, m]` which of
        them each head must hold (the rest are placeholders)."""
        last = -(-end // self.block_size)
        lbs = np.arange(self.lb_end, max(self.lb_end, last))
        if not len(lbs):
            return lbs, np.zeros((*self.pending.shape, 0), dtype=bool)
        keep_from = self.kept_from(end)
        real = (lbs[None, None, :] < self.ns[..., None]) | (lbs[None, None, :] >= keep_from[..., None])
        return lbs, real & self.positional[..., None]

    def window_max(self) -> np.ndarray:
        """The most blocks each window head ever holds: its sink blocks, the blocks of its
        window and one partly expired block (never more than the request's positions)."""
        bs = self.block_size
        return np.minimum(-(-self.context_len // bs), self.ns + -(-self.recent // bs) + 1)

    def per_rank(self, x: np.ndarray) -> np.ndarray:
        """Sum of a per-head `[L, Hkv]` count over each rank's heads: `[ranks]`."""
        return x.reshape(x.shape[0], self.ranks, -1).sum((0, 2))

    def promise(self) -> np.ndarray:
        """Blocks the window heads may still take without growing past `window_max`, per
        rank: the manager keeps them out of other requests' reach, so a request that was
        admitted never needs another's blocks for its windows."""
        return self.per_rank(np.where(self.window, np.maximum(self.window_max() - self.held, 0), 0))

    def admission_need(self, prompt_end: int) -> np.ndarray:
        """Blocks per rank to admit a request with `prompt_end` positions to compute, beyond
        what it holds: positional heads the whole prompt, window heads their `window_max`."""
        want = np.where(self.window, self.window_max(), -(-prompt_end // self.block_size))
        positional = np.where(self.positional, np.maximum(want - self.held, 0), 0)
        return self.per_rank(positional + self.bounded_to_lay_out())

    def bounded_to_lay_out(self) -> np.ndarray:
        """`[L, Hkv]` blocks the bounded select heads take at admission (0 once laid out)."""
        if self.bounded_prefill is None:
            return np.zeros(self.pending.shape, dtype=np.int64)
        want = -(-self.bounded_prefill.slots // self.block_size)
        return np.where(self.bounded & self.pending & (self.held == 0), want, 0)

    def lay_out_bounded(self, ids: list[np.ndarray]) -> None:
        """Give the bounded select heads their private blocks (`ids[rank]`, in (layer, head)
        order, as many as `bounded_to_lay_out` says)."""
        need = self.bounded_to_lay_out()
        mask = np.arange(int(need.max(initial=0)))[None, None, :] < need[..., None]
        blocks = self._place(mask, ids)
        for layer, head in zip(*np.nonzero(need)):
            self.tables.set_row_span(self.row, int(layer), int(head), 0, blocks[layer, head, : need[layer, head]])
        self.nent += need
        self.held += need
        self.peak_blocks = max(self.peak_blocks, self.num_blocks_held)

    def blocks_needed_split(self, end: int) -> tuple[np.ndarray, np.ndarray]:
        """(window heads', other heads') blocks per rank a step writing up to `end` allocates."""
        real = self.new_entries(end)[1].sum(-1)
        return self.per_rank(np.where(self.window, real, 0)), self.per_rank(np.where(self.window, 0, real))

    def blocks_needed(self, end: int) -> np.ndarray:
        """Blocks per rank a step writing positions up to `end` must allocate."""
        return self.per_rank(self.new_entries(end)[1].sum(-1))

    def _place(self, mask: np.ndarray, ids: list[np.ndarray]) -> np.ndarray:
        """`[L, Hkv, m]` block ids: each rank's `ids` at its heads' True entries of `mask`
        (in (layer, head, logical block) order), PLACEHOLDER elsewhere."""
        blocks = np.full(mask.shape, PLACEHOLDER, dtype=np.int32)
        per_rank = blocks.reshape(mask.shape[0], self.ranks, -1, mask.shape[2])
        masks = mask.reshape(per_rank.shape)
        for r, rank_ids in enumerate(ids):
            view = per_rank[:, r]
            view[masks[:, r]] = rank_ids
        return blocks

    def grow(self, end: int, ids: list[np.ndarray]) -> None:
        """Lay out the blocks a step writing up to `end` adds: `ids[rank]` for the blocks that
        rank's heads must hold (in (layer, head, logical block) order); the rest are
        placeholders until `fill_placeholders` gives them transient blocks."""
        lbs, real = self.new_entries(end)
        self._placeholders = (np.zeros(0, dtype=np.int64),) * 3
        if not len(lbs):
            return
        pos = np.broadcast_to(self.positional[..., None], real.shape)
        blocks = self._place(real, ids)
        self.held += real.sum(-1)
        layer, head, k = np.nonzero(pos)
        index = lbs[k] - self.gap[layer, head]
        self.tables.set_entries(self.row, layer, head, index, blocks[layer, head, k])
        hole = ~real[layer, head, k]
        self._placeholders = (layer[hole], head[hole], index[hole])
        self.nent += pos.sum(-1)
        self.lb_end = int(lbs[-1]) + 1
        self.peak_blocks = max(self.peak_blocks, self.num_blocks_held)

    def fill_placeholders(self, ids: list[np.ndarray]) -> None:
        """Give this step's placeholders transient blocks (`ids[rank]`, as many as
        `num_placeholders` says): written and hashed like any block, released after the step.
        They are the prefix cache's, not the request's, so they do not count toward its peak."""
        layer, head, index = self._placeholders
        rank = head // (self.pending.shape[1] // self.ranks)
        blocks = np.empty(len(layer), dtype=np.int32)
        for r, rank_ids in enumerate(ids):
            blocks[rank == r] = rank_ids  # placeholders are listed in (layer, head, block) order
        self.tables.set_entries(self.row, layer, head, index, blocks)
        self.transient = blocks

    @property
    def num_placeholders(self) -> np.ndarray:
        """Placeholders the last `grow` laid out, per rank."""
        head = self._placeholders[1]
        return np.bincount(head // (self.pending.shape[1] // self.ranks), minlength=self.ranks)

    # -- after the step --------------------------------------------------------------
    def finish_step(self, end: int) -> np.ndarray:
        """Positions up to `end` are written: window heads drop the blocks that left their
        window, placeholders and transient blocks included. Returns the blocks to release
        (logical order per head)."""
        self.num_tokens = end
        first = self.ns + self.gap  # logical block of the first window entry
        shift = np.where(self.window, np.maximum(self.kept_from(end) - first, 0), 0)
        out = []
        for layer, head in zip(*np.nonzero(shift)):
            n, ns, total = int(shift[layer, head]), int(self.ns[layer, head]), int(self.nent[layer, head])
            row = self.tables.table[layer, self.row, head]
            gone = row[ns : ns + n]
            gone = gone[gone != PLACEHOLDER].copy()
            out.append(gone)
            self.held[layer, head] -= len(gone) - int(np.isin(gone, self.transient).sum())
            self.tables.set_row_span(self.row, layer, head, ns, row[ns + n : total].copy())
            self.nent[layer, head] = total - n
        if shift.any():
            self.gap = self.gap + shift
        if self.bounded_prefill is not None and (self.bounded & self.pending).any():
            # the chunk's selection kept this many slots (the prompt's end is compacted apart)
            kept = np.where(self.bounded & self.pending, self.bounded_prefill.kept(end), 0)
            self.ring_keep = np.where(self.bounded & self.pending, kept, self.ring_keep)
            window_keep = np.where(self.window, self.sink, 0)
            self.tables.set_params(self.row, keep=np.where(self.ring_mode, self.ring_keep, window_keep))
        self.transient = np.zeros(0, dtype=np.int32)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)

    def all_blocks(self) -> np.ndarray:
        """Every block the request holds, newest logical block first (evicted first)."""
        width = int(self.nent.max()) if self.nent.size else 0
        block = self.tables.table[:, self.row, :, :width]
        inside = (np.arange(width)[None, None, :] < self.nent[..., None]) & (block != PLACEHOLDER)
        # column order from the last entry back: tails of every head before their heads
        order = block[:, :, ::-1].transpose(2, 0, 1)
        keep = inside[:, :, ::-1].transpose(2, 0, 1)
        return order[keep].astype(np.int32)

    # -- prefix-cache hits and compaction ---------------------------------------------
    def adopt_prefix(self, num_blocks: int, blocks: np.ndarray) -> np.ndarray:
        """Start from a cached prefix of `num_blocks` logical blocks: `blocks [k, L, Hkv]`
        (PLACEHOLDER where a head has none). Positional heads take all of them, window
        heads their sink blocks and the blocks their window needs at that point. Returns
        the block ids taken (the caller adds a reference to each)."""
        k = num_blocks
        end = k * self.block_size
        keep_from = self.kept_from(end)
        lbs = np.arange(k)[None, None, :]
        need = (lbs < np.where(self.window, self.ns, k)[..., None]) | (lbs >= keep_from[..., None])
        need &= self.positional[..., None]
        per_head = blocks.transpose(1, 2, 0)  # [L, Hkv, k]
        assert (per_head[need] != PLACEHOLDER).all(), "adopt_prefix: a needed block is missing"
        self.gap = np.where(self.window, np.maximum(keep_from - self.ns, 0), 0)
        layer, head, j = np.nonzero(need)
        index = j - np.where(j >= self.ns[layer, head], self.gap[layer, head], 0)
        ids = per_head[layer, head, j]
        self.tables.set_entries(self.row, layer, head, index, ids)
        self.nent = need.sum(-1)
        self.held = self.nent.copy()
        self.lb_end = k
        self.num_tokens = end
        self.peak_blocks = max(self.peak_blocks, self.num_blocks_held)
        return ids.astype(np.int32)

    def to_ring(self, layer: int, head: int, blocks: np.ndarray, sink: int, keep: int, ring: int) -> None:
        """A pending head after compaction: its new private blocks and ring layout."""
        self.tables.set_row_span(self.row, layer, head, 0, blocks)
        self.nent[layer, head] = self.held[layer, head] = len(blocks)
        self.pending[layer, head] = False
        self.ring_mode[layer, head] = True
        self.sink[layer, head] = sink
        self.ring_keep[layer, head] = keep
        self.ring[layer, head] = ring

    def commit_ring_params(self) -> None:
        self.tables.set_params(
            self.row,
            ring=np.where(self.ring_mode, self.ring, -1),
            sink=np.where(self.ring_mode | self.window, self.sink, 0),
            keep=np.where(self.ring_mode, self.ring_keep, np.where(self.window, self.sink, 0)),
            recent=np.where(self.ring_mode & ~(self.bounded & self.pending), self.ring, self.recent),
        )
