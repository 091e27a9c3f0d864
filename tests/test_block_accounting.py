"""Every KV block returns to the pool after finished, aborted and preempted requests."""

from __future__ import annotations

import pytest

from headwise.engine.sampling_params import SamplingParams


# the same lifecycles with four plans: test_plan_memory.py::test_no_leaks_with_mixed_plans_aborts_and_preemption;
# model-free: test_scheduler_rules.py (preemption, abort)
@pytest.mark.slow
def test_no_leaked_blocks_after_mixed_lifecycles(make_engine, tok):
    eng = make_engine(num_blocks=90 * 6, kv_cache_mb=None, max_num_batched_tokens=32)
    prompt = tok("Tell me about the ocean and its many creatures")["input_ids"]
    for i in range(6):
        eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=40 + i, temperature=0, ignore_eos=True))
    finished, aborted = set(), set()
    most_held = dict.fromkeys(range(6), 0)
    steps = 0
    while eng.has_unfinished_requests():
        census = eng.block_census()  # raises if a refcount disagrees with the live tables
        assert census["held"] + census["evictable"] + census["free"] == eng.stats().num_blocks
        for i in range(6):
            most_held[i] = max(most_held[i], eng.kv_blocks_in_use(f"r{i}"))
        for out in eng.step():
            if out.finished:
                (aborted if out.finish_reason == "abort" else finished).add(out.request_id)
        steps += 1
        if steps == 3:
            eng.abort_request("r1")  # running
            eng.abort_request("r5")  # running: the shared prompt is cached, so all six fit by step 2
        if steps == 20:
            eng.abort_request("r2")
    assert aborted == {"r1", "r2", "r5"}
    assert finished == {"r0", "r3", "r4"}
    assert eng.stats().num_preemptions > 0
    assert eng.stats().num_free_blocks == eng.stats().num_blocks
    assert eng.block_census()["held"] == 0
    assert all(most_held[i] >= 90 for i in range(6))  # 30 layers x 3 KV heads, a block or more each


def test_abort_frees_blocks_in_the_same_step(engine, tok):
    prompt = tok("Count slowly from one to one hundred:")["input_ids"]
    engine.add_request("long", prompt, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.kv_blocks_in_use("long") > 0
    free_before = engine.stats().num_free_blocks
    held = engine.kv_blocks_in_use("long")
    engine.abort_request("long")
    assert engine.stats().num_free_blocks == free_before + held
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("long", "abort")]
    assert not engine.has_unfinished_requests()


def test_request_peak_kv_bytes_matches_blocks(engine, tok):
    prompt = tok("one two three four five")["input_ids"]
    out = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    written = len(prompt) + 20 - 1  # the last sampled token is never written
    blocks = 30 * 3 * -(-written // 16)
    assert out.kv_bytes == blocks * 16 * 64 * 2 * 4  # block_size * head_dim * (K, V) * fp32
