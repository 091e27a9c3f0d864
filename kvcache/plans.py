"""Compression plans: a budget kind for every (layer, kv_head) of one model (DESIGN.md s.4)."""

from __future__ import annotations

from dataclasses import dataclass, field

FORMAT = "headwise-plan/1"
KINDS = ("full", "window", "elastic", "select")


class PlanError(ValueError):
    """A plan file is malformed or does not fit the model; the message names the field."""


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    heads: int
    head_dim: int
    id: str = ""


@dataclass(frozen=True)
class HeadSpec:
    kind: str  # one of KINDS
    sink: int = 0
    recent: int = 0  # window / select: ring size
    select: int = 0  # select: middle tokens chosen at the end of prefill
    window: int = 32  # select: observation window (last prompt queries)
    alpha: float = 0.0  # elastic: recent = alpha + beta * prompt_len
    beta: float = 0.0


FULL = HeadSpec("full")


@dataclass(frozen=True)
class DynamicSpec:
    """Task-KV per request: the `ratio` of KV heads per layer farthest from the layer's
    semantic center stay full, the others get `rest` (a select spec)."""

    ratio: float
    rest: HeadSpec


@dataclass
class Plan:
    name: str
    model: ModelShape
    heads: list[list[HeadSpec]]  # [layers][kv_heads]; all FULL for a dynamic plan
    scores: list[list[float]] | None = None
    source: dict = field(default_factory=dict)
    dynamic: DynamicSpec | None = None


def full_plan(shape: ModelShape) -> Plan:
    return Plan("full", shape, [[FULL] * shape.kv_heads for _ in range(shape.layers)],
                source={"method": "full"})
