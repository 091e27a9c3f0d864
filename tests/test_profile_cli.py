"""`headwise profile` end to end on the default model (MoA and Duo on a tiny one in the default\nrun) at toy sizes, and its user errors."""

from __future__ import annotations

import json

import pytest

from headwise.clients.cli import main
from headwise.kvcache.plan_build import rethreshold
from headwise.kvcache.plans import load_plan
from tests.tiny_model import write_tiny_llama


def test_profile_retrieval_writes_a_plan_that_loads_and_rethresholds(tmp_path, capsys, engine):
    out = tmp_path / "r.json"
    assert main(["profile", "retrieval", "--out", str(out), "--lengths", "256", "--samples", "2", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("profile retrieval: 23 of 90 kv heads full, KV ") and "at 4096 tokens" in line
    plan = load_plan(out, engine.model_config.shape)
    assert plan.name == "retrieval-25" and plan.source["method"] == "retrieval"
    assert plan.source["params"]["tests"] == 2 and len(plan.source["params"]["query_scores"][0]) == 9
    kinds = {s.kind for row in plan.heads for s in row}
    assert kinds == {"full", "select"}
    assert sum(s.kind == "full" for row in rethreshold(plan, 0.1).heads for s in row) == 9


def test_profile_retrieval_is_deterministic(tmp_path):
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in outs:
        main(
            [
                "profile",
                "retrieval",
                "--out",
                str(out),
                "--lengths",
                "192",
                "--samples",
                "1",
                "--no-progress",
                "--rest",
                "window",
                "--seed",
                "3",
            ]
        )
    a, b = (json.loads(p.read_text()) for p in outs)
    assert a["scores"] == b["scores"] and a["heads"] == b["heads"]
    assert a["heads"][0][0] in ({"kind": "full"}, {"kind": "window", "sink": 64, "recent": 256})


def test_profile_taskkv_reads_a_jsonl_task(tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text(
        json.dumps({"prompt": "The grass is green. " * 30})
        + "\n"
        + json.dumps({"prompt_ids": list(range(100, 260))})
        + "\n"
    )
    out = tmp_path / "t.json"
    assert main(["profile", "taskkv", "--task", str(task), "--out", str(out), "--ratio", "0.1", "--no-progress"]) == 0
    assert "9 of 90 kv heads full" in capsys.readouterr().out
    plan = load_plan(out)
    assert plan.source["params"]["samples"] == 2 and plan.name == "taskkv-10"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["retrieval", "--ratio", "1.5"], "--ratio must be in [0, 1], got 1.5"),
        (["retrieval", "--lengths", "1024,x"], "--lengths '1024,x'"),
        (["retrieval", "--samples", "0"], "--samples must be >= 1, got 0"),
        (["retrieval", "--rest", "window", "--sink", "0", "--recent", "0"], "must keep at least one token"),
        (["moa", "--density", "0"], "--density must be in (0, 1], got 0.0"),
        (["duo", "--steps", "0"], "--steps must be >= 1, got 0"),
    ],
)
def test_profile_user_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main(["profile", *argv, "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_profile_taskkv_refuses_a_malformed_task(tmp_path, capsys):
    task = tmp_path / "bad.jsonl"
    task.write_text('{"text": "no prompt field"}\n')
    assert main(["profile", "taskkv", "--task", str(task), "--out", str(tmp_path / "p.json")]) == 2
    assert 'expected {"prompt": TEXT}' in capsys.readouterr().err


def _moa_and_duo(tmp_path, capsys, model: list[str], shape) -> int:
    """`profile moa` (text and needle data), `plan ratio` on its saved rule costs, and
    `profile duo` through the CLI on `model`; returns the full KV heads duo kept."""
    heads = shape.layers * shape.kv_heads
    moa = tmp_path / "moa.json"
    text_args = ["--data", "text", "--lengths", "256,512", "--profile-length", "256", "--generate", "16"]
    assert (
        main(
            ["profile", "moa", *model, "--out", str(moa), *text_args, "--samples", "1", "--sink", "16", "--no-progress"]
        )
        == 0
    )
    plan = load_plan(moa, shape)
    assert {s.kind for row in plan.heads for s in row} <= {"full", "elastic"}
    assert all(d <= 0.5 + 1e-6 for d in plan.source["params"]["mean_density"])
    assert all(len({(s.kind, s.alpha, s.beta) for s in row}) <= 2 for row in plan.heads)
    # `plan ratio` re-solves the MILP from the saved rule costs: the same bound gives the
    # same heads, a tighter one a plan within it
    again, tight = tmp_path / "again.json", tmp_path / "tight.json"
    assert main(["plan", "ratio", str(moa), "--ratio", "0.5", "--out", str(again)]) == 0
    assert load_plan(again, shape).heads == plan.heads
    # (at 256 / 512 tokens the sparsest rule keeps 0.34 of the entries)
    assert main(["plan", "ratio", str(moa), "--ratio", "0.4", "--out", str(tight)]) == 0
    tighter = load_plan(tight, shape)
    assert tighter.name == "moa-40" and tighter.heads != plan.heads
    assert all(d <= 0.4 + 1e-6 for d in tighter.source["params"]["mean_density"])
    assert tighter.source["params"]["cost"] > plan.source["params"]["cost"]
    needle = tmp_path / "needle.json"
    needle_args = ["--lengths", "512", "--profile-length", "512", "--samples", "1", "--sink", "16"]  # needle data
    assert main(["profile", "moa", *model, "--out", str(needle), *needle_args, "--no-progress"]) == 0
    plan = load_plan(needle, shape)
    assert plan.source["params"]["data"] == "needle" and len(plan.source["params"]["rule_costs"]) == heads
    duo = tmp_path / "duo.json"
    assert main(["profile", "duo", *model, "--out", str(duo), "--steps", "1", "--length", "256", "--no-progress"]) == 0
    plan = load_plan(duo, shape)
    full = sum(s.kind == "full" for row in plan.heads for s in row)
    assert plan.source["method"] == "duo" and 0 < full < heads
    assert all(0 <= g <= 1 for row in plan.scores for g in row)
    assert f"profile duo: {full} of {heads} kv heads full" in capsys.readouterr().out
    return full


def test_profile_moa_and_duo_write_valid_plans_on_a_tiny_model(tmp_path, capsys, make_engine):
    """The CLI path of both profilers at toy sizes on a tiny Llama with the default
    model's heads (the default model's run: the slow test below)."""
    model = write_tiny_llama(tmp_path / "tiny", heads=9, kv_heads=3)
    _moa_and_duo(tmp_path, capsys, ["--model", model], make_engine(model=model, kv_cache_mb=4).model_config.shape)


@pytest.mark.slow
def test_profile_moa_and_duo_write_valid_plans(tmp_path, capsys, engine):
    assert _moa_and_duo(tmp_path, capsys, [], engine.model_config.shape) == 23
