"""Step inputs on hand-built tables: slots, lengths and the packed step plan, no model."""

from __future__ import annotations

import torch

from headwise.engine.step_inputs import GAP, KEEP, RING, SINK, build_step_inputs, flat_slots, head_lengths, head_slots
from headwise.kvcache.block_tables import PARAMS, DeviceTables
from headwise.kvcache.budget import HeadBudget
from tests.fake_kv import create_scheduler, make_seq, run_step

BS = 4


def params_of(gap: int = 0, ring: int = -1, sink: int = 0, keep: int = 0, n: int = 1) -> torch.Tensor:
    """`[P, L=1, N=n, Hkv=1]` per-head params, every token in the same row."""
    p = torch.zeros(len(PARAMS), 1, n, 1, dtype=torch.int64)
    p[GAP], p[RING], p[SINK], p[KEEP] = gap, ring, sink, keep
    return p


def test_positional_heads_write_at_their_position_minus_the_gap():
    pos = torch.tensor([8, 9, 15])
    slots = head_slots(params_of(gap=1, n=3), pos, torch.full((3,), 16), BS)
    assert slots[0, :, 0].tolist() == [4, 5, 11]
    assert head_lengths(params_of(gap=1), torch.tensor([16]), BS)[0, :, 0].tolist() == [12]


def test_ring_heads_keep_sinks_then_wrap_recent_tokens_after_keep():
    # sink 2, keep 4 (2 sinks + 2 selected), ring of 3; a chunk writing positions 0..9
    pos = torch.arange(10)
    slots = head_slots(params_of(ring=3, sink=2, keep=4, n=10), pos, torch.full((10,), 10), BS)
    # sinks at 0, 1; positions 2..6 are overwritten later in the chunk (dropped); 7, 8, 9 wrap
    assert slots[0, :, 0].tolist() == [0, 1, -1, -1, -1, -1, -1, 6, 4, 5]
    lengths = head_lengths(params_of(ring=3, sink=2, keep=4, n=3), torch.tensor([1, 4, 10]), BS)
    assert lengths[0, :, 0].tolist() == [1, 6, 7]


def test_flat_slots_map_head_slots_through_the_row_to_pool_slots():
    dev = torch.zeros(1, 2, 1, 3, dtype=torch.int32)
    dev[0, 1, 0] = torch.tensor([5, 9, -1])  # row 1: blocks 5, 9, then a placeholder
    tables = DeviceTables(1, 2, 1, 3, torch.device("cpu"), host=dev, host_params=torch.zeros(len(PARAMS), 1, 2, 1))
    slot = torch.tensor([[[0], [6], [9], [-1]]])  # [L, N, Hkv]
    rows = torch.tensor([1, 1, 1, 1])
    out = flat_slots(tables, rows, slot, BS)
    assert out[0, :, 0].tolist() == [20, 38, -1, -1]  # block 5 slot 0, block 9 slot 2, placeholder, dropped


def test_a_step_plan_packs_prefill_chunks_before_decode_tokens():
    sched = create_scheduler(num_blocks=40, max_num_batched_tokens=16)
    a = make_seq("a", 6, arrival=0)
    sched.add(a)
    run_step(sched)  # a's prompt; a now decodes
    b = make_seq("b", 5, arrival=1, first_token=300, budget=HeadBudget(sink=0, recent=4))
    sched.add(b)
    out = sched.schedule()
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 1), ("b", 5)]
    plan, rows = build_step_inputs(out.scheduled, {})
    ids = [300, 301, 302, 303, 304, 7]  # b's chunk first, then a's sampled token
    assert plan.packed == ids + [b.kv.row, a.kv.row] + [0, 6] + [5, 1]
    assert (plan.num_tokens, plan.num_seqs, plan.num_prefill, plan.num_prefill_tokens) == (6, 2, 1, 5)
    assert (plan.max_seqlen, plan.has_cache, plan.all_full, plan.self_visible) == (5, False, False, True)
    assert [(r.seq.request_id, r.start, r.end, r.row) for r in rows] == [("b", 0, 5, 0), ("a", 6, 7, 5)]
    assert plan.width == 2  # a's 2 blocks per head; b's window keeps 2 of its 2
