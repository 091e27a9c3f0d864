"""Continuous batching at token granularity with chunked prefill, FCFS.

Each step fills a token budget: running sequences first (decode tokens, then prefill
chunks), then new admissions. A sequence is admitted when the pool holds its prefill
peak (docs/design.md, "KV cache"); when a running sequence cannot grow, the newest running
sequence is preempted (its blocks freed, recomputed later). No admission in a step
that preempted.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

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
    def __init__(self, kv_manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, budget_fn):
        self.kv_manager = kv_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.budget_fn = budget_fn  # Sequence -> (budgets, pending) for a new HeadTables
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
            while self.kv_manager.blocks_needed(seq.tables, seq.num_computed_tokens + n) > self.kv_manager.num_free:
                victim = max((s for s in self.running if s.status == Status.RUNNING), key=lambda s: s.arrival_time)
                budget += self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            self.kv_manager.grow(seq.tables, seq.num_computed_tokens + n)
            out.scheduled.append((seq, n))
            budget -= n
        self.running = [s for s in self.running if s.status == Status.RUNNING]
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            n = self._chunk(seq, budget)
            self.kv_manager.grow(seq.tables, seq.num_computed_tokens + n)
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def _chunk(self, seq: Sequence, budget: int) -> int:
        n = min(seq.num_tokens - seq.num_computed_tokens, budget)
        if seq.needs_selection():
            # selection happens exactly where the original prompt ends
            left = seq.num_prompt_tokens - seq.num_computed_tokens
            if left > 0:
                n = min(n, left)
        return n

    def _admit(self, seq: Sequence) -> bool:
        budgets, pending = self.budget_fn(seq)
        tables = self.kv_manager.new_seq(budgets, pending, seq.context_len)
        # the prefill peak: bounded heads whole, the others the entire (re)computed prompt
        if self.kv_manager.blocks_needed(tables, seq.num_tokens) > self.kv_manager.num_free:
            return False
        self.kv_manager.grow(tables, seq.num_tokens)
        seq.tables = tables
        seq.status = Status.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Preempt `seq`; returns the tokens it had been given this step (refunded)."""
        refund = sum(n for s, n in out.scheduled if s is seq)
        out.scheduled = [(s, n) for s, n in out.scheduled if s is not seq]
        self.release(seq)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
        seq.captured_q = seq.captured_out = None
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        return refund

    def release(self, seq: Sequence) -> None:
        """Give a sequence's blocks back (finish, abort, preemption)."""
        if seq.tables is not None:
            seq.peak_blocks = max(seq.peak_blocks, seq.tables.peak_blocks)
            self.kv_manager.free(seq.tables)
            seq.tables = None

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
