"""Importers: plans from the head files other projects publish (DuoAttention gates,
Retrieval-Head scores, MoA elastic rules), checked against the model they will serve."""

from __future__ import annotations

import math
import re
from pathlib import Path

from headwise.kvcache.plan_build import plan_from_scores, plan_source, ratio_plan_name, reduce_query_scores
from headwise.kvcache.plans import HeadSpec, ModelShape, Plan, PlanError, plan_from_dict, plan_to_dict, read_json

# DuoAttention's deployment: streaming heads keep 64 sinks and 256 recent tokens.
DEFAULT_SINK = 64
DEFAULT_RECENT = 256
# Retrieval heads (score > 0.1) are 2-6% of query heads; a KV head is needed when any head of
# its GQA group is one, so a quarter of KV heads covers them with margin.
RETRIEVAL_RATIO = 0.25


def duo_default_ratio(shape: ModelShape) -> float:
    """DuoAttention deploys 50% streaming heads on GQA models, 75% on MHA models."""
    return 0.5 if shape.heads > shape.kv_heads else 0.25


def import_duo(
    path: str | Path,
    shape: ModelShape,
    ratio: float | None = None,
    sink: int = DEFAULT_SINK,
    recent: int = DEFAULT_RECENT,
    name: str | None = None,
) -> Plan:
    """DuoAttention `full_attention_heads.tsv`: a row of per-KV-head gates in [0, 1] per layer;
    the `ratio` highest gates stay full (default duo_default_ratio), the rest stream."""
    ratio = duo_default_ratio(shape) if ratio is None else ratio
    gates = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        cells = line.split()
        if len(cells) != shape.kv_heads:
            raise PlanError(f"{path}: line {lineno}: expected {shape.kv_heads} kv heads, got {len(cells)}")
        row = [_float(c, f"{path}: line {lineno}") for c in cells]
        bad = [g for g in row if not 0 <= g <= 1]
        if bad:
            raise PlanError(f"{path}: line {lineno}: gate {bad[0]!r} is outside [0, 1]")
        gates.append(row)
    if len(gates) != shape.layers:
        raise PlanError(f"{path}: gates for {len(gates)} layers, model has {shape.layers}")
    params = {"file": Path(path).name, "sink": sink, "recent": recent}
    return _checked(
        path,
        plan_from_scores(
            shape,
            gates,
            ratio,
            HeadSpec("window", sink=sink, recent=recent),
            name or ratio_plan_name("duo", ratio),
            plan_source("duo", params),
        ),
    )


def import_retrieval_head(
    path: str | Path,
    shape: ModelShape,
    ratio: float = RETRIEVAL_RATIO,
    sink: int = DEFAULT_SINK,
    recent: int = DEFAULT_RECENT,
    name: str | None = None,
) -> Plan:
    """Retrieval-Head `{"L-H": [score per test, ...]}` (H a query head): a head scores its mean,
    a KV head the max of its group; the `ratio` best KV heads stay full, the rest stream."""
    d = read_json(path)
    if not isinstance(d, dict):
        raise PlanError(f'{path}: expected a JSON object of "layer-head" keys, got {type(d).__name__}')
    q_scores = [[0.0] * shape.heads for _ in range(shape.layers)]
    seen_layers, seen_heads = 0, 0
    for key, tests in d.items():
        m = re.fullmatch(r"(\d+)-(\d+)", key)
        if not m:
            raise PlanError(f'{path}: key {key!r}: expected "layer-head" such as "12-3"')
        layer, head = int(m[1]), int(m[2])
        seen_layers, seen_heads = max(seen_layers, layer + 1), max(seen_heads, head + 1)
        if layer >= shape.layers or head >= shape.heads:
            raise PlanError(f"{path}: key {key!r}: outside the model's {shape.layers} layers x {shape.heads} heads")
        if not isinstance(tests, list):
            raise PlanError(f"{path}: {key}: expected a list of scores, got {tests!r}")
        values = [_float(v, f"{path}: {key}") for v in tests]
        # A head never scored on a test (no correct answer) counts as no retrieval.
        q_scores[layer][head] = sum(values) / len(values) if values else 0.0
    if (seen_layers, seen_heads) != (shape.layers, shape.heads):
        raise PlanError(
            f"{path}: scores cover {seen_layers} layers x {seen_heads} heads, model has {shape.layers} x {shape.heads}"
        )
    params = {"file": Path(path).name, "sink": sink, "recent": recent}
    return _checked(
        path,
        plan_from_scores(
            shape,
            reduce_query_scores(q_scores, shape.kv_heads),
            ratio,
            HeadSpec("window", sink=sink, recent=recent),
            name or ratio_plan_name("retrieval", ratio),
            plan_source("retrieval", params),
        ),
    )


def import_moa(path: str | Path, shape: ModelShape, sink: int = DEFAULT_SINK, name: str | None = None) -> Plan:
    """MoA `{"alphas": [L][H], "betas": [L][H]}`: each head an elastic span alpha + beta * N
    behind `sink` sinks. Rows per query head reduce to the max over each GQA group, so the KV
    head keeps enough for its widest query head."""
    d = read_json(path)
    if not isinstance(d, dict):
        raise PlanError(f'{path}: expected a JSON object with "alphas" and "betas", got {type(d).__name__}')
    tables = {k: _moa_table(path, d, k, shape) for k in ("alphas", "betas")}
    heads = [
        [HeadSpec("elastic", sink=sink, alpha=a, beta=b) for a, b in zip(ra, rb)]
        for ra, rb in zip(tables["alphas"], tables["betas"])
    ]
    source = plan_source("moa", {"file": Path(path).name, "sink": sink})
    return _checked(path, Plan(name or "moa", shape, heads, source=source))


def _moa_table(path: str | Path, d: dict, key: str, shape: ModelShape) -> list[list[float]]:
    rows = d.get(key)
    if not isinstance(rows, list):
        raise PlanError(f"{path}: {key}: expected a list of layers, got {rows!r}")
    if len(rows) != shape.layers:
        raise PlanError(f"{path}: {key}: {len(rows)} layers, model has {shape.layers}")
    table = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) not in (shape.kv_heads, shape.heads):
            n = len(row) if isinstance(row, list) else row
            raise PlanError(f"{path}: {key}[{i}]: expected {shape.kv_heads} kv heads or {shape.heads} heads, got {n}")
        values = [_float(v, f"{path}: {key}[{i}]") for v in row]
        if any(v < 0 for v in values):
            raise PlanError(f"{path}: {key}[{i}]: values must be >= 0, got {min(values)!r}")
        table.append(values)
    return reduce_query_scores(table, shape.kv_heads)


def _checked(path: str | Path, plan: Plan) -> Plan:
    # Whatever an importer builds must load back: run the file validation on it.
    try:
        plan_from_dict(plan_to_dict(plan), plan.model)
    except PlanError as e:
        raise PlanError(f"{path}: {e}") from None
    return plan


def _float(v: object, where: str) -> float:
    try:
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PlanError(f"{where}: {v!r} is not a number") from None
    if isinstance(v, bool) or not math.isfinite(x):
        raise PlanError(f"{where}: {v!r} is not a finite number")
    return x
