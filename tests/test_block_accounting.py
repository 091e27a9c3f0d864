"""Every KV block returns to the pool after finished, aborted and preempted requests."""

from __future__ import annotations

from headwise.engine.sampling_params import SamplingParams


def test_no_leaked_blocks_after_mixed_lifecycles(make_engine, tok):
    eng = make_engine(num_blocks=90 * 6, kv_cache_mb=None, max_num_batched_tokens=32)
    prompt = tok("Tell me about the ocean and its many creatures")["input_ids"]
    for i in range(6):
        eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=40 + i, temperature=0, ignore_eos=True))
    finished, aborted = set(), set()
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                (aborted if out.finish_reason == "abort" else finished).add(out.request_id)
        steps += 1
        if steps == 3:
            eng.abort_request("r1")  # running
            eng.abort_request("r5")  # still waiting (pool fits ~3 prompts at a time)
        if steps == 20:
            eng.abort_request("r2")
    assert aborted == {"r1", "r2", "r5"}
    assert finished == {"r0", "r3", "r4"}
    assert eng.stats().num_preemptions > 0
    assert eng.stats().num_free_blocks == eng.stats().num_blocks
    assert all(eng.kv_blocks_in_use(f"r{i}") == 0 for i in range(6))


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
