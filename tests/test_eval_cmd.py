"""`headwise eval`: aggregation on a stub engine, then end to end on the real default model."""

from __future__ import annotations

import json
import math
import re
import time

import pytest

from headwise.clients.commands.eval import parse_lengths, parse_tasks
from headwise.clients.eval.harness import Row, evaluate, format_table, summarize
from headwise.engine.loader import load_tokenizer, resolve_model_dir
from headwise.engine.outputs import RequestOutput, TokenLogprob


@pytest.fixture(scope="module")
def tok():
    """The default model's tokenizer alone, without its weights."""
    return load_tokenizer(resolve_model_dir("smollm2-135m"))


class StubEngine:
    """`full` answers the passkey and scores logprob -1 per token; `half` gets half the answer
    tokens right, answers nothing, scores -2 per token and holds a quarter of the KV."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.plans = {"half": None, "full": None}
        self.calls: list[tuple[int, list[str]]] = []

    def generate(self, prompts, params, plans=None, use_tqdm=False):
        self.calls.append((len(prompts), list(plans)))
        outs = []
        for i, (ids, p, plan) in enumerate(zip(prompts, params, plans)):
            full = plan == "full"
            key = re.search(r"The pass key is (\d{5})", self.tokenizer.decode(ids))
            text = key.group(1) if key and full else ""
            lps = None
            if p.prompt_logprobs is not None:
                # full predicts every next token, half none of them
                lps = [None] + [TokenLogprob(t, -1.0 if full else -2.0, [(t if full else -1, -1.0)]) for t in ids[1:]]
            outs.append(
                RequestOutput(
                    str(i),
                    ids,
                    [1, 2, 3, 4] if full else [1, 2, 9, 9],
                    text,
                    True,
                    "length",
                    4000 if full else 1000,
                    plan,
                    prompt_logprobs=lps,
                    kv_bytes_decode=2000 if full else 200,
                )
            )
        return outs


def test_rows_score_agree_and_compare_kv_with_full(tok):
    engine = StubEngine(tok)
    rows = evaluate(engine, ["passkey", "ppl"], [256], 2, seed=0, progress=False)
    got = {(r.plan, r.task): r for r in rows}
    assert [(r.plan, r.task) for r in rows] == [
        ("full", "passkey"),
        ("half", "passkey"),
        ("full", "ppl"),
        ("half", "ppl"),
    ]
    assert got["full", "passkey"] == Row("full", "passkey", 256, 2, 1.0, 1.0, 4000, 1.0, 2000, 1.0)
    assert got["half", "passkey"] == Row("half", "passkey", 256, 2, 0.0, 0.5, 1000, 0.25, 200, 0.1)
    assert got["full", "ppl"].score == pytest.approx(math.e)
    assert got["half", "ppl"].score == pytest.approx(math.e**2)
    assert got["full", "ppl"].agreement == 1.0 and got["half", "ppl"].agreement == 0.0
    # one batched engine call per (task, length), every plan in it
    assert engine.calls == [(4, ["full", "full", "half", "half"])] * 2
    table = format_table(rows)
    assert "passkey" in table and "0.250" in table and "7.39" in table
    assert summarize(rows, 1.0).startswith("eval: 8 requests in 2 task/length groups")


def test_bad_task_and_length_lists_are_refused_by_name():
    assert parse_tasks("vt, passkey,vt") == ["vt", "passkey"]
    assert parse_lengths("1024,256") == [1024, 256]
    with pytest.raises(ValueError, match="unknown task needle"):
        parse_tasks("passkey,needle")
    with pytest.raises(ValueError, match="'1k'"):
        parse_lengths("1k")
    with pytest.raises(ValueError, match="positive"):
        parse_lengths("0")


def test_eval_command_runs_full_and_a_plan_through_the_engine(tmp_path, capsys):
    from headwise.clients.cli import main
    from headwise.engine.loader import model_shape
    from headwise.kvcache.plan_build import streaming_plan
    from headwise.kvcache.plans import save_plan

    plan = tmp_path / "stream.json"
    save_plan(streaming_plan(model_shape("smollm2-135m"), sink=4, recent=32), plan)
    out = tmp_path / "eval.json"
    start = time.perf_counter()
    rc = main(
        [
            "eval",
            "--lengths",
            "256",
            "--samples",
            "2",
            "--tasks",
            "passkey,ppl",
            "--kv-cache-mb",
            "64",
            "--no-shipped-plans",
            "--plan",
            f"stream={plan}",
            "--json",
            str(out),
        ]
    )
    elapsed = time.perf_counter() - start
    assert rc == 0
    report = json.loads(out.read_text())
    rows = {(r["plan"], r["task"]): r for r in report["rows"]}
    assert sorted(rows) == [("full", "passkey"), ("full", "ppl"), ("stream", "passkey"), ("stream", "ppl")]
    for r in report["rows"]:
        assert set(r) == {
            "plan",
            "task",
            "length",
            "samples",
            "score",
            "agreement",
            "kv_bytes",
            "kv_ratio",
            "kv_bytes_decode",
            "kv_ratio_decode",
            "kv_cache_dtype",
        }
        assert r["length"] == 256 and r["samples"] == 2 and r["kv_bytes"] > 0
    assert rows["full", "passkey"]["kv_ratio"] == 1.0 and rows["full", "ppl"]["kv_ratio"] == 1.0
    assert rows["full", "passkey"]["agreement"] == 1.0
    assert rows["stream", "passkey"]["kv_ratio"] < 0.5  # 36 of 256+ slots per head, in 16-slot blocks
    assert rows["stream", "passkey"]["kv_ratio_decode"] == rows["stream", "passkey"]["kv_ratio"]
    assert 1.0 < rows["full", "ppl"]["score"] < 100.0
    assert 0.0 <= rows["full", "passkey"]["score"] <= 1.0
    assert report["config"]["tasks"] == ["passkey", "ppl"] and report["config"]["seed"] == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("eval: 8 requests in 2 task/length groups")
    print(f"eval end to end: {elapsed:.1f} s")
