"""One request that breaks inside a step fails alone: the rest of its batch finishes with
exactly its normal outputs, no block leaks, the engine keeps serving. A fault in the
batched forward pass kills the engine loop and every open stream learns it."""

from __future__ import annotations

import asyncio

import pytest

from headwise.engine.async_engine import AsyncEngine, EngineDead
from headwise.engine.detokenizer import Detokenizer
from headwise.engine.errors import RequestFailed
from headwise.engine.sampling_params import InvalidRequest, SamplingParams
from tests.tiny_model import run_to_end

TEXTS = [
    "The history of the Roman Empire spans",
    "Photosynthesis is the process by which plants",
    "A short guide to writing unit tests in Python:",
]
PARAMS = [
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.3),
]


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(t)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module")
def normal(make_engine, prompts):
    """Each request's output in a batch without the faulty request."""
    return [o.token_ids for o in make_engine(kv_cache_mb=16).generate(prompts, PARAMS)]


def add_batch(eng, prompts) -> None:
    for i, (prompt, params) in enumerate(zip(prompts, PARAMS)):
        eng.add_request(f"ok-{i}", prompt, params)


def assert_no_leak(eng) -> None:
    stats = eng.stats()
    assert (stats.num_free_blocks, stats.num_running, stats.num_waiting) == (stats.num_blocks, 0, 0)


def test_a_fault_in_the_sampler_fails_only_its_request(make_engine, prompts, normal):
    eng = make_engine(kv_cache_mb=16)
    add_batch(eng, prompts)
    eng.add_request("bad", prompts[0], SamplingParams(max_tokens=12, min_tokens=4, temperature=0))
    # the poison: an out-of-vocabulary stop token planted past admission's check
    eng._seqs["bad"].params.stop_token_ids = [1_000_000]
    done = run_to_end(eng)
    assert [done[f"ok-{i}"].token_ids for i in range(3)] == normal
    assert [done[f"ok-{i}"].finish_reason for i in range(3)] == ["length"] * 3
    bad = done["bad"]
    assert (bad.finish_reason, bad.finished, bad.token_ids) == ("error", True, [])
    assert bad.error.startswith("IndexError: index 1000000 is out of bounds")
    assert_no_leak(eng)
    again = eng.generate([prompts[0]], PARAMS[0])[0]
    assert again.token_ids == normal[0]


def test_a_fault_after_sampling_keeps_the_tokens_so_far_and_frees_the_blocks(make_engine, prompts, normal, monkeypatch):
    eng = make_engine(kv_cache_mb=16)
    real_update = Detokenizer.update

    def update(self, seq):
        if seq.request_id == "bad" and len(seq.output_token_ids) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "planted")
        return real_update(self, seq)

    monkeypatch.setattr(Detokenizer, "update", update)
    add_batch(eng, prompts)
    eng.add_request("bad", prompts[1], SamplingParams(max_tokens=12, temperature=0))
    done = run_to_end(eng)
    assert [done[f"ok-{i}"].token_ids for i in range(3)] == normal
    assert done["bad"].finish_reason == "error" and len(done["bad"].token_ids) == 3
    assert done["bad"].error.startswith("UnicodeDecodeError")
    assert_no_leak(eng)


def test_fail_request_by_id_frees_a_waiting_or_running_request(make_engine, prompts):
    eng = make_engine(kv_cache_mb=16)
    eng.add_request("r", prompts[0], SamplingParams(max_tokens=12, temperature=0))
    eng.step()  # prefill: now running, holding blocks
    assert eng.kv_blocks_in_use("r") > 0
    eng.fail_request("r", RuntimeError("operator said so"))
    out = eng.step()
    assert [(o.request_id, o.finish_reason, o.error) for o in out] == [("r", "error", "RuntimeError: operator said so")]
    assert_no_leak(eng)
    eng.fail_request("r", RuntimeError("again"))  # already gone: nothing happens
    assert eng.step() == []


@pytest.mark.parametrize(
    "prompt, params, param",
    [
        ([1, 2, 49152], SamplingParams(), "prompt"),
        ([1, 2, 2**70], SamplingParams(), "prompt"),
        ([1, 2, -1], SamplingParams(), "prompt"),
        ([1, 2], SamplingParams(stop_token_ids=[1_000_000], min_tokens=2), "stop_token_ids"),
        ([1, 2], SamplingParams(stop_token_ids=[49152]), "stop_token_ids"),
    ],
)
def test_admission_checks_token_ids_against_the_vocabulary(engine, prompt, params, param):
    with pytest.raises(InvalidRequest) as info:
        engine.add_request("poison", prompt, params)
    assert info.value.param == param
    assert "49152" in str(info.value)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**64])
def test_seeds_outside_signed_64_bits_are_refused(seed):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(seed=seed)
    assert info.value.param == "seed"


def test_async_engine_fails_one_stream_and_serves_the_rest(make_engine, prompts, normal):
    eng = make_engine(kv_cache_mb=16)
    deaths = []
    a = AsyncEngine(eng, on_death=deaths.append)
    a.start()

    async def collect(rid, prompt, params, poison=False):
        tokens = []
        async for out in a.generate(rid, prompt, params):
            if poison and rid in eng._seqs:
                eng._seqs[rid].params.stop_token_ids = [1_000_000]
                eng._seqs[rid].params.min_tokens = 100
            tokens = out.token_ids
        return tokens

    async def scenario():
        jobs = [collect(f"ok-{i}", p, params) for i, (p, params) in enumerate(zip(prompts, PARAMS))]
        jobs.append(collect("bad", prompts[0], SamplingParams(max_tokens=12, temperature=0), poison=True))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        await a.shutdown(drain=True, timeout=10)
        return results

    *ok, bad = asyncio.run(scenario())
    assert ok == normal
    assert isinstance(bad, RequestFailed) and bad.request_id == "bad"
    assert a.error is None and deaths == []
    assert_no_leak(eng)


def test_a_fault_in_the_forward_pass_kills_the_engine_and_fails_every_stream(make_engine, prompts, monkeypatch):
    eng = make_engine(kv_cache_mb=16)
    deaths = []
    a = AsyncEngine(eng, on_death=deaths.append)
    calls = []

    def execute(scheduled, *rest):
        calls.append(len(scheduled))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(eng.runner, "execute", execute)
    a.start()

    async def scenario():
        async def consume(rid):
            async for _ in a.generate(rid, prompts[0], SamplingParams(max_tokens=4)):
                pass

        results = await asyncio.gather(consume("a"), consume("b"), return_exceptions=True)
        with pytest.raises(EngineDead):
            await consume("late")
        await a.shutdown(drain=False)
        return results

    results = asyncio.run(scenario())
    assert calls and all(isinstance(r, EngineDead) for r in results)
    assert "illegal memory access" in str(results[0])
    assert len(deaths) == 1 and isinstance(a.error, RuntimeError)
