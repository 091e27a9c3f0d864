"""Compression plans: a budget kind for every (layer, kv_head) of one model
(docs/design.md, "Plans")."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

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
    return Plan("full", shape, [[FULL] * shape.kv_heads for _ in range(shape.layers)], source={"method": "full"})


# Fields each kind stores in JSON, in file order; the others keep HeadSpec defaults.
_KIND_FIELDS = {
    "full": (),
    "window": ("sink", "recent"),
    "elastic": ("sink", "alpha", "beta"),
    "select": ("sink", "recent", "select", "window"),
}
_INT_MIN = {"sink": 0, "recent": 0, "select": 0, "window": 1}
_MODEL_FIELDS = ("layers", "kv_heads", "heads", "head_dim")
_TOP_FIELDS = ("format", "name", "model", "source", "heads", "dynamic", "scores")

logger = logging.getLogger(__name__)


def plan_to_dict(plan: Plan) -> dict:
    """The JSON object of docs/design.md "Plans"; a dynamic plan stores `dynamic` instead of `heads`."""
    m = plan.model
    d: dict = {
        "format": FORMAT,
        "name": plan.name,
        "model": {"layers": m.layers, "kv_heads": m.kv_heads, "heads": m.heads, "head_dim": m.head_dim, "id": m.id},
        "source": dict(plan.source),
    }
    if plan.dynamic is not None:
        d["dynamic"] = {"ratio": plan.dynamic.ratio, "rest": _spec_to_dict(plan.dynamic.rest)}
    else:
        d["heads"] = [[_spec_to_dict(s) for s in row] for row in plan.heads]
    if plan.scores is not None:
        d["scores"] = [list(row) for row in plan.scores]
    return d


def plan_from_dict(d: object, shape: ModelShape | None = None) -> Plan:
    """Validate and build a plan; with `shape`, also check that it fits that model."""
    if not isinstance(d, dict):
        raise PlanError(f"plan: expected a JSON object, got {type(d).__name__}")
    for key in d:
        if key not in _TOP_FIELDS:
            raise PlanError(f"{key}: unknown field (expected {', '.join(_TOP_FIELDS)})")
    if d.get("format") != FORMAT:
        raise PlanError(f"format: expected {FORMAT!r}, got {d.get('format')!r}")
    name = _get(d, "name", "name")
    if not isinstance(name, str):
        raise PlanError(f"name: must be a string, got {name!r}")
    model = _model_from_dict(_get(d, "model", "model"))
    if shape is not None:
        check_shape(model, shape)
    source = d.get("source", {})
    if not isinstance(source, dict):
        raise PlanError(f"source: expected an object, got {source!r}")
    scores = d.get("scores")
    if scores is not None:
        scores = parse_scores(scores, model)
    if "dynamic" in d:
        if "heads" in d:
            raise PlanError("heads: a dynamic plan has no heads (its heads are chosen per request)")
        heads = [[FULL] * model.kv_heads for _ in range(model.layers)]
        return Plan(name, model, heads, scores, source, _dynamic_from_dict(d["dynamic"]))
    if "heads" not in d:
        raise PlanError('heads: missing (a plan needs "heads", or "dynamic" for a per-request plan)')
    rows = d["heads"]
    _check_rows(rows, "heads", model)
    heads = [[_spec_from_dict(s, f"heads[{i}][{j}]") for j, s in enumerate(row)] for i, row in enumerate(rows)]
    return Plan(name, model, heads, scores, source)


def check_shape(plan_model: ModelShape, model: ModelShape) -> None:
    """Refuse a plan made for another geometry; a different id alone only warns."""
    for f in _MODEL_FIELDS:
        want, got = getattr(plan_model, f), getattr(model, f)
        if want != got:
            raise PlanError(f"model.{f}: plan is for {want} {f.replace('_', ' ')}, model has {got}")
    if plan_model.id and model.id and plan_model.id != model.id:
        logger.warning("plan was made for model %r, using it for %r (same shape)", plan_model.id, model.id)


def save_plan(plan: Plan, path: str | Path) -> None:
    Path(path).write_text(_dumps(plan_to_dict(plan)))


def load_plan(path: str | Path, shape: ModelShape | None = None) -> Plan:
    """Read a plan file; errors are PlanError prefixed with the path (missing file: OSError)."""
    d = read_json(path)
    try:
        return plan_from_dict(d, shape)
    except PlanError as e:
        raise PlanError(f"{path}: {e}") from None


def load_plans(named: dict[str, str], shape: ModelShape) -> dict[str, Plan]:
    """`full` plus each NAME=PATH plan, validated against `shape` and renamed to NAME."""
    plans = {"full": full_plan(shape)}
    for name, path in named.items():
        plan = load_plan(path, shape)
        plan.name = name
        plans[name] = plan
    return plans


def read_json(path: str | Path) -> object:
    """A JSON file's value; malformed JSON is a one-line PlanError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise PlanError(f"{path}: not a text file") from None


def _dumps(d: dict) -> str:
    # One layer per line keeps a 32x8 plan readable and its diffs small.
    parts = []
    for key, value in d.items():
        if key in ("heads", "scores"):
            rows = ",\n  ".join(json.dumps(row) for row in value)
            parts.append(f"{json.dumps(key)}: [\n  {rows}]")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{" + ",\n ".join(parts) + "}\n"


def _get(d: dict, key: str, path: str) -> object:
    if key not in d:
        raise PlanError(f"{path}: missing")
    return d[key]


def _model_from_dict(m: object) -> ModelShape:
    if not isinstance(m, dict):
        raise PlanError(f"model: expected an object, got {m!r}")
    dims = {f: _int(_get(m, f, f"model.{f}"), f"model.{f}", 1) for f in _MODEL_FIELDS}
    if dims["heads"] % dims["kv_heads"]:
        raise PlanError(f"model.heads: must be a multiple of model.kv_heads ({dims['kv_heads']}), got {dims['heads']}")
    model_id = m.get("id", "")
    if not isinstance(model_id, str):
        raise PlanError(f"model.id: must be a string, got {model_id!r}")
    return ModelShape(**dims, id=model_id)


def _check_rows(rows: object, path: str, model: ModelShape) -> None:
    if not isinstance(rows, list):
        raise PlanError(f"{path}: expected a list of layers, got {rows!r}")
    if len(rows) != model.layers:
        raise PlanError(f"{path}: expected {model.layers} layers, got {len(rows)}")
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise PlanError(f"{path}[{i}]: expected a list of kv heads, got {row!r}")
        if len(row) != model.kv_heads:
            raise PlanError(f"{path}[{i}]: expected {model.kv_heads} kv heads, got {len(row)}")


def parse_scores(rows: object, model: ModelShape) -> list[list[float]]:
    """Check a [layers][kv_heads] score table (finite numbers) and return it as floats."""
    _check_rows(rows, "scores", model)
    assert isinstance(rows, list)  # _check_rows raised otherwise
    return [[_number(v, f"scores[{i}][{j}]") for j, v in enumerate(row)] for i, row in enumerate(rows)]


def _dynamic_from_dict(d: object) -> DynamicSpec:
    if not isinstance(d, dict):
        raise PlanError(f"dynamic: expected an object, got {d!r}")
    ratio = _number(_get(d, "ratio", "dynamic.ratio"), "dynamic.ratio")
    if not 0 <= ratio <= 1:
        raise PlanError(f"dynamic.ratio: must be a number in [0, 1], got {ratio!r}")
    rest = _spec_from_dict(_get(d, "rest", "dynamic.rest"), "dynamic.rest")
    if rest.kind != "select":
        raise PlanError(f"dynamic.rest.kind: must be 'select', got {rest.kind!r}")
    return DynamicSpec(ratio, rest)


def check_spec(spec: HeadSpec, path: str = "") -> None:
    """Refuse a head spec a plan file could not hold; `path` prefixes the field names."""
    _spec_from_dict(_spec_to_dict(spec), path)


def _spec_to_dict(spec: HeadSpec) -> dict:
    return {"kind": spec.kind, **{f: getattr(spec, f) for f in _KIND_FIELDS.get(spec.kind, ())}}


def _spec_from_dict(d: object, path: str) -> HeadSpec:
    if not isinstance(d, dict):
        raise PlanError(f"{path}: expected an object, got {d!r}")
    at = f"{path}." if path else ""
    kind = _get(d, "kind", f"{at}kind")
    if kind not in _KIND_FIELDS:
        raise PlanError(f"{at}kind: unknown kind {kind!r} (expected {', '.join(KINDS)})")
    fields = _KIND_FIELDS[kind]
    for key in d:
        if key != "kind" and key not in fields:
            allowed = ", ".join(fields) or "no other field"
            raise PlanError(f"{at}{key}: not a field of a {kind} head (expected {allowed})")
    values: dict = {}
    for f in fields:
        v = _get(d, f, f"{at}{f}")
        if f in _INT_MIN:
            values[f] = _int(v, f"{at}{f}", _INT_MIN[f])
        else:
            values[f] = _number(v, f"{at}{f}")
            if values[f] < 0:
                raise PlanError(f"{at}{f}: must be a number >= 0, got {v!r}")
    spec = HeadSpec(kind, **values)
    if kind != "full" and spec.sink + spec.recent + spec.select + spec.alpha + spec.beta == 0:
        raise PlanError(f"{path or kind}: a {kind} head must keep at least one token (all sizes are 0)")
    return spec


def _int(v: object, path: str, minimum: int) -> int:
    # bool is an int in Python but `true` is never a size in a plan file.
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise PlanError(f"{path}: must be an integer >= {minimum}, got {v!r}")
    return v


def _number(v: object, path: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise PlanError(f"{path}: must be a finite number, got {v!r}")
    return float(v)
