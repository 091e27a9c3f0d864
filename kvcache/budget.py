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
