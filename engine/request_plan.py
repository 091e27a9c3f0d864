"""A plan resolved for one request when it is added: each head's budget in the tables'
column order, the heads that decide at the end of its prompt, the prompt positions its
selection scores, and the fewest blocks it can run with."""

from __future__ import annotations

import numpy as np

from headwise.kvcache.budget import HeadBudget, resolve_budget
from headwise.kvcache.plan_build import request_blocks
from headwise.kvcache.plans import Plan
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


def probe_window(plan: Plan) -> int:
    """The last prompt positions whose queries and outputs `plan`'s selection needs: its
    select heads' widest scoring window (a dynamic plan's rest), 0 without selection."""
    specs = [plan.dynamic.rest] if plan.dynamic else [s for row in plan.heads for s in row if s.kind == "select"]
    return max(s.window for s in specs) if specs else 0


def least_blocks(
    plan: Plan, sharding: Sharding, prompt_len: int, max_tokens: int, block_size: int, max_num_batched_tokens: int
) -> int:
    """The fewest blocks per rank the request can run with (select heads compacting in place)."""
    parts = rank_plans(plan, sharding) if sharding.ranks > 1 else [plan]
    return max(
        request_blocks(part, prompt_len, max_tokens, block_size, max_num_batched_tokens, prefix_caching=False)[0]
        for part in parts
    )
