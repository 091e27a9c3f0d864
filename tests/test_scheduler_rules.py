"""Scheduling and KV accounting rules on a fake shape (tests/fake_kv.py): no model, no
weights; every count is exact (2 layers x 2 KV heads = 4 heads, blocks of 4 tokens)."""

from __future__ import annotations

from headwise.engine.sequence import Status
from headwise.kvcache.budget import HeadBudget
from tests.fake_kv import HEADS, create_scheduler, held, make_seq, run_step


def test_admission_waits_until_the_pool_holds_the_whole_prompt():
    sched = create_scheduler(num_blocks=20)
    a, b = make_seq("a", 10, arrival=0), make_seq("b", 10, arrival=1)
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    # a: 10 tokens = 3 blocks per head = 12; b would need 12 more of the 8 left
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 10)]
    assert list(sched.waiting) == [b] and held(a) == 12 and sched.kv_manager.num_free == 8
    assert a.status == Status.RUNNING and b.status == Status.WAITING and not b.has_kv


def test_admission_stops_at_max_num_seqs_and_at_the_token_budget():
    sched = create_scheduler(num_blocks=100, max_num_seqs=2, max_num_batched_tokens=12)
    seqs = [make_seq(f"r{i}", 5, arrival=i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    # r0 takes 5 tokens, r1 the 5 after it; r2 waits for a row (2 sequences at most)
    assert [(s.request_id, n) for s, n in out.scheduled] == [("r0", 5), ("r1", 5)]
    assert list(sched.waiting) == [seqs[2]]
    sched = create_scheduler(num_blocks=100, max_num_batched_tokens=12)
    for s in [make_seq(f"r{i}", 10, arrival=i) for i in range(2)]:
        sched.add(s)
    # the second prompt gets the 2 tokens left of the budget: a chunk of its prefill
    assert [(s.request_id, n) for s, n in run_step(sched).scheduled] == [("r0", 10), ("r1", 2)]


def test_a_running_request_grows_one_block_per_head_when_it_crosses_a_block():
    sched = create_scheduler(num_blocks=40)
    a = make_seq("a", 10, max_tokens=8)
    sched.add(a)
    seen = []
    for _ in range(5):
        run_step(sched)
        seen.append((a.num_computed_tokens, held(a)))
    # positions 0..9, then one decode token a step: 3 blocks per head until position 12
    assert seen == [(10, 12), (11, 12), (12, 12), (13, 16), (14, 16)]
    assert sched.kv_manager.num_free == 40 - 16


def test_the_newest_request_is_preempted_when_an_older_one_cannot_grow():
    sched = create_scheduler(num_blocks=16)
    a, b = make_seq("a", 8, arrival=0), make_seq("b", 8, arrival=1)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prompts: 2 blocks per head each, the pool is full
    assert held(a) == held(b) == 8 and sched.kv_manager.num_free == 0
    out = run_step(sched)  # a's token 9 needs a third block per head: b goes
    assert out.preempted == [b] and [(s.request_id, n) for s, n in out.scheduled] == [("a", 1)]
    assert b.status == Status.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert list(sched.waiting) == [b] and not b.has_kv and sched.num_preemptions == 1
    assert held(a) == 12 and sched.kv_manager.num_free == 4


def test_window_heads_release_the_blocks_that_leave_their_window():
    sched = create_scheduler(num_blocks=40, max_num_batched_tokens=8)
    a = make_seq("a", 20, budget=HeadBudget(sink=4, recent=4))
    sched.add(a)
    after = []
    for _ in range(3):  # chunks [0, 8), [8, 16), [16, 20)
        run_step(sched)
        after.append(held(a))
    # after each chunk a head keeps its sink block and the block of the last 4 positions
    assert after == [8, 8, 8]
    assert a.kv.peak_blocks == 12  # during [8, 16): sink, block 1 (expiring), block 3
    # each head may still take one block (window_max 3): promised, not free to others
    assert sched.kv_manager.num_free == 40 - 8 and sched.kv_manager.promised.tolist() == [4]
    assert sched.kv_manager.available.tolist() == [40 - 8 - 4]


def test_select_heads_reserve_what_compacting_in_place_lacks_without_prefix_caching():
    sched = create_scheduler(num_blocks=40)
    # a 5-token prompt (2 blocks per head) compacts to sink 4 + ring 8 = 12 slots = 3 blocks
    a = make_seq("a", 5, max_tokens=8, budget=HeadBudget(sink=4, recent=8, select=4), selecting=True)
    sched.add(a)
    out = sched.schedule()
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 5)]
    assert a.kv.compact_in_place and sum(len(r) for r in a.kv.reserve) == HEADS * 1
    assert a.kv.peak_blocks == 8 + 4 and sched.kv_manager.num_free == 40 - 12
    census = sched.kv_manager.census([a.kv])
    assert census == {"held": 12, "evictable": 0, "free": 28}


def test_select_heads_reserve_their_whole_layout_with_prefix_caching():
    sched = create_scheduler(num_blocks=40, prefix_caching=True)
    a = make_seq("a", 5, max_tokens=8, budget=HeadBudget(sink=4, recent=8, select=4), selecting=True)
    sched.add(a)
    run_step(sched)  # the prompt, then compaction into the reserved blocks
    assert not a.needs_selection() and sum(len(r) for r in a.kv.reserve) == 0
    assert held(a) == HEADS * 3  # sink + ring in 3 private blocks per head
    # the prompt's named block per head stays cached (evictable); its partial block is free
    assert sched.kv_manager.census([a.kv]) == {"held": 12, "evictable": 4, "free": 24}
    assert a.kv.peak_blocks == 8 + 12


def test_a_prompt_that_repeats_a_cached_prefix_starts_after_its_whole_blocks():
    sched = create_scheduler(num_blocks=40, prefix_caching=True)
    a = make_seq("a", 13, arrival=0)
    sched.add(a)
    run_step(sched)  # a computes 13 positions: 3 whole blocks are named
    b = make_seq("b", 13, arrival=1)
    sched.add(b)
    out = run_step(sched)
    # b reuses blocks 0..2 of every head and computes its last prompt token only
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 1), ("b", 1)]
    assert b.num_cached_tokens == 12 and held(b) == 16
    assert (sched.kv_manager.prefix_cache.queries, sched.kv_manager.prefix_cache.hits) == (26, 12)
    assert sched.kv_manager.census([a.kv, b.kv])["held"] == 16 + 4  # 12 blocks shared


def test_a_different_prompt_gets_no_hit():
    sched = create_scheduler(num_blocks=40, prefix_caching=True)
    sched.add(make_seq("a", 13))
    run_step(sched)
    b = make_seq("b", 13, first_token=200, arrival=1)
    sched.add(b)
    run_step(sched)
    assert b.num_cached_tokens == 0 and b.num_computed_tokens == 13


def test_abort_frees_a_running_request_and_drops_a_waiting_one():
    sched = create_scheduler(num_blocks=12)
    a, b = make_seq("a", 10, arrival=0), make_seq("b", 10, arrival=1)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert sched.abort("b") is b and list(sched.waiting) == []  # never held a block
    assert sched.kv_manager.num_free == 0
    assert sched.abort("a") is a and not a.has_kv and sched.kv_manager.num_free == 12
    assert sched.abort("nobody") is None and not sched.has_unfinished()
