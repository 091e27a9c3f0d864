"""Head-aware prefix caching: block names, the refcounted pool with its LRU of cached blocks,
the hit rule per head kind, and the engine giving the same greedy tokens with and without
the cache for every plan kind (docs/design.md, "Prefix caching")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.engine.sampling_params import SamplingParams
from headwise.kvcache.block_pool import NO_HASH, BlockPool
from headwise.kvcache.block_tables import BlockTables
from headwise.kvcache.budget import FULL_BUDGET, HeadBudget
from headwise.kvcache.head_tables import PLACEHOLDER, HeadTables
from headwise.kvcache.prefix_cache import PrefixCache, chain_hashes, seed_hash
from tests.tiny_model import PLANS, VOCAB, run_to_end, write_plans, write_tiny_llama

BS = 8


def test_block_names_chain_every_token_and_the_seed():
    a = chain_hashes(seed_hash("m", "plan-a"), list(range(24)), BS)
    assert len(a) == 3 and len(set(a)) == 3  # whole blocks only
    assert chain_hashes(seed_hash("m", "plan-a"), list(range(24)), BS) == a
    assert chain_hashes(seed_hash("m", "plan-b"), list(range(24)), BS)[0] != a[0]
    changed = list(range(24))
    changed[3] = 99  # block 0 differs, so every later name differs too
    b = chain_hashes(seed_hash("m", "plan-a"), changed, BS)
    assert all(x != y for x, y in zip(a, b))
    # continuing a chain from its last name gives the same names as hashing at once
    assert a[:2] + chain_hashes(a[1], list(range(16, 24)), BS) == a


def test_pool_evicts_the_least_recently_released_cached_block_first():
    pool = BlockPool(6)
    evicted = []
    pool.on_evict = lambda ids, hashes: evicted.extend(zip(ids.tolist(), hashes.tolist()))
    ids = pool.allocate(4)
    assert ids.tolist() == [0, 1, 2, 3]
    for b, h in zip(ids, (11, 12, 13, 14)):
        pool.set_hash(np.array([b]), h)
    pool.release(np.array([2, 0]))  # released first: evicted first, in this order
    pool.release(np.array([1]))
    assert (pool.num_free, pool.num_evictable) == (5, 3)
    pool.take(np.array([0]))  # a hit revives block 0: no longer evictable
    assert pool.num_evictable == 2 and pool.ref[0] == 1
    got = pool.allocate(4)  # 2 free, then 2 evicted: block 2, then block 1
    assert evicted == [(2, 13), (1, 12)]
    assert sorted(got.tolist()) == [1, 2, 4, 5]
    assert pool.block_hash[[1, 2]].tolist() == [NO_HASH, NO_HASH]
    pool.release(np.array([5]))  # no hash: straight to the free list
    assert (pool.num_free, pool.num_evictable) == (1, 0)


def test_shared_block_returns_to_the_pool_only_after_its_last_user():
    pool = BlockPool(2)
    block = pool.allocate(1)
    pool.set_hash(block, 7)
    pool.take(block)  # a second request hit it
    pool.release(block)
    assert pool.ref[block[0]] == 1 and pool.num_evictable == 0
    pool.release(block)
    assert pool.ref[block[0]] == 0 and pool.num_evictable == 1


def _tables(budgets, context_len=4096) -> HeadTables:
    bt = BlockTables(1, len(budgets), 2, 64)
    return HeadTables([budgets], np.zeros((1, len(budgets)), dtype=bool), BS, context_len, bt, bt.allocate_row())


def _cached(layout: list[list[int]]) -> np.ndarray:
    """`[k, 1, H]` cache availability from per-head lists of cached logical blocks."""
    k = max(max(x) for x in layout if x) + 1
    out = np.full((k, 1, len(layout)), PLACEHOLDER, dtype=np.int32)
    for h, blocks in enumerate(layout):
        out[blocks, 0, h] = [100 * h + b for b in blocks]
    return out


def test_hit_needs_every_block_of_a_full_head_but_only_sink_and_window_blocks_of_a_window_head():
    cache = PrefixCache(BlockPool(1), 1, 2)
    # head 0 full, head 1: 4 sinks + a 20-token window (position P needs (P - 20, P])
    tables = _tables([FULL_BUDGET, HeadBudget(4, 20)])
    # at P = 80 the window head needs block 0 (sinks) and blocks 7..9 (positions 56..79)
    assert cache.longest_hit(tables, _cached([list(range(10)), [0, 7, 8, 9]])) == 10
    # without block 8 no P from 16 to 80 works for the window head; P = 8 needs only block 0
    assert cache.longest_hit(tables, _cached([list(range(10)), [0, 7, 9]])) == 1
    # the full head stops at its first missing block
    assert cache.longest_hit(tables, _cached([[0, 1, 2, 4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 7, 8, 9]])) == 3
    # a window head alone: blocks 1..6 are never needed at P = 80
    window_only = _tables([HeadBudget(4, 20), HeadBudget(4, 20)])
    assert cache.longest_hit(window_only, _cached([[0, 7, 8, 9], [0, 7, 8, 9]])) == 10


def test_registered_blocks_are_found_until_evicted():
    pool = BlockPool(4)
    cache = PrefixCache(pool, 1, 2)
    ids = pool.allocate(2)
    cache.register(5, ids.reshape(1, 2))
    assert cache.lookup([5, 6]).tolist() == [[ids.tolist()], [[PLACEHOLDER, PLACEHOLDER]]]
    pool.release(ids)
    assert pool.num_evictable == 2
    pool.allocate(4)  # evicts both: the name is forgotten
    assert cache.lookup([5]).tolist() == [[[PLACEHOLDER, PLACEHOLDER]]]
    assert 5 not in cache.index


# -- the engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_prefix")
    model = write_tiny_llama(d / "model")
    return model, write_plans(model, d)


def _engine(tiny, caching: bool, **kw) -> LLMEngine:
    model, plans = tiny
    kw.setdefault("kv_cache_mb", 16)
    kw.setdefault("max_num_batched_tokens", 32)
    return LLMEngine(EngineConfig(model=model, plans=plans, enable_prefix_caching=caching, **kw))


def _shared_prefix_prompts(n: int, prefix: int, suffix: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, VOCAB - 2, (prefix,), generator=g).tolist()
    return [head + torch.randint(0, VOCAB - 2, (suffix,), generator=g).tolist() for _ in range(n)]


def _run(eng: LLMEngine, waves: list[list[tuple[list[int], str]]], max_tokens: int = 10):
    """Each wave runs to completion before the next starts (so later waves can hit)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = []
    for wave in waves:
        outs += eng.generate([p for p, _ in wave], params, [plan for _, plan in wave])
    return outs


@pytest.mark.parametrize("chunk", [32, 128])
@pytest.mark.parametrize("plan", PLANS)
def test_greedy_outputs_equal_with_and_without_caching_for_every_plan(tiny, plan, chunk):
    """Prompts sharing 100 tokens, then suffixes of 20: the second wave hits the first's
    blocks (all plans; elastic spans depend on the prompt length, so all have one length).
    One chunk of 128 keeps only the last 32 positions in a window head: the blocks a hit at 96
    needs there were transient ones, written for the cache."""
    prompts = _shared_prefix_prompts(6, 100, 20)
    waves = [[(p, plan) for p in prompts[:2]], [(p, plan) for p in prompts[2:]]]
    # select heads on the whole-prompt path, which names and hits prompt blocks (bounded ones
    # take no hit: test_bounded_select_requests_take_no_hit_and_name_no_block)
    off = _run(_engine(tiny, False, max_num_batched_tokens=chunk, select_margin=0), waves)
    eng = _engine(tiny, True, max_num_batched_tokens=chunk, select_margin=0)
    on = _run(eng, waves)
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    # 12 whole blocks (96 tokens) are shared; every head kind finds what it needs there
    assert [o.num_cached_tokens for o in on[2:]] == [96] * 4, plan
    assert eng.block_census()["held"] == 0
    stats = eng.stats()
    assert stats.prefix_cache_queries == 6 * 120 and stats.prefix_cache_hits >= 4 * 96


def test_bounded_select_requests_take_no_hit_and_name_no_block(tiny):
    """Bounded select heads hold no positional prompt blocks: a select-plan request neither
    names blocks nor hits a full-plan request's, and its tokens equal the cache-off run's."""
    prompts = _shared_prefix_prompts(3, 100, 20)
    waves = [[(prompts[0], "full")], [(prompts[1], "select")], [(prompts[2], "select")]]
    off = _run(_engine(tiny, False, max_num_batched_tokens=32), waves)
    eng = _engine(tiny, True, max_num_batched_tokens=32)
    on = _run(eng, waves[:1])
    cached = eng.block_census()["evictable"]
    assert cached > 0  # the full request named its blocks
    on += _run(eng, waves[1:])
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert [o.num_cached_tokens for o in on] == [0, 0, 0]
    assert eng.block_census() == {"held": 0, "evictable": cached, "free": eng.kv_manager.pool.num_blocks - cached}


def test_mixed_plans_with_preemption_eviction_and_aborts_match_and_leak_nothing(tiny):
    """All plan kinds in one batch over shared prefixes, a pool small enough to preempt and
    evict, two aborts: the survivors' tokens equal the cache-off run's, and every block is
    free, evictable or held by a live request after every step."""
    prompts = _shared_prefix_prompts(10, 64, 24, seed=5) + _shared_prefix_prompts(5, 40, 40, seed=6)
    plans = [PLANS[i % len(PLANS)] for i in range(len(prompts))]
    params = [SamplingParams(max_tokens=8 + 3 * (i % 4), temperature=0, ignore_eos=True) for i in range(len(prompts))]

    def run(caching: bool):
        eng = _engine(tiny, caching, kv_cache_mb=None, num_blocks=160, max_num_batched_tokens=48)
        for i, (p, sp, plan) in enumerate(zip(prompts, params, plans)):
            eng.add_request(f"r{i}", p, sp, plan)

        def abort_and_count(step: int) -> None:
            if step == 6:
                eng.abort_request("r3")
                eng.abort_request("r11")
            eng.block_census()

        done = run_to_end(eng, abort_and_count)
        assert eng.block_census()["held"] == 0
        return eng, done

    eng_off, off = run(False)
    eng_on, on = run(True)
    assert {k for k, o in on.items() if o.finish_reason == "abort"} == {"r3", "r11"}
    for rid, out in off.items():
        if out.finish_reason != "abort":
            assert on[rid].token_ids == out.token_ids, rid
    assert eng_on.stats().num_preemptions > 0
    assert eng_on.stats().prefix_cache_hits > 0
    assert eng_on.kv_manager.pool.num_evictable > 0  # cached blocks stay after the run


def test_multi_turn_resend_recomputes_only_the_new_tokens(tiny):
    """A chat of 8 turns re-sent in full: each turn's prompt is the last prompt, its answer
    and 40 new tokens; the prefill computed stays within 1.3x of the new tokens (the cache
    holds whole blocks, and the last answer token was never written)."""
    g = torch.Generator().manual_seed(9)
    eng = _engine(tiny, True)
    ref = _engine(tiny, False)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompt = torch.randint(0, VOCAB - 2, (40,), generator=g).tolist()
    computed = new = seen = 0
    mismatches = 0
    for turn in range(8):  # noqa: B007
        out = eng.generate([prompt], params)[0]
        mismatches += out.token_ids != ref.generate([prompt], params)[0].token_ids
        computed += len(prompt) - out.num_cached_tokens
        new += len(prompt) - seen
        seen = len(prompt) + len(out.token_ids)
        prompt = prompt + out.token_ids + torch.randint(0, VOCAB - 2, (40,), generator=g).tolist()
    assert computed <= 1.3 * new, (computed, new)
    # decode-written blocks are reused: their K/V came from the decode kernel, not a prefill
    assert mismatches == 0


def test_a_pool_caches_more_prompts_under_a_head_aware_plan(tiny, tmp_path):
    """Distinct 200-token prompts run one by one, then re-sent newest first: a full-plan
    pool re-serves the last few; under a streaming plan (sink 4 + a 32-token window) the same
    pool re-serves about 4x as many, since a window head's hit needs only its sink and window
    blocks (3 of a prompt's 12 whole blocks) and the blocks that left the window are released
    first (least recently used)."""
    from headwise.kvcache.plan_build import streaming_plan
    from headwise.kvcache.plans import save_plan

    model, plans = tiny
    shape = _engine(tiny, False, kv_cache_mb=1).model_config.shape
    save_plan(streaming_plan(shape, 4, 32), tmp_path / "stream.json")
    prompts = _shared_prefix_prompts(30, 0, 200, seed=11)
    params = SamplingParams(max_tokens=1, temperature=0)
    served = {}
    for plan in ("full", "stream"):
        eng = LLMEngine(
            EngineConfig(
                model=model,
                plans={**plans, "stream": str(tmp_path / "stream.json")},
                num_blocks=500,
                max_num_batched_tokens=256,
            )
        )
        for p in prompts:
            eng.generate([p], params, plan)
        hits = [eng.generate([p], params, plan)[0].num_cached_tokens for p in reversed(prompts)]
        served[plan] = next((i for i, h in enumerate(hits) if h < 192), len(hits))  # 12 whole blocks
        assert eng.block_census()["held"] == 0
    # full: 12 cached blocks x 8 heads = 96 a prompt -> 5 in 500; stream: 3 x 8 = 24, 4x as
    # many, less what the re-sends' own last blocks evict on the way (measured: 17)
    assert served["full"] == 5
    assert served["stream"] >= 3 * served["full"], served


def test_select_heads_compact_in_place_when_the_pool_has_no_room_for_new_blocks(tiny):
    """With the prefix cache, the step ending a select plan's prompt sets new blocks aside
    when the pool has room (the prompt blocks stay cached); in a pool without that room the
    heads compact into the prompt's last blocks instead of waiting: same tokens either way,
    and the peak is the prompt alone."""
    prompt = _shared_prefix_prompts(1, 0, 160, seed=2)[0]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    roomy = _engine(tiny, True, kv_cache_mb=None, num_blocks=400, max_num_batched_tokens=256, select_margin=0)
    out = roomy.generate([prompt], params, "select")[0]
    # 8 heads: 4 full (every third head of the tiny plans), 4 select (4 + 16 + 16 slots: 3 blocks)
    heads = roomy.kv_manager.num_layers * roomy.kv_manager.num_kv_heads
    prompt_blocks = heads * 10
    tight = _engine(
        tiny, True, kv_cache_mb=None, num_blocks=prompt_blocks + 8, max_num_batched_tokens=256, select_margin=0
    )
    out_tight = tight.generate([prompt], params, "select")[0]
    assert out_tight.token_ids == out.token_ids
    n_select = sum(s.kind == "select" for row in roomy.plans["select"].heads for s in row)
    block = roomy.kv_manager.block_bytes
    assert out.kv_bytes == (prompt_blocks + n_select * 3) * block
    assert out_tight.kv_bytes == prompt_blocks * block
    assert tight.block_census()["held"] == 0 and roomy.block_census()["held"] == 0
