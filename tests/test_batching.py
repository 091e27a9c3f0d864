"""Greedy tokens do not depend on batch composition, prefill chunk size or preemption."""

from __future__ import annotations

import pytest

from headwise.engine.sampling_params import SamplingParams

TEXTS = [
    "The history of the Roman Empire spans",
    "Photosynthesis is the process by which plants",
    "A short guide to writing unit tests in Python:",
    "My favourite recipe for pancakes needs flour, eggs and",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(tok):
    # mixed lengths: repeat each text a different number of times
    return [tok(" ".join([t] * (1 + 5 * i)))["input_ids"] for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def alone(engine, prompts):
    return [engine.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_batch_equals_alone(engine, prompts, alone):
    together = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    assert together == alone


@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_prefill_equals_unchunked(make_engine, prompts, alone, chunk):
    eng = make_engine(max_num_batched_tokens=chunk)
    outs = eng.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone
    assert max(len(p) for p in prompts) > chunk  # the longest prompt really was chunked


def test_preemption_gives_same_tokens(make_engine, prompts, alone):
    # room for roughly two of the four requests: growth forces recompute preemption
    need = sum(-(-(len(p) + GREEDY.max_tokens) // 16) for p in prompts) * 30 * 3
    eng = make_engine(num_blocks=need // 2, kv_cache_mb=None)
    outs = eng.generate(prompts, GREEDY)
    assert eng.stats().num_preemptions > 0
    assert sum(o.num_preemptions for o in outs) == eng.stats().num_preemptions
    assert [o.token_ids for o in outs] == alone
    assert eng.stats().num_free_blocks == eng.stats().num_blocks
