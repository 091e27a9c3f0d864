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
