"""Sampling parameters: seeds, top-k, stop strings / tokens, max_tokens, penalties, errors."""

from __future__ import annotations

import pytest

from headwise.engine.errors import PromptTooLong, UnknownPlan
from headwise.engine.sampling_params import InvalidRequest, SamplingParams


@pytest.fixture(scope="module")
def prompt(tok):
    return tok("Write a short story about a dragon who")["input_ids"]


def test_seeded_sampling_is_reproducible(engine, prompt):
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    a = engine.generate([prompt], p)[0].token_ids
    # same seed in a batch with other requests gives the same tokens
    b = engine.generate([prompt, prompt], [p, SamplingParams(max_tokens=5, seed=7)])[0].token_ids
    c = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True))[
        0
    ].token_ids
    assert a == b
    assert a != c


def test_top_k_one_equals_greedy(engine, prompt):
    greedy = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    k1 = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=3, ignore_eos=True))[0]
    assert k1.token_ids == greedy.token_ids


def test_max_tokens_finishes_with_length(engine, prompt):
    out = engine.generate([prompt], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 7
    assert out.finish_reason == "length"


def test_stop_string_is_cut_from_text(engine, prompt):
    full = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].text
    word = full.split()[3]
    out = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0, stop=[word], ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == word
    assert out.text == full[: full.index(word)]


def test_stop_token_id_ends_generation(engine, prompt):
    greedy = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stop_tok = greedy.token_ids[5]
    out = engine.generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_tok], ignore_eos=True)
    )[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == greedy.token_ids[: greedy.token_ids.index(stop_tok) + 1]


def test_eos_stops_unless_ignored(engine):
    prompt = engine.encode_chat([{"role": "user", "content": "Say just the word yes."}])
    out = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in engine.eos_ids
    ignored = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert len(ignored.token_ids) == 40 and ignored.finish_reason == "length"


def _repeats(prompt: list[int], out: list[int]) -> int:
    """Output tokens that already occurred in the prompt or earlier output."""
    seen, n = set(prompt), 0
    for t in out:
        n += t in seen
        seen.add(t)
    return n


def test_repetition_penalty_reduces_repeats(engine, tok):
    prompt = tok("la la la la la la la la")["input_ids"]
    plain = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    pen = engine.generate(
        [prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=2.0)
    )[0]
    assert _repeats(prompt, pen.token_ids) < _repeats(prompt, plain.token_ids)


def test_frequency_penalty_discourages_repeats(engine, tok):
    prompt = tok("Repeat after me: apple apple apple apple")["input_ids"]
    base = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    pen = engine.generate(
        [prompt],
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=1.0),
    )[0]
    assert _repeats([], pen.token_ids) < _repeats([], base.token_ids)


def test_logprobs_top_alternatives(engine, prompt):
    out = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0, logprobs=3))[0]
    assert len(out.logprobs) == 4
    for tid, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tid and len(lp.top) == 3
        assert lp.top[0][0] == tid and lp.top[0][1] == pytest.approx(lp.logprob)  # greedy = best


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"logprobs": 50}, "logprobs"),
    ],
)
def test_invalid_params_name_the_field(kw, param):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kw)
    assert e.value.param == param


def test_request_errors(engine, prompt):
    with pytest.raises(UnknownPlan):
        engine.add_request("x1", prompt, SamplingParams(), plan="nope")
    with pytest.raises(PromptTooLong, match="maximum context length is 8192 tokens"):
        engine.add_request("x2", [1] * 8190, SamplingParams(max_tokens=10))
    with pytest.raises(InvalidRequest, match="empty"):
        engine.add_request("x3", [], SamplingParams())
    assert not engine.has_unfinished_requests()
