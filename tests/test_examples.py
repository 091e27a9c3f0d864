"""The example inputs hold what examples/README.md says: the files made from the shipped
plans still carry those plans' data and import back to the same full heads."""

from __future__ import annotations

import json
from pathlib import Path

from headwise.kvcache.moa_rules import ALPHAS, BETAS
from headwise.kvcache.plan_import import import_duo, import_moa, import_retrieval_head
from headwise.kvcache.plans import ModelShape, Plan, load_plan
from headwise.kvcache.shipped_plans import shipped_plans

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHAPE = ModelShape(30, 3, 9, 64, "smollm2-135m")
PLANS = shipped_plans("smollm2-135m")


def full_heads(plan: Plan) -> list[tuple[int, int]]:
    return [(i, j) for i, row in enumerate(plan.heads) for j, s in enumerate(row) if s.kind == "full"]


def test_scores_json_holds_the_shipped_retrieval_plans_scores():
    q_scores = json.loads(Path(PLANS["retrieval-20"]).read_text())["source"]["params"]["query_scores"]
    scores = json.loads((EXAMPLES / "scores.json").read_text())
    assert scores == {f"{i}-{h}": [v] for i, row in enumerate(q_scores) for h, v in enumerate(row)}
    imported = import_retrieval_head(EXAMPLES / "scores.json", SHAPE, ratio=0.2)
    assert len(full_heads(imported)) == 18
    assert full_heads(imported) == full_heads(load_plan(PLANS["retrieval-20"], SHAPE))


def test_duo_tsv_holds_the_shipped_duo_plans_gates():
    rows = [
        [float(g) for g in line.split("\t")]
        for line in (EXAMPLES / "full_attention_heads.tsv").read_text().splitlines()
    ]
    shipped = load_plan(PLANS["duo-10"], SHAPE)
    assert rows == shipped.scores
    imported = import_duo(EXAMPLES / "full_attention_heads.tsv", SHAPE, ratio=0.1)
    assert len(full_heads(imported)) == 9 and full_heads(imported) == full_heads(shipped)


def test_moa_json_holds_rules_on_moas_grid_per_kv_head():
    d = json.loads((EXAMPLES / "moa.json").read_text())
    assert set(d) == {"alphas", "betas"}
    assert [len(d["alphas"]), len(d["alphas"][0]), len(d["betas"]), len(d["betas"][0])] == [30, 3, 30, 3]
    rules = {(a, b) for ra, rb in zip(d["alphas"], d["betas"]) for a, b in zip(ra, rb)}
    # a full head is MoA's (0, 1): a span of the whole prompt
    assert all(a in ALPHAS and b in BETAS for a, b in rules) and (0, 1) in rules
    plan = import_moa(EXAMPLES / "moa.json", SHAPE)
    assert {s.kind for row in plan.heads for s in row} == {"elastic"}


def test_task_jsonl_holds_passkey_and_needle_prompts_with_their_answers():
    lines = [json.loads(line) for line in (EXAMPLES / "task.jsonl").read_text().splitlines()]
    assert [d["task"] for d in lines] == ["passkey"] * 4 + ["niah_single"] * 4
    for d in lines:
        assert len(d["expected"]) == 1 and d["expected"][0] in d["prompt"]
