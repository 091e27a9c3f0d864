"""The batched sampler. On the tiny random Llama, seeded draws are pinned to the tokens the
per-row host sampler produced (engine/sampler.py before batching), so a request's seed
keeps giving the same tokens whatever the implementation; then each knob on small logits."""

from __future__ import annotations

import pytest
import torch

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.engine.sampler import Sampler
from headwise.engine.sampling_params import InvalidRequest
from headwise.engine.sampling_params import SamplingParams as SP
from headwise.engine.sequence import Sequence
from tests.sampler_cases import mixed_batch, per_row_sample
from tests.tiny_model import random_prompts, write_tiny_llama

# the tiny model's logits have std ~20, so temperatures of 15-40 make every draw matter
PARAMS = [
    SP(max_tokens=12, temperature=20.0, top_p=0.9, seed=11, ignore_eos=True),
    SP(max_tokens=12, temperature=30.0, top_k=20, seed=5, ignore_eos=True),
    SP(
        max_tokens=12,
        temperature=25.0,
        min_p=0.05,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.7,
        min_tokens=4,
        stop_token_ids=[5],
        seed=7,
        logprobs=2,
    ),
    SP(max_tokens=12, temperature=15.0, top_k=50, top_p=0.8, min_p=0.01, seed=99, ignore_eos=True),
    SP(max_tokens=12, temperature=0, logprobs=1, ignore_eos=True),
    SP(max_tokens=12, temperature=40.0, seed=123, ignore_eos=True),
]
PINNED = [
    [96, 9, 269, 398, 172, 419, 74, 34, 303, 223, 260, 458],
    [424, 423, 307, 8, 18, 71, 28, 424, 321, 277, 38, 434],
    [200, 179, 260, 197, 458, 170, 501, 42, 487, 307, 244, 455],
    [98, 281, 356, 168, 124, 281, 474, 474, 259, 98, 474, 474],
    [307, 90, 90, 307, 307, 90, 90, 90, 90, 90, 90, 90],
    [292, 277, 423, 70, 214, 174, 333, 474, 172, 10, 489, 133],
]
# row 2's raw log-probabilities (before penalties and temperature) and top-2 alternatives
PINNED_LOGPROBS = [
    -58.3947,
    -46.7299,
    -41.8992,
    -44.7182,
    -68.5476,
    -36.2929,
    -58.1826,
    -65.1717,
    -38.9953,
    -43.54,
    -44.1123,
    -7.7268,
]
PINNED_TOP = [(232, -0.7374), (108, -0.8939)]
PINNED_GREEDY_LOGPROBS = [
    -0.0125,
    -0.5167,
    -0.4616,
    -0.4958,
    -0.2477,
    -0.6177,
    -0.0073,
    -0.0124,
    -0.0165,
    -0.0136,
    -0.0074,
    -0.004,
]
LOGPROB_ATOL = 1e-3  # fp32; the pinned values are rounded to 1e-4


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    return LLMEngine(EngineConfig(model=write_tiny_llama(tmp_path_factory.mktemp("tiny")), kv_cache_mb=16))


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(len(PARAMS), 20, step=3)


def test_seeded_tokens_equal_the_pinned_host_sampler_tokens(tiny_engine, prompts):
    outs = tiny_engine.generate(prompts, PARAMS)
    assert [o.token_ids for o in outs] == PINNED
    assert [lp.logprob for lp in outs[2].logprobs] == pytest.approx(PINNED_LOGPROBS, abs=LOGPROB_ATOL)
    assert [(i, pytest.approx(v, abs=LOGPROB_ATOL)) for i, v in outs[2].logprobs[0].top] == PINNED_TOP
    assert [lp.logprob for lp in outs[4].logprobs] == pytest.approx(PINNED_GREEDY_LOGPROBS, abs=LOGPROB_ATOL)
    assert outs[0].logprobs is None


def test_seeded_request_alone_equals_its_batch_tokens(tiny_engine, prompts):
    for i in (0, 2, 3):
        assert tiny_engine.generate([prompts[i]], PARAMS[i])[0].token_ids == PINNED[i]


def _seq(params: SP, outputs: list[int], seed: int = 0) -> Sequence:
    return Sequence(
        "r", [3], params, plan=None, generator=torch.Generator().manual_seed(seed), output_token_ids=list(outputs)
    )


def test_min_tokens_suppresses_eos_and_stop_ids_in_greedy_and_drawn_rows():
    sampler = Sampler(8, eos_ids=(7,), device="cpu")
    logits = torch.tensor([[0.0, 0, 0, 0, 0, 4, 1, 5]] * 4)
    seqs = [
        _seq(SP(temperature=0, min_tokens=2, stop_token_ids=[5]), [1]),  # both suppressed: token 6
        _seq(SP(temperature=0, min_tokens=2, stop_token_ids=[5]), [1, 1]),  # min_tokens reached: EOS
        _seq(SP(temperature=0, min_tokens=2, ignore_eos=True), [1]),  # EOS allowed by ignore_eos
        _seq(SP(temperature=0.01, top_k=3, min_tokens=1, stop_token_ids=[5]), []),
    ]
    tokens, logprobs = sampler.sample(logits, seqs)
    assert tokens == [6, 7, 7, 6]
    assert logprobs == [None] * 4


def test_logprobs_are_raw_and_only_for_rows_that_ask():
    sampler = Sampler(4, eos_ids=(), device="cpu")
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0]])
    raw = logits.log_softmax(-1)
    seqs = [
        _seq(SP(temperature=0, logprobs=2, repetition_penalty=5.0), [0]),
        _seq(SP(temperature=0, repetition_penalty=5.0), [1]),
    ]
    tokens, logprobs = sampler.sample(logits.clone(), seqs)
    assert tokens == [1, 2]  # the penalty on the seen tokens (prompt 3 and the output) moved both
    lp = logprobs[0]
    assert lp.token_id == 1 and lp.logprob == pytest.approx(float(raw[0, 1]), abs=1e-6)
    assert [i for i, _ in lp.top] == [0, 1] and lp.top[0][1] == pytest.approx(float(raw[0, 0]), abs=1e-6)
    assert logprobs[1] is None


def test_next_noise_is_drawn_ahead_except_after_the_last_token():
    sampler = Sampler(16, eos_ids=(), device="cpu")
    seqs = [
        _seq(SP(temperature=1.0, max_tokens=3, seed=1), [4]),
        _seq(SP(temperature=1.0, max_tokens=2), [4]),
        _seq(SP(temperature=0, max_tokens=3), [4]),
    ]
    sampler.prefetch_noise(seqs)
    assert seqs[0].noise is not None and seqs[1].noise is not None and seqs[2].noise is None
    sampler.sample(torch.zeros(3, 16), seqs)
    assert seqs[0].noise is not None  # its third token will need one
    assert seqs[1].noise is None  # this was its last token
    assert seqs[2].noise is None  # greedy rows draw nothing


def test_prefetched_noise_is_the_generators_next_draw():
    """Drawing ahead changes when, not what: the token equals argmax(probs / E) with E the
    generator's next exponential draw."""
    gen = torch.Generator().manual_seed(3)
    sampler = Sampler(64, eos_ids=(), device="cpu")
    logits = torch.randn(1, 64, generator=gen)
    seq = _seq(SP(temperature=0.7, seed=9), [], seed=9)
    sampler.prefetch_noise([seq])
    tokens, _ = sampler.sample(logits.clone(), [seq])
    noise = torch.empty(64).exponential_(generator=torch.Generator().manual_seed(9))
    assert tokens == [int(((logits[0] / 0.7).softmax(-1) / noise).argmax())]


def test_batch_draws_the_per_row_samplers_tokens():
    """32 rows mixing every knob (subsets of rows per knob), 3 steps, vocabulary 32000."""
    sampler = Sampler(32000, eos_ids=(2,), device="cpu")
    for step in range(3):
        logits = torch.randn(32, 32000, generator=torch.Generator().manual_seed(step)) * 4
        want = per_row_sample(logits, mixed_batch(step), (2,))
        got, logprobs = sampler.sample(logits.clone(), mixed_batch(step))
        assert got == want, step
        assert sum(lp is not None for lp in logprobs) == 6


@pytest.mark.parametrize("knobs", [{"temperature": 1e-300}, {"temperature": 1e-39}, {"top_p": 1e-46}, {"top_p": 1e-6}])
def test_temperature_or_top_p_that_underflows_fp32_is_greedy_not_token_0(tiny_engine, prompts, knobs):
    greedy = tiny_engine.generate([prompts[0]], SP(max_tokens=6, temperature=0, ignore_eos=True))[0]
    tiny = tiny_engine.generate([prompts[0]], SP(max_tokens=6, seed=3, ignore_eos=True, **knobs))[0]
    assert SP(**knobs).greedy
    assert tiny.token_ids == greedy.token_ids
    assert tiny.token_ids != [0] * 6


def test_smallest_drawing_temperature_is_not_greedy():
    assert not SP(temperature=1e-5).greedy and not SP(top_p=1e-5).greedy


@pytest.mark.parametrize("penalty", [1e-308, 1e-7, 1e7, 1e308])
def test_repetition_penalty_outside_the_fp32_safe_range_is_refused_naming_it(penalty):
    with pytest.raises(InvalidRequest) as e:
        SP(repetition_penalty=penalty)
    assert e.value.param == "repetition_penalty"
    assert str(e.value) == f"repetition_penalty must be in [1e-06, 1e+06], got {penalty}"
