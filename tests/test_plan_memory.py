"""Memory of head budgets is real: the blocks a request holds follow the budget formula,
the pool admits the predicted number of requests per plan, and mixed plans with aborts
and preemption leak nothing. On a tiny random Llama with the default model's heads (9 query /
3 KV heads of 64, 4 layers) and its tokenizer's ids folded into the tiny vocabulary: block
accounting does not depend on the weights, every head of a kind holds the same blocks (so
counts scale with the layers), and a step costs a fraction of the default model's."""

from __future__ import annotations

import numpy as np
import pytest

from headwise.engine.errors import PromptTooLong
from headwise.engine.sampling_params import SamplingParams
from headwise.kvcache.budget import window_first_block
from headwise.kvcache.plan_build import dynamic_plan
from headwise.kvcache.plans import FULL, HeadSpec, Plan, save_plan
from headwise.kvcache.request_blocks import request_blocks
from tests.tiny_model import VOCAB, write_tiny_llama

BS = 16
LAYERS, KV_HEADS = 4, 3
HEADS = LAYERS * KV_HEADS


def window_blocks(sink: int, recent: int, prev_end, end, block_size: int):
    """Blocks a window head holds during a step that writes positions [prev_end, end): its
    sink blocks, the window blocks it kept after `prev_end`, and the new blocks its window
    keeps after `end` (blocks the step skips are not held). With prev_end == end: what it
    holds between steps. Ends may be numpy arrays (one value per step)."""
    ns = -(-sink // block_size)
    held_to, lays_to = -(-np.asarray(prev_end) // block_size), -(-np.asarray(end) // block_size)
    kept_from = window_first_block(ns, recent, prev_end, block_size)
    keeps_from = window_first_block(ns, recent, end, block_size)
    old = np.minimum(ns, held_to) + np.maximum(0, held_to - kept_from)
    new = np.maximum(0, np.minimum(ns, lays_to) - held_to) + np.maximum(0, lays_to - np.maximum(held_to, keeps_from))
    return old + new


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _plan(shape, spec: HeadSpec, full_every: int = 0) -> Plan:
    heads = [
        [FULL if full_every and (l * shape.kv_heads + h) % full_every == 0 else spec for h in range(shape.kv_heads)]
        for l in range(shape.layers)
    ]
    return Plan(spec.kind, shape, heads)


@pytest.fixture(scope="module")
def make_tiny(make_engine, tmp_path_factory):
    model = write_tiny_llama(tmp_path_factory.mktemp("tiny"), heads=9, kv_heads=3, layers=LAYERS)

    def make(**kw):
        return make_engine(model=model, **kw)

    return make


@pytest.fixture(scope="module")
def tok(tok):
    """The default model's tokenizer, its ids folded into the tiny vocabulary."""
    return lambda text: {"input_ids": [t % (VOCAB - 2) for t in tok(text)["input_ids"]]}


@pytest.fixture(scope="module")
def plan_paths(make_tiny, tmp_path_factory):
    shape = make_tiny(kv_cache_mb=4).model_config.shape
    d = tmp_path_factory.mktemp("mem_plans")
    plans = {
        # a third of the heads full, the others window heads of 8 + 40 slots
        "window": _plan(shape, HeadSpec("window", sink=8, recent=40), full_every=3),
        # every head a sink block + a 32-token window: at most 1 + 3 blocks instead of 16 at
        # 256 tokens (the window's oldest block may be part expired)
        "quarter": _plan(shape, HeadSpec("window", sink=16, recent=32)),
        "select": _plan(shape, HeadSpec("select", sink=4, recent=20, select=12, window=8), full_every=3),
        "dynamic": dynamic_plan(shape, 0.34, sink=4, recent=20, select=12, window=8),
        "elastic": _plan(shape, HeadSpec("elastic", sink=4, alpha=10, beta=0.1), full_every=2),
    }
    paths = {}
    for name, plan in plans.items():
        save_plan(plan, d / f"{name}.json")
        paths[name] = str(d / f"{name}.json")
    return paths


def _run_collecting(eng, request_ids, check):
    """Step until done, calling `check(step)` after every step."""
    step = 0
    while eng.has_unfinished_requests():
        eng.step()
        step += 1
        check(step)


# the rule (sink block + the blocks of the window, released after the step) is pinned model-free by
# tests/test_scheduler_rules.py::test_window_heads_release_the_blocks_that_leave_their_window
def test_window_blocks_follow_the_formula(make_tiny, plan_paths, tok):
    eng = make_tiny(plans=plan_paths, max_num_batched_tokens=64)
    prompt = tok("A quiet harbour town wakes up slowly. " * 20)["input_ids"][:150]
    max_tokens = 30
    eng.add_request("w", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), "window")
    n_full, n_win = LAYERS, 2 * LAYERS
    seen = []
    seq = eng._seqs["w"]

    def check(step):
        if not seq.has_kv:
            return
        held = eng.kv_blocks_in_use("w")
        # after a step: full heads hold every written position's block; window heads their
        # sink block (8 sinks) and the blocks that overlap the last 40 positions
        written = seq.num_computed_tokens
        assert held == n_full * _cdiv(written, BS) + n_win * window_blocks(8, 40, written, written, BS), step
        seen.append(written)

    _run_collecting(eng, ["w"], check)
    # the last step writes position P + max_tokens - 2 and frees the request in the same step
    assert seen[0] == 64 and seen[-1] == len(prompt) + max_tokens - 2
    # 150 written positions: sink block 0, then blocks 6..9 (positions 96..159 cover 110..149)
    assert window_blocks(8, 40, 150, 150, BS) == 1 + 4
    out_bytes = seq.peak_blocks * eng.kv_manager.block_bytes
    # the peak is the last step: full heads at their longest, window heads at their steady 1 + 4
    written = len(prompt) + max_tokens - 1
    expect_peak = n_full * _cdiv(written, BS) + n_win * window_blocks(8, 40, written - 1, written, BS)
    assert window_blocks(8, 40, written - 1, written, BS) == 1 + 4
    assert seq.peak_blocks == expect_peak
    assert out_bytes == expect_peak * BS * 64 * 2 * 4
    assert eng.stats().num_free_blocks == eng.stats().num_blocks


def test_select_heads_shrink_to_their_budget_after_prefill(make_tiny, plan_paths, tok):
    # the whole-prompt path (select_margin 0); the bounded one: tests/test_bounded_prefill.py
    eng = make_tiny(plans=plan_paths, max_num_batched_tokens=4096, select_margin=0)
    prompt = tok("Numbers and letters fill the page. " * 30)["input_ids"][:200]
    eng.add_request("s", prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), "select")
    eng.step()  # the whole prompt in one chunk, then selection compacts the select heads
    n_full, n_sel = LAYERS, 2 * LAYERS
    assert eng.kv_blocks_in_use("s") == n_full * _cdiv(200, BS) + n_sel * _cdiv(4 + 12 + 20, BS)
    # the prefill peak held the whole prompt in every head, and (prefix caching keeps the
    # prompt blocks intact for later hits) the select heads' new blocks
    assert eng._seqs["s"].kv.peak_blocks == HEADS * _cdiv(200, BS) + n_sel * _cdiv(36, BS)
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.stats().num_free_blocks == eng.stats().num_blocks
    # the outputs report both: the prefill peak and what the request held while decoding
    out = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), "select")[0]
    block = BS * 64 * 2 * 4
    assert out.kv_bytes == (HEADS * _cdiv(200, BS) + n_sel * _cdiv(36, BS)) * block
    assert out.kv_bytes_decode == (n_full * _cdiv(200 + 8 - 1, BS) + n_sel * _cdiv(36, BS)) * block


# model-free: test_scheduler_rules.py::test_select_heads_reserve_what_compacting_in_place_lacks_...;
# end to end: test_prefix_cache.py::test_select_heads_compact_in_place_when_the_pool_has_no_room_...
def test_select_heads_compact_in_place_without_prefix_caching(make_tiny, plan_paths, tok):
    eng = make_tiny(plans=plan_paths, max_num_batched_tokens=4096, enable_prefix_caching=False, select_margin=0)
    prompt = tok("Numbers and letters fill the page. " * 30)["input_ids"][:200]
    out = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), "select")[0]
    block = BS * 64 * 2 * 4
    assert out.kv_bytes == HEADS * _cdiv(200, BS) * block
    assert out.kv_bytes_decode == (LAYERS * _cdiv(200 + 8 - 1, BS) + 2 * LAYERS * _cdiv(36, BS)) * block
    assert eng.stats().num_free_blocks == eng.stats().num_blocks


def test_pool_admits_the_predicted_number_of_requests(make_tiny, plan_paths, tok):
    # 240-token prompts + 16 new tokens = 256 positions = 16 blocks per full head; the
    # quarter plan's heads hold at most 4 blocks, so the same pool runs 4x the requests
    pool = 2 * HEADS * 16
    base = tok("The river carries the snow of the mountains down to the sea. " * 30)["input_ids"]
    peaks = {}
    for plan, per_request in (("full", HEADS * 16), ("quarter", HEADS * 4)):
        eng = make_tiny(
            plans=plan_paths, num_blocks=pool, kv_cache_mb=None, max_num_seqs=16, max_num_batched_tokens=4096
        )
        for i in range(12):
            prompt = [base[i]] + base[12 : 12 + 239]
            eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), plan)
        peak = 0
        while eng.has_unfinished_requests():
            eng.step()
            peak = max(peak, eng.stats().num_running)
        assert peak == pool // per_request, plan
        assert eng.stats().num_preemptions == 0
        assert eng.stats().num_free_blocks == pool
        peaks[plan] = peak
    assert peaks == {"full": 2, "quarter": 8}


def test_no_leaks_with_mixed_plans_aborts_and_preemption(make_tiny, plan_paths, tok):
    eng = make_tiny(plans=plan_paths, num_blocks=HEADS * 10, kv_cache_mb=None, max_num_batched_tokens=48)
    prompt = tok("Write a long story about a fox, a crow and a piece of cheese in the forest")["input_ids"]
    plans = ["full", "window", "select", "quarter"]
    for i in range(8):
        eng.add_request(
            f"m{i}", prompt, SamplingParams(max_tokens=60 + 7 * i, temperature=0, ignore_eos=True), plans[i % 4]
        )
    reasons = {}
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        steps += 1
        if steps == 4:
            eng.abort_request("m1")
            eng.abort_request("m7")
        if steps == 40:
            eng.abort_request("m4")
        census = eng.block_census()  # refcounts = the live tables' blocks (prefixes shared)
        assert census["held"] == eng.stats().num_blocks - eng.stats().num_free_blocks
        assert census["held"] <= sum(eng.kv_blocks_in_use(f"m{i}") for i in range(8))
    assert {k for k, v in reasons.items() if v == "abort"} == {"m1", "m4", "m7"}
    assert set(reasons) == {f"m{i}" for i in range(8)}
    assert eng.stats().num_preemptions > 0
    assert eng.stats().num_free_blocks == eng.stats().num_blocks
    assert eng.block_census()["held"] == 0
    assert eng.block_census()["held"] == 0


@pytest.mark.parametrize("caching", [True, False])
# (16, 1): the select heads' ring outgrows the 1-block prompt, so compacting in place sets
# a block aside for each of them (the step replay this forecast replaced missed it)
@pytest.mark.parametrize("prompt_len, max_tokens", [(200, 9), (37, 40), (16, 1)])
def test_request_blocks_forecast_equals_what_the_engine_holds(
    make_tiny, plan_paths, tok, prompt_len, max_tokens, caching
):
    """`headwise bench capacity` and admission predict from request_blocks(); the engine must agree for
    every plan kind: the peak (kv_bytes) and the decode peak (kv_bytes_decode) of a request
    alone, prefilled in chunks of 64 tokens."""
    eng = make_tiny(plans=plan_paths, max_num_batched_tokens=64, enable_prefix_caching=caching)
    prompt = tok("Seven swans swim south as the summer sun sets. " * 30)["input_ids"][:prompt_len]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    block = eng.kv_manager.block_bytes
    for name in ["full", *plan_paths]:
        eng.reset_prefix_cache()  # no hit from the previous plan's run
        out = eng.generate([prompt], params, name)[0]
        peak, end = request_blocks(
            eng.plans[name], prompt_len, max_tokens, chunk=64, prefix_caching=caching, margin=eng.config.select_margin
        ).max(axis=0)
        assert (out.kv_bytes // block, out.kv_bytes_decode // block) == (peak, end), name
        assert out.num_cached_tokens == 0
    assert eng.stats().num_free_blocks == eng.stats().num_blocks


def test_a_request_the_pool_can_never_hold_is_refused_with_its_forecast(make_tiny, plan_paths, tok):
    """add_request refuses a request whose forecast peak exceeds the whole pool
    (PromptTooLong naming both counts, nothing left behind) and runs one whose peak is the
    pool exactly, holding exactly that many blocks at its peak."""
    prompt = tok("Seven swans swim south as the summer sun sets. " * 30)["input_ids"][:200]
    probe = make_tiny(plans=plan_paths, max_num_batched_tokens=64, enable_prefix_caching=False)
    plan = probe.plans["select"]
    margin = probe.config.select_margin
    fits = request_blocks(plan, 200, 9, chunk=64, prefix_caching=False, margin=margin)[:, 0].max()
    over = request_blocks(plan, 200, 60, chunk=64, prefix_caching=False, margin=margin)[:, 0].max()
    assert over > fits
    eng = make_tiny(plans=plan_paths, max_num_batched_tokens=64, enable_prefix_caching=False, num_blocks=fits)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    with pytest.raises(PromptTooLong, match=f"needs {over} KV blocks but the pool has {fits};"):
        eng.add_request("too-big", prompt, params, "select")
    assert not eng.has_unfinished_requests()
    out = eng.generate([prompt], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True), "select")[0]
    assert out.kv_bytes // eng.kv_manager.block_bytes == fits
    assert eng.stats().num_free_blocks == fits
