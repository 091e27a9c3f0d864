"""Continuous batching at token granularity with chunked prefill, FCFS.

Each step fills a token budget: running sequences first (decode tokens, then prefill
chunks), then new admissions. Every sequence allocates the blocks its step writes; when a
running sequence cannot grow, the newest running sequence is preempted (its blocks freed,
recomputed later). A new sequence is admitted when the pool holds its prefill (what its
heads keep once the prompt is written, beyond any cached prefix it reuses) and a table row
is free. No admission in a step that preempted. Once growth is done, prefill chunks of
window heads may take transient blocks for the prefix cache (docs/design.md, "Prefix
caching").
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from headwise.engine.block_names import hit_candidates, register_blocks
from headwise.engine.sequence import Sequence, Status
from headwise.kvcache.manager import KVCacheManager


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, num new tokens)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, kv_manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv_manager = kv_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # decode tokens before prefill chunks, each group in arrival order
        order = sorted(self.running, key=lambda s: (s.num_tokens - s.num_computed_tokens > 1, s.arrival_time))
        for seq in order:
            if seq.status != Status.RUNNING or budget == 0:
                continue
            n = self._chunk(seq, budget)
            end = seq.num_computed_tokens + n
            comp = self._compaction(seq, n, lambda r: self.kv_manager.can_grow(seq.kv, end, r))  # noqa: B023
            while not self.kv_manager.can_grow(seq.kv, end, comp):
                victim = max((s for s in self.running if s.status == Status.RUNNING), key=lambda s: s.arrival_time)
                budget += self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            self.kv_manager.grow(seq.kv, end, comp)
            out.scheduled.append((seq, n))
            budget -= n
        self.running = [s for s in self.running if s.status == Status.RUNNING]
        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                # a request whose grammar still compiles waits without holding up those behind it
                ready = next((s for s in self.waiting if s.grammar_ready), None)
                if ready is None:
                    break
                seq = ready
                n, comp = self._admit(seq, budget)
                if not n:
                    break
                self.waiting.remove(seq)
                self.kv_manager.grow(seq.kv, seq.num_computed_tokens + n, comp)
                self.running.append(seq)
                out.scheduled.append((seq, n))
                budget -= n
        for seq, n in out.scheduled:
            if n > 1:
                self.kv_manager.fill_placeholders(seq.kv)
        return out

    def record_written(self, seq: Sequence, end: int) -> None:
        """The step wrote `seq`'s positions up to `end`: its progress, its new whole blocks
        named for the prefix cache, and the blocks its windows dropped released."""
        if self.kv_manager.prefix_cache is not None:  # before the windows drop blocks
            register_blocks(seq, self.kv_manager, end)
        self.kv_manager.finish_step(seq.kv, end)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        n = min(seq.num_tokens - seq.num_computed_tokens, budget)
        if seq.needs_selection():
            # selection happens exactly where the original prompt ends
            left = seq.num_prompt_tokens - seq.num_computed_tokens
            if left > 0:
                n = min(n, left)
        return n

    def _compaction(self, seq: Sequence, n: int, fits: Callable[[np.ndarray], bool], may_seal: bool = True):
        """Blocks the step that ends the prompt sets aside for the select heads' compaction
        (KVCacheManager.compaction_reserve); 0 for any other step."""
        if not (seq.needs_selection() and seq.num_computed_tokens + n == seq.num_prompt_tokens):
            return 0
        return self.kv_manager.compaction_reserve(seq.kv, seq.num_prompt_tokens, fits, may_seal)

    def _admit(self, seq: Sequence, budget: int) -> tuple[int, np.ndarray | int]:
        """Admit `seq` if it fits; returns its first chunk's token count (0: not admitted)
        and that chunk's compaction reserve."""
        tables = self.kv_manager.new_tables(seq.budgets, seq.pending_heads, seq.context_len, seq.bounded)
        if tables is None:
            return 0, 0
        hashes = hit_candidates(seq, self.kv_manager.block_size) if self.kv_manager.prefix_cache is not None else []
        k, cached = self.kv_manager.match_prefix(tables, hashes)
        taken = tables.adopt_prefix(k, cached) if k else np.zeros(0, dtype=np.int32)
        seq.kv = tables  # its progress: the k cached blocks adopt_prefix laid out
        n = self._chunk(seq, budget)
        end = seq.num_computed_tokens + n

        def fits(reserve) -> bool:
            return self.kv_manager.can_admit(tables, seq.num_tokens, end, taken, reserve)

        # a hit's blocks are not this request's yet: compacting in place needs a prompt of its own
        comp = self._compaction(seq, n, fits, may_seal=not k)
        if not fits(comp):
            self.kv_manager.discard(tables)
            seq.kv = None
            return 0, 0
        self.kv_manager.admit(tables, taken)
        if seq.num_cached_tokens is None:  # a prompt's first admission: what the cache served it
            seq.num_cached_tokens = seq.num_computed_tokens
            self.kv_manager.count_lookup(seq.num_prompt_tokens, seq.num_computed_tokens)
        seq.status = Status.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        return n, comp

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Preempt `seq`; returns the tokens it had been given this step (refunded)."""
        refund = sum(n for s, n in out.scheduled if s is seq)
        out.scheduled = [(s, n) for s, n in out.scheduled if s is not seq]
        self.release(seq)
        seq.status = Status.WAITING  # release dropped its tables: nothing computed
        seq.num_registered = 0  # the recomputed prompt is reproducible again
        seq.cacheable = True
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        return refund

    def release(self, seq: Sequence) -> None:
        """Give a sequence's blocks back (finish, abort, preemption)."""
        if seq.has_kv:
            seq.peak_blocks = max(seq.peak_blocks, seq.kv.peak_blocks)
            self.kv_manager.free(seq.kv)
            seq.kv = None

    def abort(self, request_id: str) -> Sequence | None:
        for seq in list(self.waiting) + self.running:
            if seq.request_id == request_id:
                self.release(seq)
                if seq in self.running:
                    self.running.remove(seq)
                else:
                    self.waiting.remove(seq)
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.release(seq)
        if seq in self.running:
            self.running.remove(seq)
