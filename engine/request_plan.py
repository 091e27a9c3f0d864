"""A plan resolved for one request when it is added: each head's budget in the tables'
column order, the heads that decide at the end of its prompt, the select heads that prefill
bounded, the prompt positions its selection scores; and whether the pool can ever hold it
(the fewest blocks it can run with, and a free bound on them)."""

from __future__ import annotations

from headwise.engine.errors import PromptTooLong
from headwise.engine.sequence import Sequence
from headwise.kvcache.budget import HeadBudget
from headwise.kvcache.plans import Plan
from headwise.kvcache.request_blocks import bounded_prefill, head_budgets, request_blocks, widest_budget
from headwise.kvcache.sharding import Sharding


def resolve_plan(seq: Sequence, sharding: Sharding, margin: float) -> None:
    """Set `seq`'s budgets, pending heads, bounded select heads (`margin`) and probe window
    from its plan, in the tables' column order (rank-major under tensor parallelism)."""
    n, ctx = seq.num_prompt_tokens, seq.context_len
    seq.probe_window = probe_window(seq.plan)
    seq.budgets, seq.pending_heads = head_budgets(seq.plan, n, ctx, sharding.order)
    seq.bounded = bounded_prefill(seq.plan, n, ctx, margin, sharding.order)


def check_fits(seq: Sequence, sharding: Sharding, block_size: int, pool: int, chunk: int, margin: float) -> None:
    """PromptTooLong when the request alone could never run in a pool of `pool` blocks per
    rank (its forecast peak, only computed when the free bound says it might not fit)."""
    if most_blocks(seq.budgets, sharding, seq.context_len, block_size) <= pool:
        return
    need = least_blocks(seq.plan, sharding, seq.num_prompt_tokens, seq.params.max_tokens, block_size, chunk, margin)
    if need > pool:
        raise PromptTooLong(
            f"the request needs {need} KV blocks but the pool has {pool}; "
            "shorten the prompt or max_tokens, or start with a larger --kv-cache-mb",
            "prompt",
        )


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
    place, or prefilling bounded by `margin`): its peak on its most loaded rank, forecast by
    the runtime's own accounting (kvcache/request_blocks.py)."""
    blocks = request_blocks(
        plan, prompt_len, max_tokens, block_size, max_num_batched_tokens, False, margin, sharding.order, sharding.ranks
    )
    return int(blocks[:, 0].max())


def most_blocks(budgets: list[list[HeadBudget]], sharding: Sharding, context_len: int, block_size: int) -> int:
    """A bound on least_blocks that costs nothing: every head of a rank holds its whole
    context plus the widest budget (`budgets`, resolved for the request) twice over (a
    select head's prompt next to its compacted copy), plus one partly expired block."""
    per_head = 2 * (-(-(context_len + widest_budget(budgets)) // block_size) + 1)
    return len(budgets) * sharding.heads_per_rank * per_head
