"""A plan resolved for one request when it is added: each head's budget in the tables'
column order, the heads that decide at the end of its prompt, the prompt positions its
selection scores, and the fewest blocks it can run with."""

from __future__ import annotations

import numpy as np

from headwise.kvcache.budget import HeadBudget, candidate_capacity, candidate_slots, resolve_budget
from headwise.kvcache.plan_build import request_blocks
from headwise.kvcache.plans import Plan
from headwise.kvcache.prefill_selection import BoundedPrefill
from headwise.kvcache.sharding import Sharding, rank_plans


def head_budgets(
    plan: Plan, sharding: Sharding, prompt_len: int, context_len: int
) -> tuple[list[list[HeadBudget]], np.ndarray]:
    """Head budgets and the heads that select at the end of the prompt, in the tables'
    column order (rank-major under tensor parallelism: `sharding`)."""
    layers, kv_heads = plan.model.layers, plan.model.kv_heads
    if plan.dynamic is not None:
        rest = resolve_budget(plan.dynamic.rest, prompt_len, context_len)
        return [[rest] * kv_heads for _ in range(layers)], np.ones((layers, kv_heads), dtype=bool)
    heads = [[row[h] for h in order] for row, order in zip(plan.heads, sharding.order)]
    budgets = [[resolve_budget(s, prompt_len, context_len) for s in row] for row in heads]
    return budgets, np.array([[s.kind == "select" for s in row] for row in heads])


def bounded_prefill(
    plan: Plan, sharding: Sharding, prompt_len: int, context_len: int, margin: float
) -> BoundedPrefill | None:
    """The select heads of a static plan prefilling with a bounded peak (`margin` x their
    select budget kept as candidates between chunks), in the tables' column order; None
    with margin 0 (they hold the whole prompt) or a dynamic plan (any head may stay full)."""
    if not margin or plan.dynamic is not None:
        return None
    heads = [[row[h] for h in order] for row, order in zip(plan.heads, sharding.order)]
    if not any(s.kind == "select" for row in heads for s in row):
        return None
    shape = (len(heads), len(heads[0]))
    fields = {n: np.zeros(shape, dtype=np.int64) for n in ("slots", "sink", "select", "recent", "candidates", "window")}
    for l, row in enumerate(heads):
        for h, spec in enumerate(row):
            if spec.kind != "select":
                continue
            b = resolve_budget(spec, prompt_len, context_len)
            fields["slots"][l, h] = candidate_capacity(b, prompt_len, context_len, margin)
            fields["sink"][l, h], fields["select"][l, h] = b.sink, b.select
            fields["recent"][l, h], fields["window"][l, h] = b.recent or 0, spec.window
            fields["candidates"][l, h] = candidate_slots(b, margin)
    return BoundedPrefill(prompt_len=prompt_len, **fields)


def probe_window(plan: Plan) -> int:
    """The last prompt positions whose queries and outputs `plan`'s selection needs: its
    select heads' widest scoring window (a dynamic plan's rest), 0 without selection."""
    specs = [plan.dynamic.rest] if plan.dynamic else [s for row in plan.heads for s in row if s.kind == "select"]
    return max(s.window for s in specs) if specs else 0


def least_blocks(
    plan: Plan,
    sharding: Sharding,
    prompt_len: int,
    max_tokens: int,
    block_size: int,
    max_num_batched_tokens: int,
    margin: float = 0.0,
) -> int:
    """The fewest blocks per rank the request can run with (select heads compacting in
    place, or prefilling bounded by `margin`)."""
    parts = rank_plans(plan, sharding) if sharding.ranks > 1 else [plan]
    return max(
        request_blocks(part, prompt_len, max_tokens, block_size, max_num_batched_tokens, False, margin)[0]
        for part in parts
    )
