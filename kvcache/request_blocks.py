"""One request's heads under a plan, and the blocks it holds step by step.

`head_budgets` / `bounded_prefill` resolve a plan for a request (each head's budget in the
tables' column order, the heads that decide at the end of its prompt, the select heads that
prefill bounded). `request_blocks` / `decode_head_blocks` forecast what the request holds
alone in the engine by running the runtime's own accounting on a scratch pool: the same
`KVCacheManager` and `HeadTables` calls, in the order the scheduler makes them, so admission,
`plan show` and `bench capacity` cannot drift from what a running request takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from headwise.kvcache.budget import HeadBudget, candidate_capacity, candidate_slots, resolve_budget
from headwise.kvcache.manager import KVCacheManager
from headwise.kvcache.plan_build import dynamic_full_count
from headwise.kvcache.plans import Plan
from headwise.kvcache.prefill_selection import BoundedPrefill

Order = Sequence[Sequence[int]]  # order[l]: layer l's KV heads (model numbering) in column order


def _columns(plan: Plan, order: Order | None) -> list[list]:
    if order is None:
        return [list(row) for row in plan.heads]
    return [[row[h] for h in o] for row, o in zip(plan.heads, order)]


def head_budgets(
    plan: Plan, prompt_len: int, context_len: int, order: Order | None = None
) -> tuple[list[list[HeadBudget]], np.ndarray]:
    """Head budgets and the heads that select at the end of the prompt, in column order."""
    layers, kv_heads = plan.model.layers, plan.model.kv_heads
    if plan.dynamic is not None:
        rest = resolve_budget(plan.dynamic.rest, prompt_len, context_len)
        return [[rest] * kv_heads for _ in range(layers)], np.ones((layers, kv_heads), dtype=bool)
    heads = _columns(plan, order)
    budgets = [[resolve_budget(s, prompt_len, context_len) for s in row] for row in heads]
    return budgets, np.array([[s.kind == "select" for s in row] for row in heads])


def widest_budget(budgets: list[list[HeadBudget]]) -> int:
    """The most slots any head's budget lays out (sink + select + recent; 0 for full heads)."""
    return max(b.sink + b.select + (b.recent or 0) for row in budgets for b in row)


def bounded_prefill(
    plan: Plan, prompt_len: int, context_len: int, margin: float, order: Order | None = None
) -> BoundedPrefill | None:
    """The select heads of a static plan prefilling with a bounded peak (`margin` x their
    select budget kept as candidates between chunks), in column order; None with margin 0
    (they hold the whole prompt) or a dynamic plan (any head may stay full)."""
    if not margin or plan.dynamic is not None:
        return None
    heads = _columns(plan, order)
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


def request_blocks(
    plan: Plan,
    prompt_len: int,
    max_tokens: int,
    block_size: int = 16,
    chunk: int = 2048,
    prefix_caching: bool = True,
    margin: float = 0.0,
    order: Order | None = None,
    ranks: int = 1,
) -> np.ndarray:
    """`[ranks, 2]`: the (peak, decode peak) blocks of each rank's heads (columns `order`,
    rank-major) for one request alone in the engine; `.max(axis=0)` is the most loaded
    rank's. The prompt runs in chunks of `chunk` tokens, then one token per step up to the
    prompt_len + max_tokens - 1 positions ever written. The peak counts each step after it
    laid out what it writes (compaction reserve included), the decode peak what is held when
    a token is sampled. Select heads (and a dynamic plan's heads) hold the prompt until it
    ends, then sink + selected + ring; with prefix caching that step also sets aside their
    new blocks. With `margin` > 0 a static plan's select heads prefill bounded
    (kvcache/prefill_selection.py)."""
    ends, grown, after = _forecast(
        plan, prompt_len, max_tokens, block_size, chunk, prefix_caching, margin, order, ranks
    )
    held = after.reshape(after.shape[0], ranks, -1, after.shape[2]).sum(axis=(0, 2))[:, ends >= prompt_len]
    return np.stack([grown.max(axis=1), held.max(axis=1)], axis=1)


def decode_head_blocks(plan: Plan, prompt_len: int, max_tokens: int, block_size: int = 16) -> np.ndarray:
    """`[L, Hkv]` blocks each head holds at the request's decode peak (request_blocks'
    second figure, head by head): what `plan show` counts."""
    ends, _, after = _forecast(plan, prompt_len, max_tokens, block_size, 2048, False, 0.0, None, 1)
    sampled = np.nonzero(ends >= prompt_len)[0]
    return after[:, :, sampled[after.sum(axis=(0, 1))[sampled].argmax()]]


def _step_ends(prompt_len: int, context_len: int, chunk: int, block_size: int, recents: np.ndarray) -> np.ndarray:
    """The last position + 1 of every step that changes what a head holds: each prompt chunk,
    then the decode steps that start a block (position end - 1 opens one) or push a block
    out of some window (end - recent crosses a block boundary). Between two of them every
    head holds the same blocks, so the forecast skips the steps in between."""
    prefill = [*range(min(chunk, prompt_len), prompt_len, chunk), prompt_len]
    decode = np.arange(prompt_len + 1, context_len)
    event = (decode - 1) % block_size == 0
    for r in np.unique(recents):
        event |= (decode >= r) & ((decode - r) % block_size == 0)
    if len(decode):
        event[0] = True
    return np.array([*prefill, *decode[event]], dtype=np.int64)


def _forecast(
    plan: Plan,
    prompt_len: int,
    max_tokens: int,
    block_size: int,
    chunk: int,
    prefix_caching: bool,
    margin: float,
    order: Order | None,
    ranks: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run one request through a scratch `KVCacheManager` as the scheduler and the engine
    drive it: the steps' ends `[steps]`, the blocks each rank holds once each step laid out
    what it writes `[ranks, steps]`, and the blocks each head holds after each step `[L, Hkv, steps]`."""
    shape = plan.model
    ctx = prompt_len + max_tokens
    budgets, pending = head_budgets(plan, prompt_len, ctx, order)
    bounded = bounded_prefill(plan, prompt_len, ctx, margin, order)
    # a budget may exceed a short request (a select head's sinks are laid out whole)
    width = ctx + widest_budget(budgets)
    per_head = -(-width // block_size) + 1
    # room for every head's prompt, its window promise and its compacted copy: the forecast never waits
    pool = 3 * shape.layers * (shape.kv_heads // ranks) * per_head
    kv = KVCacheManager(
        shape.layers,
        shape.kv_heads,
        1,
        block_size,
        pool,
        width,
        torch.float32,
        "cpu",
        1,
        prefix_caching,
        ranks,
        pool_tensors=False,
    )
    tables = kv.new_tables(budgets, pending, ctx, bounded)
    assert tables is not None
    recents = tables.recent[tables.window]
    ends = _step_ends(prompt_len, ctx, chunk, block_size, recents)
    selecting = bool(pending.any())
    keep_full = torch.zeros(pending.shape, dtype=torch.bool)
    if plan.dynamic is not None:  # the stand-in of plan_build.static_heads: a layer's first heads stay full
        keep_full[:, : dynamic_full_count(plan.dynamic.ratio, shape.kv_heads)] = True
    grown = np.zeros((ranks, len(ends)), dtype=np.int64)
    after = np.zeros((*pending.shape, len(ends)), dtype=np.int64)
    start = 0
    for i, end in enumerate(ends.tolist()):
        comp: np.ndarray | int = 0
        if selecting and end == prompt_len:
            comp = kv.compaction_reserve(tables, prompt_len, lambda _: True)
        if i == 0:
            kv.admit(tables, np.zeros(0, dtype=np.int32))
        kv.grow(tables, end, comp)
        if end - start > 1:
            kv.fill_placeholders(tables)
        reserve = np.array([len(r) for r in tables.reserve])
        grown[:, i] = tables.per_rank(tables.held) + reserve
        kv.finish_step(tables, end)
        if selecting and end == prompt_len:
            if bounded is not None:
                kv.finish_bounded(tables)
            else:
                scores = [torch.zeros(shape.kv_heads, prompt_len) for _ in range(shape.layers)]
                kv.compact(tables, keep_full, scores)
        after[..., i] = tables.held
        start = end
    return ends, grown, after
