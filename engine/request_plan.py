"""A plan resolved for one request when it is added: each head's budget in the tables'
column order, the heads that decide at the end of its prompt, the prompt positions its
selection scores, and the fewest blocks it can run with."""

from __future__ import annotations

import numpy as np

from headwise.kvcache import request_blocks
from headwise.kvcache.budget import HeadBudget
from headwise.kvcache.plans import Plan
from headwise.kvcache.prefill_selection import BoundedPrefill
from headwise.kvcache.sharding import Sharding


def head_budgets(
    plan: Plan, sharding: Sharding, prompt_len: int, context_len: int
) -> tuple[list[list[HeadBudget]], np.ndarray]:
    """Head budgets and the heads that select at the end of the prompt, in the tables'
    column order (rank-major under tensor parallelism: `sharding`)."""
    return request_blocks.head_budgets(plan, prompt_len, context_len, sharding.order)


def bounded_prefill(
    plan: Plan, sharding: Sharding, prompt_len: int, context_len: int, margin: float
) -> BoundedPrefill | None:
    """The select heads of a static plan prefilling with a bounded peak (`margin` x their
    select budget kept as candidates between chunks), in the tables' column order; None
    with margin 0 (they hold the whole prompt) or a dynamic plan (any head may stay full)."""
    return request_blocks.bounded_prefill(plan, prompt_len, context_len, margin, sharding.order)


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
    place, or prefilling bounded by `margin`): its peak, forecast by the runtime's own
    accounting (kvcache/request_blocks.py)."""
    return request_blocks.request_blocks(
        plan, prompt_len, max_tokens, block_size, max_num_batched_tokens, False, margin, sharding.order, sharding.ranks
    )[0]


def most_blocks(plan: Plan, sharding: Sharding, prompt_len: int, max_tokens: int, block_size: int) -> int:
    """A bound on least_blocks that costs nothing: every head of a rank holds its whole
    context (or its budget, when that is larger) twice over (a select head's prompt next to
    its compacted copy), plus one partly expired block."""
    ctx = prompt_len + max_tokens
    budget = max((s.sink + s.select + s.recent for row in plan.heads for s in row if s.kind != "full"), default=0)
    if plan.dynamic is not None:
        budget = max(budget, plan.dynamic.rest.sink + plan.dynamic.rest.select + plan.dynamic.rest.recent)
    per_head = 2 * (-(-(ctx + budget) // block_size) + 1)
    return plan.model.layers * sharding.heads_per_rank * per_head
