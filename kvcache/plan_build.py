"""Plan builders: uniform streaming plans, score-thresholded plans, and KV byte accounting."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime

from headwise.kvcache.budget import resolve_budget
from headwise.kvcache.plans import (
    FULL,
    DynamicSpec,
    HeadSpec,
    ModelShape,
    Plan,
    PlanError,
    check_spec,
    full_plan,
    parse_scores,
)


def plan_source(method: str, params: dict | None = None) -> dict:
    """The `source` record of a plan made now."""
    created = datetime.now(UTC).isoformat(timespec="seconds")
    return {"method": method, "params": dict(params or {}), "created": created}


def full_head_count(ratio: float, heads: int) -> int:
    """How many of `heads` stay full at `ratio`: ratio * heads rounded half up.

    Half up, not Python's round-half-even, so 0.25 of 90 heads keeps 23 (erring toward
    quality); the epsilon absorbs float error such as 0.35 * 10 = 3.4999999999999996."""
    if not 0 <= ratio <= 1:
        raise PlanError(f"ratio: must be a number in [0, 1], got {ratio!r}")
    return min(heads, math.floor(ratio * heads + 0.5 + 1e-9))


def dynamic_full_count(ratio: float, heads_per_layer: int) -> int:
    """KV heads per layer a dynamic plan keeps full: full_head_count, at least 1 when ratio > 0."""
    return max(1 if ratio > 0 else 0, full_head_count(ratio, heads_per_layer))


def ratio_plan_name(method: str, ratio: float) -> str:
    """The default name of a plan thresholded at `ratio`, e.g. retrieval-25."""
    return f"{method}-{ratio * 100:g}"


def streaming_plan(shape: ModelShape, sink: int, recent: int, name: str | None = None) -> Plan:
    """StreamingLLM: every KV head keeps `sink` first tokens and a ring of `recent`."""
    spec = HeadSpec("window", sink=sink, recent=recent)
    check_spec(spec)
    return Plan(
        name or f"streaming-{sink}-{recent}",
        shape,
        [[spec] * shape.kv_heads for _ in range(shape.layers)],
        source=plan_source("streaming", {"sink": sink, "recent": recent}),
    )


def select_plan(shape: ModelShape, sink: int, recent: int, select: int, window: int, name: str | None = None) -> Plan:
    """Every KV head keeps sink + recent + the `select` middle tokens the last `window`
    prompt queries attend to most (Task-KV middle activations / SnapKV)."""
    spec = HeadSpec("select", sink=sink, recent=recent, select=select, window=window)
    check_spec(spec)
    return Plan(
        name or f"select-{sink}-{select}-{recent}",
        shape,
        [[spec] * shape.kv_heads for _ in range(shape.layers)],
        source=plan_source("select", {"sink": sink, "recent": recent, "select": select, "window": window}),
    )


def dynamic_plan(
    shape: ModelShape, ratio: float, sink: int, recent: int, select: int, window: int, name: str | None = None
) -> Plan:
    """Task-KV per request: on each prompt the `ratio` of each layer's KV heads farthest
    from the layer's semantic center stay full, the others get a select budget."""
    full_head_count(ratio, shape.kv_heads)  # validates ratio
    rest = HeadSpec("select", sink=sink, recent=recent, select=select, window=window)
    check_spec(rest)
    return Plan(
        name or ratio_plan_name("dynamic", ratio),
        shape,
        [[FULL] * shape.kv_heads for _ in range(shape.layers)],
        source=plan_source(
            "dynamic", {"ratio": ratio, "sink": sink, "recent": recent, "select": select, "window": window}
        ),
        dynamic=DynamicSpec(ratio, rest),
    )


def plan_from_scores(
    shape: ModelShape, scores: list[list[float]], ratio: float, rest: HeadSpec, name: str, source: dict | None = None
) -> Plan:
    """Keep the full_head_count(ratio, L * Hkv) highest-scored KV heads full, give the rest
    `rest`; ties go to the lower (layer, head). The scores are stored for rethreshold."""
    scores = parse_scores(scores, shape)
    if rest.kind == "full":
        raise PlanError("rest: the non-full heads need a bounded kind, got 'full'")
    check_spec(rest)
    order = sorted(
        ((i, j) for i in range(shape.layers) for j in range(shape.kv_heads)), key=lambda ij: (-scores[ij[0]][ij[1]], ij)
    )
    keep = set(order[: full_head_count(ratio, len(order))])
    heads = [[FULL if (i, j) in keep else rest for j in range(shape.kv_heads)] for i in range(shape.layers)]
    source = dict(source or plan_source("scores"))
    source["params"] = {**source.get("params", {}), "ratio": ratio}
    return Plan(name, shape, heads, scores, source)


def rethreshold(plan: Plan, ratio: float, name: str | None = None) -> Plan:
    """The same plan at another full-head ratio, from its saved scores and its one
    non-full spec; a dynamic plan just gets the new per-layer ratio; a moa plan is re-solved
    from its saved rule costs with `ratio` as the mean-density bound."""
    name = name or plan.name
    if plan.source.get("method") == "moa":
        # MoA heads have per-head rules, not one rest spec: re-solve the MILP at density `ratio`
        params = plan.source.get("params", {})
        if "rule_costs" not in params:
            raise PlanError(
                f"plan {plan.name!r} is a moa plan without rule_costs (made by an older "
                "headwise); run `headwise profile moa --density ...` again"
            )
        if not 0 < ratio <= 1:
            raise PlanError(f"ratio: a moa plan's density bound must be in (0, 1], got {ratio!r}")
        from headwise.kvcache.moa_rules import plan_for_density

        return plan_for_density(plan.model, params, ratio, name)[0]
    if plan.dynamic is not None:
        full_head_count(ratio, plan.model.kv_heads)  # validates ratio
        source = {**plan.source, "params": {**plan.source.get("params", {}), "ratio": ratio}}
        return dataclasses.replace(
            plan, name=name, source=source, dynamic=dataclasses.replace(plan.dynamic, ratio=ratio)
        )
    if plan.scores is None:
        raise PlanError(f"plan {plan.name!r} has no scores to re-threshold (it was not built from scores)")
    rest = {s for row in plan.heads for s in row if s.kind != "full"}
    if len(rest) != 1:
        what = "no non-full head" if not rest else f"{len(rest)} different non-full head specs"
        raise PlanError(f"plan {plan.name!r} has {what}; re-thresholding needs exactly one")
    return plan_from_scores(plan.model, plan.scores, ratio, rest.pop(), name, plan.source)


def reduce_query_scores(q_scores: list[list[float]], kv_heads: int) -> list[list[float]]:
    """[layers][query heads] -> [layers][kv heads]: a KV head scores the max of its GQA group
    (query head h reads kv head h // (Hq // Hkv)), since it must serve its neediest head."""
    out = []
    for i, row in enumerate(q_scores):
        if kv_heads < 1 or len(row) % kv_heads:
            raise PlanError(f"scores[{i}]: {len(row)} query heads do not split into {kv_heads} kv heads")
        group = len(row) // kv_heads
        out.append([max(row[k * group : (k + 1) * group]) for k in range(kv_heads)])
    return out


def static_heads(plan: Plan) -> list[list[HeadSpec]]:
    """The plan's heads; for a dynamic plan a stand-in with the same per-layer budget (the
    first full_head_count(ratio, Hkv) heads of each layer full, the rest `rest`)."""
    if plan.dynamic is None:
        return plan.heads
    k = dynamic_full_count(plan.dynamic.ratio, plan.model.kv_heads)
    row = [FULL] * k + [plan.dynamic.rest] * (plan.model.kv_heads - k)
    return [list(row) for _ in range(plan.model.layers)]


def head_capacities(plan: Plan, context_len: int, prompt_len: int | None = None) -> list[list[int]]:
    """Slots each (layer, kv head) holds for one request after prefill."""
    prompt = context_len if prompt_len is None else prompt_len
    return [[resolve_budget(s, prompt, context_len).capacity(context_len) for s in row] for row in static_heads(plan)]


def layer_kv_bytes(
    plan: Plan, context_len: int, prompt_len: int | None = None, dtype_bytes: int = 4, block_size: int = 16
) -> list[int]:
    """KV bytes per layer of one request of `context_len` tokens after prefill (what a
    request holds step by step, its prefill peak included: kvcache/request_blocks.py).
    Each head rounds its capacity up to whole blocks, as the block pool allocates."""
    if context_len < 0 or block_size < 1:
        raise PlanError(f"context_len must be >= 0 and block_size >= 1, got {context_len}, {block_size}")
    slot_bytes = 2 * plan.model.head_dim * dtype_bytes
    return [
        sum(-(-cap // block_size) * block_size for cap in row) * slot_bytes
        for row in head_capacities(plan, context_len, prompt_len)
    ]


def kv_bytes(
    plan: Plan, context_len: int, prompt_len: int | None = None, dtype_bytes: int = 4, block_size: int = 16
) -> int:
    """Sum of layer_kv_bytes: one request's KV footprint under this plan."""
    return sum(layer_kv_bytes(plan, context_len, prompt_len, dtype_bytes, block_size))


def kv_ratio(plan: Plan, context_len: int, prompt_len: int | None = None, block_size: int = 16) -> float:
    """kv_bytes of the plan over kv_bytes of the full plan of the same model."""
    full = kv_bytes(full_plan(plan.model), context_len, prompt_len, 1, block_size)
    return kv_bytes(plan, context_len, prompt_len, 1, block_size) / full if full else 1.0
