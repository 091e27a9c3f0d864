"""Head budgets: how many cache slots each (layer, kv_head) of one request may hold."""

from __future__ import annotations

from dataclasses import dataclass

from headwise.kvcache.plans import HeadSpec


@dataclass(frozen=True)
class HeadBudget:
    """(sink, recent, select) of one head for one request; recent None = full head."""

    sink: int = 0
    recent: int | None = None
    select: int = 0

    @property
    def full(self) -> bool:
        return self.recent is None

    def capacity(self, context_len: int) -> int:
        """Slots needed for a request of `context_len` tokens (prompt + max new)."""
        if self.recent is None:
            return context_len
        return min(context_len, self.sink + self.select + self.recent)


FULL_BUDGET = HeadBudget()


def select_range(b: HeadBudget, prompt_len: int) -> tuple[int, int, int]:
    """A select head at the end of a `prompt_len` prompt: the middle positions [lo, hi)
    it chooses from (after the sink, before the recent ring) and how many it keeps."""
    lo = min(b.sink, prompt_len)
    hi = max(lo, prompt_len - (b.recent or 0))
    return lo, hi, min(b.select, hi - lo)


def compacted_capacity(b: HeadBudget, prompt_len: int, context_len: int) -> int:
    """Slots a select head holds once its prompt is compacted: sink + chosen + ring."""
    ring = b.recent or 0
    return b.sink + select_range(b, prompt_len)[2] + min(ring, max(0, context_len - b.sink))


def candidate_capacity(b: HeadBudget, prompt_len: int, context_len: int, margin: float) -> int:
    """Slots a select head holds while its prompt is prefilled with a bounded peak (margin >
    0): sink + `margin * select` running candidates + the last `recent` positions, or the
    whole prompt when that is shorter; never less than it keeps once compacted (the final
    layout is written into the same blocks)."""
    prefill = min(prompt_len, b.sink + candidate_slots(b, margin) + (b.recent or 0))
    return max(prefill, compacted_capacity(b, prompt_len, context_len))


def candidate_slots(b: HeadBudget, margin: float) -> int:
    """Middle tokens a bounded select head keeps between prefill chunks."""
    return max(b.select, int(margin * b.select))


def candidates_kept(b: HeadBudget, margin: float, end: int) -> int:
    """Valid slots of a bounded select head once positions [0, end) of its prompt are
    written (before the prompt ends): sinks, the best `candidate_slots` of the middle (the
    positions before the last `recent`), and the last `recent` positions."""
    recent = b.recent or 0
    middle = max(0, end - recent - b.sink)
    return min(end, b.sink) + min(candidate_slots(b, margin), middle) + min(recent, max(0, end - b.sink))


def window_first_block(sink_blocks, recent, end, block_size: int):
    """First logical block a window head keeps beyond its sink blocks once positions up to
    `end` are written: the block of position end - recent (numpy-friendly)."""
    import numpy as np

    return np.maximum(sink_blocks, np.maximum(np.asarray(end) - recent, 0) // block_size)


def resolve_budget(spec: HeadSpec, prompt_len: int, context_len: int) -> HeadBudget:
    """The budget a head spec gives a request with this prompt and context length."""
    if spec.kind == "full":
        return FULL_BUDGET
    if spec.kind == "window":
        return HeadBudget(spec.sink, spec.recent, 0)
    if spec.kind == "elastic":
        recent = int(round(spec.alpha + spec.beta * prompt_len))
        return HeadBudget(spec.sink, max(0, min(recent, context_len)), 0)
    if spec.kind == "select":
        return HeadBudget(spec.sink, spec.recent, spec.select)
    raise ValueError(f"unknown head kind {spec.kind!r}")
