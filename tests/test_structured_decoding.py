"""Constrained decoding in the engine (real model): outputs that validate under preemption,
n choices, prefix-cache hits and a window plan; unconstrained rows of a mixed batch exactly as
alone; a grammar still compiling does not hold up the requests behind it."""

from __future__ import annotations

import json
from concurrent.futures import Future

import jsonschema
import pytest

from headwise.engine.grammar_spec import GrammarSpec, json_schema_spec
from headwise.engine.loader import model_id, read_config, resolve_model_dir
from headwise.engine.sampling_params import InvalidRequest, SamplingParams
from headwise.kvcache.plan_build import streaming_plan
from headwise.kvcache.plans import save_plan
from tests.tiny_model import run_to_end

MODEL = "smollm2-135m"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", None]},
    },
    "required": ["name", "age", "pet"],
}
QUESTIONS = ["Describe a person as JSON.", "Who is your best friend? Answer in JSON.", "Make up a character."]


def _constrained(temperature: float = 0.0, seed: int | None = None) -> SamplingParams:
    return SamplingParams(
        max_tokens=40, temperature=temperature, seed=seed, grammar=json_schema_spec(SCHEMA, "response_format")
    )


def _validate(out) -> None:
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), SCHEMA)


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


def test_unconstrained_rows_of_a_mixed_batch_are_as_alone(engine, prompts):
    free = [SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=12, temperature=0.9, seed=7)]
    alone = [engine.generate([prompts[0]], p)[0].token_ids for p in free]
    mixed = engine.generate(
        [prompts[0], prompts[1], prompts[0], prompts[2]], [free[0], _constrained(), free[1], _constrained(0.8, 3)]
    )
    assert [mixed[0].token_ids, mixed[2].token_ids] == alone
    _validate(mixed[1])
    _validate(mixed[3])


def test_outputs_validate_under_preemption_prefix_hits_n_choices_and_a_window_plan(make_engine, prompts, tmp_path):
    shape = read_config(resolve_model_dir(MODEL), model_id(MODEL)).shape
    save_plan(streaming_plan(shape, sink=4, recent=16, name="window"), tmp_path / "window.json")
    roomy = make_engine(enable_prefix_caching=True, plans={"window": str(tmp_path / "window.json")})
    tight = make_engine(
        enable_prefix_caching=True,
        plans={"window": str(tmp_path / "window.json")},
        kv_cache_mb=None,
        num_blocks=700,
    )
    # three choices of each prompt (one seeded draw each, as the server's n), every other one on the window plan
    jobs = [(p, _constrained(0.7, 10 + c), "window" if c % 2 else None) for p in prompts for c in range(3)]
    runs = []
    for eng in (roomy, tight):
        for i, (p, sp, plan) in enumerate(jobs):
            eng.add_request(f"r{i}", p, sp, plan)
        runs.append(run_to_end(eng))
    assert tight.stats().num_preemptions > 0
    assert tight.stats().prefix_cache_hits > 0
    for i in range(len(jobs)):
        _validate(runs[1][f"r{i}"])
        assert runs[1][f"r{i}"].token_ids == runs[0][f"r{i}"].token_ids  # preemption changed nothing
    assert tight.block_census()["held"] == 0


def test_a_compiling_grammar_waits_without_holding_up_the_requests_behind_it(engine, prompts, monkeypatch):
    pending: Future = Future()
    real = engine.grammars.compile
    monkeypatch.setattr(engine.grammars, "compile", lambda spec: pending)
    engine.add_request("slow", prompts[0], _constrained())
    monkeypatch.setattr(engine.grammars, "compile", real)
    engine.add_request("free", prompts[1], SamplingParams(max_tokens=4, temperature=0))
    done = {}
    while "free" not in done:
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.stats().num_waiting == 1 and "slow" not in done
    pending.set_result(real(json_schema_spec(SCHEMA, "response_format")).result())
    done = run_to_end(engine)
    _validate(done["slow"])


def test_a_grammar_that_does_not_compile_fails_its_request_only(engine, prompts):
    engine.add_request("bad", prompts[0], SamplingParams(max_tokens=4, grammar=GrammarSpec("regex", "[a-", "x")))
    engine.add_request("good", prompts[0], SamplingParams(max_tokens=4, temperature=0))
    done = run_to_end(engine)
    assert done["bad"].finish_reason == "error"
    assert "x does not compile" in done["bad"].error and "Unclosed '['" in done["bad"].error
    assert done["good"].finish_reason == "length" and len(done["good"].token_ids) == 4


def test_choice_and_regex_grammars_end_with_stop_and_max_tokens_cuts_with_length(engine, prompts):
    choice, regex, cut = engine.generate(
        [prompts[0]] * 3,
        [
            SamplingParams(max_tokens=10, temperature=1.0, seed=1, grammar=GrammarSpec("choice", '["alpha", "beta"]')),
            SamplingParams(max_tokens=10, temperature=1.0, seed=2, grammar=GrammarSpec("regex", "[0-9]{4}")),
            SamplingParams(max_tokens=3, temperature=0, grammar=GrammarSpec("regex", "[a-z]{30}")),
        ],
    )
    assert choice.text in {"alpha", "beta"} and choice.finish_reason == "stop"
    assert len(regex.text) == 4 and regex.text.isdigit() and regex.finish_reason == "stop"
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3


def test_logit_bias_ids_are_checked_against_the_vocabulary(engine, prompts):
    with pytest.raises(InvalidRequest, match=r"logit_bias token ids must be in \[0, 49152\)") as info:
        engine.add_request("b", prompts[0], SamplingParams(logit_bias={49152: 1.0}))
    assert info.value.param == "logit_bias"
    with pytest.raises(InvalidRequest, match=r"logit_bias values must be in \[-100, 100\]"):
        SamplingParams(logit_bias={3: 101.0})


def test_a_grammar_ends_the_output_at_eos_even_with_ignore_eos(engine, prompts):
    out = engine.generate(
        [prompts[0]],
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, grammar=GrammarSpec("choice", '["ok"]')),
    )[0]
    assert (out.text, out.finish_reason) == ("ok", "stop")
    with pytest.raises(InvalidRequest, match="min_tokens .* cannot be combined with a grammar"):
        SamplingParams(min_tokens=3, grammar=GrammarSpec("regex", "a+"))
