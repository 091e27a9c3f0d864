"""Plan files (schema, validation, round trip), builders, KV accounting and importers."""

from __future__ import annotations

import copy
import json
import logging
import random

import pytest

from headwise.kvcache.plan_build import (
    full_head_count,
    kv_bytes,
    kv_ratio,
    layer_kv_bytes,
    plan_from_scores,
    reduce_query_scores,
    rethreshold,
    streaming_plan,
)
from headwise.kvcache.plan_import import import_duo, import_moa, import_retrieval_head
from headwise.kvcache.plans import (
    FULL,
    DynamicSpec,
    HeadSpec,
    ModelShape,
    Plan,
    PlanError,
    full_plan,
    load_plan,
    plan_from_dict,
    plan_to_dict,
    save_plan,
)

SMOL = ModelShape(30, 3, 9, 64, "smollm2-135m")
WINDOW = HeadSpec("window", sink=64, recent=256)
SELECT = HeadSpec("select", sink=64, recent=256, select=256, window=32)
ELASTIC = HeadSpec("elastic", sink=64, alpha=1024.0, beta=0.125)


def mixed_plan() -> Plan:
    kinds = [FULL, WINDOW, ELASTIC, SELECT]
    heads = [[kinds[(i + j) % 4] for j in range(SMOL.kv_heads)] for i in range(SMOL.layers)]
    scores = [[round(0.01 * i + 0.1 * j, 3) for j in range(SMOL.kv_heads)] for i in range(SMOL.layers)]
    return Plan("mixed", SMOL, heads, scores, {"method": "test", "params": {"k": 1}, "created": "2026-01-01"})


def test_round_trip_keeps_every_kind_and_scores_exactly(tmp_path):
    plan = mixed_plan()
    assert plan_from_dict(plan_to_dict(plan), SMOL) == plan
    save_plan(plan, tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json", SMOL) == plan
    d = json.loads((tmp_path / "p.json").read_text())
    assert plan_to_dict(plan_from_dict(d)) == d
    assert d["heads"][0][1] == {"kind": "window", "sink": 64, "recent": 256}
    assert d["heads"][0][2] == {"kind": "elastic", "sink": 64, "alpha": 1024.0, "beta": 0.125}


def test_dynamic_plan_round_trips_without_heads(tmp_path):
    plan = Plan(
        "taskkv", SMOL, [[FULL] * 3 for _ in range(30)], source={"method": "taskkv"}, dynamic=DynamicSpec(0.25, SELECT)
    )
    d = plan_to_dict(plan)
    assert "heads" not in d and d["dynamic"] == {
        "ratio": 0.25,
        "rest": {"kind": "select", "sink": 64, "recent": 256, "select": 256, "window": 32},
    }
    save_plan(plan, tmp_path / "d.json")
    assert load_plan(tmp_path / "d.json") == plan


def _broken(edit) -> dict:
    d = copy.deepcopy(plan_to_dict(mixed_plan()))
    edit(d)
    return d


def _set(path, value):
    def edit(d):
        *parents, last = path
        for key in parents:
            d = d[key]
        d[last] = value

    return edit


def _dynamic_with(**dyn):
    def edit(d):
        d.pop("heads")
        d["dynamic"] = {
            "ratio": 0.25,
            "rest": {"kind": "select", "sink": 64, "recent": 256, "select": 256, "window": 32},
            **dyn,
        }

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            _set(["heads", 3, 1], {"kind": "window", "sink": 64, "recent": -5}),
            "heads[3][1].recent: must be an integer >= 0, got -5",
        ),
        (_set(["heads", 2], [{"kind": "full"}] * 2), "heads[2]: expected 3 kv heads, got 2"),
        (
            _set(["heads", 0, 0], {"kind": "foo"}),
            "heads[0][0].kind: unknown kind 'foo' (expected full, window, elastic, select)",
        ),
        (lambda d: d.pop("heads"), 'heads: missing (a plan needs "heads", or "dynamic" for a per-request plan)'),
        (_set(["format"], "headwise-plan/2"), "format: expected 'headwise-plan/1', got 'headwise-plan/2'"),
        (lambda d: d["heads"].pop(), "heads: expected 30 layers, got 29"),
        (_set(["heads", 1, 2], {"kind": "window", "recent": 256}), "heads[1][2].sink: missing"),
        (
            _set(["heads", 0, 1], {"kind": "window", "sink": 4, "recent": 8, "select": 2}),
            "heads[0][1].select: not a field of a window head (expected sink, recent)",
        ),
        (
            _set(["heads", 0, 0], {"kind": "elastic", "sink": 4, "alpha": -1, "beta": 0.5}),
            "heads[0][0].alpha: must be a number >= 0, got -1",
        ),
        (
            _set(["heads", 0, 0], {"kind": "select", "sink": 4, "recent": 8, "select": 8, "window": 0}),
            "heads[0][0].window: must be an integer >= 1, got 0",
        ),
        (
            _set(["heads", 0, 0], {"kind": "window", "sink": 4, "recent": True}),
            "heads[0][0].recent: must be an integer >= 0, got True",
        ),
        (
            _set(["heads", 0, 1], {"kind": "window", "sink": 0, "recent": 0}),
            "heads[0][1]: a window head must keep at least one token (all sizes are 0)",
        ),
        (_set(["heads", 5, 0], "full"), "heads[5][0]: expected an object, got 'full'"),
        (_set(["scores", 4], [0.1, 0.2]), "scores[4]: expected 3 kv heads, got 2"),
        (_set(["scores", 0, 0], "x"), "scores[0][0]: must be a finite number, got 'x'"),
        (_set(["model", "heads"], 8), "model.heads: must be a multiple of model.kv_heads (3), got 8"),
        (_set(["model", "layers"], 0), "model.layers: must be an integer >= 1, got 0"),
        (_set(["name"], 3), "name: must be a string, got 3"),
        (_set(["heeds"], []), "heeds: unknown field (expected format, name, model, source, heads, dynamic, scores)"),
        (_dynamic_with(ratio=1.5), "dynamic.ratio: must be a number in [0, 1], got 1.5"),
        (
            _dynamic_with(rest={"kind": "window", "sink": 4, "recent": 8}),
            "dynamic.rest.kind: must be 'select', got 'window'",
        ),
        (
            lambda d: d.update(dynamic={"ratio": 0.5, "rest": d["heads"][0][0]}),
            "heads: a dynamic plan has no heads (its heads are chosen per request)",
        ),
    ],
)
def test_malformed_plan_is_refused_naming_the_field(edit, message):
    with pytest.raises(PlanError) as e:
        plan_from_dict(_broken(edit))
    assert str(e.value) == message


@pytest.mark.parametrize(
    "model, message",
    [
        (ModelShape(24, 3, 9, 64), "model.layers: plan is for 30 layers, model has 24"),
        (ModelShape(30, 2, 9, 64), "model.kv_heads: plan is for 3 kv heads, model has 2"),
        (ModelShape(30, 3, 6, 64), "model.heads: plan is for 9 heads, model has 6"),
        (ModelShape(30, 3, 9, 128), "model.head_dim: plan is for 64 head dim, model has 128"),
    ],
)
def test_plan_for_another_shape_is_refused(model, message):
    with pytest.raises(PlanError) as e:
        plan_from_dict(plan_to_dict(mixed_plan()), model)
    assert str(e.value) == message


def test_other_model_id_with_same_shape_only_warns(caplog):
    with caplog.at_level(logging.WARNING):
        plan = plan_from_dict(plan_to_dict(mixed_plan()), ModelShape(30, 3, 9, 64, "my-finetune"))
    assert plan.model.id == "smollm2-135m"
    assert "'smollm2-135m'" in caplog.text and "'my-finetune'" in caplog.text


def test_load_errors_are_one_line_and_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json\n\n")
    with pytest.raises(PlanError, match=r"^.*bad\.json: not valid JSON \(line 1 column 2: .*\)$"):
        load_plan(bad)
    bad.write_text(json.dumps(_broken(_set(["format"], "x"))))
    with pytest.raises(PlanError) as e:
        load_plan(bad)
    assert str(e.value) == f"{bad}: format: expected 'headwise-plan/1', got 'x'"
    with pytest.raises(FileNotFoundError):
        load_plan(tmp_path / "missing.json")


def test_full_head_count_rounds_half_up():
    assert [full_head_count(r, 90) for r in (0.0, 0.25, 0.5, 1.0)] == [0, 23, 45, 90]
    assert full_head_count(0.35, 10) == 4  # 0.35 * 10 == 3.4999999999999996 in floats
    with pytest.raises(PlanError, match=r"ratio: must be a number in \[0, 1\], got 1.5"):
        full_head_count(1.5, 10)


def test_streaming_plan_gives_every_head_the_window():
    plan = streaming_plan(SMOL, 4, 128)
    assert plan.name == "streaming-4-128" and plan.source["method"] == "streaming"
    assert {s for row in plan.heads for s in row} == {HeadSpec("window", sink=4, recent=128)}
    with pytest.raises(PlanError, match=r"^recent: must be an integer >= 0, got -1$"):
        streaming_plan(SMOL, 4, -1)


def test_plan_from_scores_keeps_top_heads_and_breaks_ties_by_position():
    shape = ModelShape(2, 3, 3, 8)
    scores = [[0.5, 0.9, 0.5], [0.5, 0.1, 0.7]]
    plan = plan_from_scores(shape, scores, 0.5, WINDOW, "s")  # 3 of 6 full: 0.9, 0.7, first 0.5
    assert [[s.kind[0] for s in row] for row in plan.heads] == [["f", "f", "w"], ["w", "w", "f"]]
    assert plan.scores == scores and plan.source["params"]["ratio"] == 0.5
    with pytest.raises(PlanError, match=r"^scores\[1\]: expected 3 kv heads, got 2$"):
        plan_from_scores(shape, [[0.1] * 3, [0.1] * 2], 0.5, WINDOW, "s")


def test_rethreshold_keeps_exactly_the_rounded_count_of_highest_scores():
    rng = random.Random(7)
    scores = [[rng.random() for _ in range(3)] for _ in range(30)]
    plan = plan_from_scores(SMOL, scores, 0.5, WINDOW, "r", {"method": "retrieval", "params": {}})
    for ratio in (0.0, 0.1, 0.25, 0.33, 0.9, 1.0):
        again = rethreshold(plan, ratio)
        full = sorted(scores[i][j] for i in range(30) for j in range(3) if again.heads[i][j].kind == "full")
        rest = [scores[i][j] for i in range(30) for j in range(3) if again.heads[i][j] == WINDOW]
        assert len(full) == full_head_count(ratio, 90) and len(full) + len(rest) == 90
        assert not full or not rest or full[0] > max(rest)
        assert again.source["params"]["ratio"] == ratio and again.scores == plan.scores


def test_rethreshold_needs_scores_and_one_non_full_spec():
    with pytest.raises(PlanError, match="^plan 'streaming-64-256' has no scores to re-threshold"):
        rethreshold(streaming_plan(SMOL, 64, 256), 0.5)
    with pytest.raises(PlanError, match="has 3 different non-full head specs; re-thresholding needs exactly one"):
        rethreshold(mixed_plan(), 0.5)


def test_rethreshold_of_dynamic_plan_sets_its_ratio():
    plan = Plan("t", SMOL, [[FULL] * 3] * 30, source={"method": "taskkv"}, dynamic=DynamicSpec(0.25, SELECT))
    assert rethreshold(plan, 0.5).dynamic == DynamicSpec(0.5, SELECT)


def test_reduce_query_scores_takes_group_max():
    q = [[0.1, 0.7, 0.3, 0.2, 0.2, 0.2, 0.9, 0.0, 0.5], [0.0] * 9]
    assert reduce_query_scores(q, 3) == [[0.7, 0.2, 0.9], [0.0, 0.0, 0.0]]
    assert reduce_query_scores(q, 9) == q
    with pytest.raises(PlanError, match=r"^scores\[0\]: 9 query heads do not split into 2 kv heads$"):
        reduce_query_scores(q, 2)


def test_kv_bytes_rounds_each_head_to_blocks():
    shape = ModelShape(2, 2, 4, 8)
    heads = [
        [FULL, HeadSpec("window", sink=4, recent=20)],
        [HeadSpec("elastic", sink=4, alpha=10.0, beta=0.5), HeadSpec("select", sink=4, recent=8, select=8)],
    ]
    plan = Plan("k", shape, heads)
    # slots: full 100 -> 112; window 24 -> 32; elastic 4 + (10 + 0.5 * 40) = 34 -> 48; select 20 -> 32
    assert layer_kv_bytes(plan, 100, prompt_len=40, dtype_bytes=2) == [144 * 32, 80 * 32]
    assert kv_bytes(plan, 100, prompt_len=40, dtype_bytes=2) == 224 * 2 * 8 * 2 == 7168
    assert kv_bytes(full_plan(shape), 100, dtype_bytes=2) == 448 * 32
    assert kv_ratio(plan, 100, prompt_len=40) == 0.5
    assert kv_bytes(plan, 10, block_size=4) == (12 + 12 + 12 + 12) * 2 * 8 * 4  # all clamp to 10 -> 12


def test_kv_bytes_of_dynamic_plan_counts_ratio_full_per_layer():
    plan = Plan(
        "d",
        ModelShape(2, 2, 4, 8),
        [[FULL] * 2] * 2,
        dynamic=DynamicSpec(0.5, HeadSpec("select", sink=4, recent=8, select=8, window=2)),
    )
    assert kv_bytes(plan, 100, dtype_bytes=2) == 2 * (112 + 32) * 2 * 8 * 2


def _write_duo(path, rows):
    path.write_text("".join("\t".join(str(g) for g in row) + "\n" for row in rows))


def test_import_duo_keeps_top_gates_full(tmp_path):
    gates = [[round((i * 3 + j) * 0.011, 3) for j in range(3)] for i in range(30)]
    _write_duo(tmp_path / "full_attention_heads.tsv", gates)
    plan = import_duo(tmp_path / "full_attention_heads.tsv", SMOL)
    full = {(i, j) for i in range(30) for j in range(3) if plan.heads[i][j].kind == "full"}
    assert full == {divmod(n, 3) for n in range(45, 90)}  # GQA default: the top half
    assert {plan.heads[i][j] for i in range(30) for j in range(3) if (i, j) not in full} == {WINDOW}
    assert plan.scores == gates and plan.name == "duo-50" and plan.source["method"] == "duo"
    mha = import_duo(tmp_path / "full_attention_heads.tsv", ModelShape(30, 3, 3, 64), sink=8, recent=32)
    assert sum(s.kind == "full" for row in mha.heads for s in row) == 23  # MHA default 0.25
    assert mha.heads[0][0] == HeadSpec("window", sink=8, recent=32)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([[0.5] * 3] * 29, "gates for 29 layers, model has 30"),
        ([[0.5] * 3] * 2 + [[0.5] * 2] + [[0.5] * 3] * 27, "line 3: expected 3 kv heads, got 2"),
        ([[0.5, 1.5, 0.5]] * 30, "line 1: gate 1.5 is outside [0, 1]"),
        ([[0.5, "x", 0.5]] * 30, "line 1: 'x' is not a number"),
    ],
)
def test_import_duo_refuses_bad_files(tmp_path, rows, message):
    _write_duo(tmp_path / "g.tsv", rows)
    with pytest.raises(PlanError) as e:
        import_duo(tmp_path / "g.tsv", SMOL)
    assert str(e.value) == f"{tmp_path / 'g.tsv'}: {message}"


def _retrieval_scores(layers=30, heads=9):
    return {f"{i}-{h}": [0.0, 0.0] for i in range(layers) for h in range(heads)}


def test_import_retrieval_head_averages_and_reduces_by_group_max(tmp_path):
    d = _retrieval_scores()
    d["2-4"] = [0.5, 1.0, 0.0]  # mean 0.5 -> kv head 1 of layer 2
    d["2-5"] = [0.25]  # same group, lower
    d["7-0"] = []  # never scored: 0
    d["29-8"] = [0.9, 0.8]  # mean 0.85 -> kv head 2 of layer 29
    (tmp_path / "r.json").write_text(json.dumps(d))
    plan = import_retrieval_head(tmp_path / "r.json", SMOL, ratio=2 / 90)
    assert plan.scores[2] == [0.0, 0.5, 0.0] and plan.scores[29][2] == pytest.approx(0.85)
    full = [(i, j) for i in range(30) for j in range(3) if plan.heads[i][j].kind == "full"]
    assert full == [(2, 1), (29, 2)]
    default = import_retrieval_head(tmp_path / "r.json", SMOL)
    assert default.name == "retrieval-25" and sum(s.kind == "full" for r in default.heads for s in r) == 23


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update({"3_1": [0.1]}), 'key \'3_1\': expected "layer-head" such as "12-3"'),
        (lambda d: d.update({"30-0": [0.1]}), "key '30-0': outside the model's 30 layers x 9 heads"),
        (lambda d: d.update({"3-1": 0.5}), "3-1: expected a list of scores, got 0.5"),
        (lambda d: [d.pop(f"{i}-8") for i in range(30)], "scores cover 30 layers x 8 heads, model has 30 x 9"),
    ],
)
def test_import_retrieval_head_refuses_bad_files(tmp_path, edit, message):
    d = _retrieval_scores()
    edit(d)
    (tmp_path / "r.json").write_text(json.dumps(d))
    with pytest.raises(PlanError) as e:
        import_retrieval_head(tmp_path / "r.json", SMOL)
    assert str(e.value) == f"{tmp_path / 'r.json'}: {message}"


def test_import_moa_builds_elastic_heads_reducing_query_heads_by_max(tmp_path):
    shape = ModelShape(2, 2, 4, 8)
    moa = {"alphas": [[1024, 0, 2048, 1024], [0, 0]], "betas": [[0.125, 0.5, 0.0, 0.25], [1.0, 0.25]]}
    (tmp_path / "moa.json").write_text(json.dumps(moa))
    plan = import_moa(tmp_path / "moa.json", shape)
    assert plan.heads == [
        [HeadSpec("elastic", sink=64, alpha=1024.0, beta=0.5), HeadSpec("elastic", sink=64, alpha=2048.0, beta=0.25)],
        [HeadSpec("elastic", sink=64, alpha=0.0, beta=1.0), HeadSpec("elastic", sink=64, alpha=0.0, beta=0.25)],
    ]
    assert plan.scores is None and plan.name == "moa"
    save_plan(plan, tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json", shape) == plan


@pytest.mark.parametrize(
    "moa, message",
    [
        ({"alphas": [[0, 0]], "betas": [[0, 0]] * 2}, "alphas: 1 layers, model has 2"),
        ({"alphas": [[0, 0]] * 2, "betas": [[0, 0, 0]] * 2}, "betas[0]: expected 2 kv heads or 4 heads, got 3"),
        ({"alphas": [[0, -1]] * 2, "betas": [[0, 0]] * 2}, "alphas[0]: values must be >= 0, got -1.0"),
        ({"betas": [[0, 0]] * 2}, "alphas: expected a list of layers, got None"),
    ],
)
def test_import_moa_refuses_bad_files(tmp_path, moa, message):
    (tmp_path / "moa.json").write_text(json.dumps(moa))
    with pytest.raises(PlanError) as e:
        import_moa(tmp_path / "moa.json", ModelShape(2, 2, 4, 8))
    assert str(e.value) == f"{tmp_path / 'moa.json'}: {message}"
