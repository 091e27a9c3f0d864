"""Select heads prefill with a bounded peak (kvcache/prefill_selection.py): the shipped plans'
prefill peak is a fraction of full's, the engine holds what the formula says, outputs equal
the whole-prompt path where the selection is the same by construction, nothing leaks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headwise.engine.sampling_params import SamplingParams
from headwise.kvcache.budget import HeadBudget, candidate_capacity, candidates_kept
from headwise.kvcache.manager import KVCacheManager
from headwise.kvcache.plans import FULL, HeadSpec, ModelShape, Plan, full_plan, load_plan, save_plan
from headwise.kvcache.prefill_selection import candidate_ranks, scattered_scores
from headwise.kvcache.request_blocks import bounded_prefill, request_blocks
from headwise.kvcache.selection import middle_scores
from headwise.kvcache.sharding import contiguous
from headwise.kvcache.shipped_plans import shipped_plans

BS = 16
SELECT = HeadSpec("select", sink=4, recent=20, select=12, window=8)


@pytest.mark.parametrize("prompt_len", [4096, 8192])
@pytest.mark.parametrize("name", ["retrieval-20", "duo-10"])
def test_shipped_select_plans_peak_at_most_040_of_full(name, prompt_len):
    """The prefill peak (blocks a request holds at its most, prompt in 2048-token chunks,
    128 new tokens) with the default margin 2, against full's; decode KV unchanged."""
    plan = load_plan(shipped_plans("smollm2-135m")[name])
    full = request_blocks(full_plan(plan.model), prompt_len, 128, BS, 2048, prefix_caching=False).max(axis=0)
    bounded = request_blocks(plan, prompt_len, 128, BS, 2048, prefix_caching=False, margin=2.0).max(axis=0)
    whole = request_blocks(plan, prompt_len, 128, BS, 2048, prefix_caching=False, margin=0.0).max(axis=0)
    assert bounded[0] <= 0.40 * full[0], (bounded, full)
    assert whole[0] > full[0] * 0.5  # what the whole-prompt path held at its peak
    assert bounded[1] == whole[1]  # what the request holds while decoding does not change


def test_candidates_kept_counts_sinks_candidates_and_recent():
    b = HeadBudget(sink=4, recent=20, select=12)
    # 2 x 12 candidates: all positions while they fit, then 4 + 24 + 20
    assert [candidates_kept(b, 2.0, e) for e in (0, 3, 4, 24, 48, 49, 500)] == [0, 3, 4, 24, 48, 48, 48]
    assert candidate_capacity(b, 500, 600, 2.0) == 48
    assert candidate_capacity(b, 30, 600, 2.0) == 30  # a short prompt: all of it
    # shorter still: sinks and the ring decoding fills (what it keeps after the prompt)
    assert candidate_capacity(b, 20, 600, 2.0) == 4 + 20
    assert candidate_capacity(b, 20, 22, 2.0) == 22


def test_scattered_scores_equal_middle_scores_with_every_key():
    torch.manual_seed(0)
    q, k = torch.randn(8, 6, 16), torch.randn(50, 2, 16)
    q_pos = torch.arange(42, 50)
    want = middle_scores(q, q_pos, k, 0.25)
    got = scattered_scores(q, q_pos, k.transpose(0, 1), torch.arange(50).expand(2, -1), 50, 0.25)
    assert torch.equal(got, want)
    # without some keys: those positions score 0 before pooling, the others see a smaller softmax
    part = torch.tensor([0, 1, 5, 9, 30, 41, 42, 49])
    got = scattered_scores(q, q_pos, k[part].transpose(0, 1), part.expand(2, -1), 50, 0.25)
    assert got.shape == (2, 50) and (got[:, 15:25] == 0).all()


def test_candidates_between_chunks_are_the_best_by_scores_or_by_a_low_key_norm():
    """A head holds positions 0..9 of 12 (10 and 11 dropped by an earlier chunk). The chunk's
    window scores rank 0 and 9 best; the keys' norms rank 2 and 8 smallest. Each position
    takes the better of its two ranks over the 12 (dropped positions rank lowest by norm), so
    the best 4 held positions are those two pairs: the needle at 2 stays although its score
    is the lowest but for the dropped ones."""
    scores = torch.tensor([[0.9, 0.1, 0.05, 0.5, 0.6, 0.2, 0.3, 0.7, 0.4, 0.8, 0.0, 0.0]])
    norms = torch.tensor([5.0, 4.0, 0.1, 3.0, 6.0, 7.0, 8.0, 9.0, 2.0, 10.0])
    keys = (norms / 2)[None, :, None].expand(1, 10, 4)  # 4 equal components: L2 norm = norms
    ranks = candidate_ranks(scores, keys, torch.arange(10)[None])
    assert torch.equal(ranks, torch.tensor([[11.0, 8, 11, 9, 8, 5, 5, 9, 10, 10, 0, 1]]))
    assert sorted(ranks[0, :10].topk(4).indices.tolist()) == [0, 2, 8, 9]


def _select_plan(shape) -> Plan:
    heads = [[FULL if (l * shape.kv_heads + h) % 3 == 0 else SELECT for h in range(shape.kv_heads)] for l in range(2)]
    return Plan("sel", shape, heads)


def test_manager_lays_out_bounded_heads_at_admission_and_keeps_the_ring_after():
    """Model-free: bounded heads take their candidate blocks when admitted, never grow with
    the prompt, and keep their compacted blocks once it ends; no block leaks."""
    shape = ModelShape(layers=2, kv_heads=3, heads=9, head_dim=8)
    plan = _select_plan(shape)
    kv = KVCacheManager(2, shape.kv_heads, shape.head_dim, BS, 200, 1024, torch.float32)
    p, ctx = 300, 310
    budgets = [[SELECT_BUDGET if s.kind == "select" else HeadBudget() for s in row] for row in plan.heads]
    pending = np.array([[s.kind == "select" for s in row] for row in plan.heads])
    bounded = bounded_prefill(plan, p, ctx, 2.0, contiguous(shape, 1).order)
    tables = kv.new_tables(budgets, pending, ctx, bounded)
    n_sel, n_full = int(pending.sum()), int((~pending).sum())
    assert kv.can_admit(tables, p, 64, np.zeros(0, dtype=np.int32))
    kv.admit(tables, np.zeros(0, dtype=np.int32))
    assert tables.num_blocks_held == n_sel * 3  # 48 slots each
    for end in (64, 128, 192, 256, 300):
        assert kv.can_grow(tables, end)
        kv.grow(tables, end)
        assert tables.num_blocks_held == n_sel * 3 + n_full * -(-end // BS)
        kv.finish_step(tables, end)
    kv.finish_bounded(tables)
    assert not tables.pending.any()
    # sink 4 + select 12 + ring 20 = 36 slots: 3 blocks, the candidates' room given back
    assert tables.num_blocks_held == n_sel * 3 + n_full * -(-300 // BS)
    assert tables.peak_blocks == n_sel * 3 + n_full * -(-300 // BS)
    assert kv.census([tables])["held"] == tables.num_blocks_held
    kv.free(tables)
    assert kv.census([])["held"] == 0


SELECT_BUDGET = HeadBudget(sink=4, recent=20, select=12)


@pytest.fixture(scope="module")
def select_paths(engine, tmp_path_factory):
    shape = engine.model_config.shape
    heads = [[FULL if (l * shape.kv_heads + h) % 3 == 0 else SELECT for h in range(shape.kv_heads)] for l in range(30)]
    d = tmp_path_factory.mktemp("bounded_plans")
    save_plan(Plan("select", shape, heads), d / "select.json")
    return {"select": str(d / "select.json")}


def _run(make_engine, paths, prompt, margin: float, chunk: int, **kw):
    eng = make_engine(plans=paths, select_margin=margin, max_num_batched_tokens=chunk, **kw)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    out = eng.generate([prompt], params, "select")[0]
    assert eng.block_census()["held"] == 0
    return eng, out


@pytest.mark.parametrize("prompt_len, chunk", [(300, 4096), (40, 16)])
def test_bounded_outputs_equal_the_whole_prompt_path_where_the_selection_is_the_same(
    make_engine, select_paths, tok, prompt_len, chunk
):
    """One chunk: every query sees the whole prompt in its forward and the last queries score
    every key, so the kept tokens and the outputs are the whole-prompt path's. A prompt
    within the candidates' room (4 + 24 + 20 = 48 slots) in chunks of 16: likewise."""
    prompt = tok("The clockmaker counted seconds, minutes and hours by the river. " * 40)["input_ids"][:prompt_len]
    _, whole = _run(make_engine, select_paths, prompt, 0.0, chunk)
    eng, bounded = _run(make_engine, select_paths, prompt, 2.0, chunk)
    assert bounded.token_ids == whole.token_ids
    torch.testing.assert_close(
        torch.tensor([lp.logprob for lp in bounded.logprobs]),
        torch.tensor([lp.logprob for lp in whole.logprobs]),
        atol=1e-4,
        rtol=0,
    )
    assert bounded.kv_bytes_decode == whole.kv_bytes_decode
    peak, end = request_blocks(eng.plans["select"], prompt_len, 12, BS, chunk, prefix_caching=False, margin=2.0).max(
        axis=0
    )
    assert (bounded.kv_bytes, bounded.kv_bytes_decode) == (
        peak * eng.kv_manager.block_bytes,
        end * eng.kv_manager.block_bytes,
    )
    if prompt_len == 300:  # 20 select heads hold 48 slots (3 blocks) instead of the prompt's 19 blocks
        assert bounded.kv_bytes < 0.5 * whole.kv_bytes


def test_bounded_prefill_in_many_chunks_holds_the_formula_and_leaks_nothing(make_engine, select_paths, tok):
    """Chunks of 64 over a 300-token prompt: the heads keep candidates between chunks (the
    outputs may differ from the whole-prompt path's), a one-token last chunk included."""
    prompt = tok("A ferry crosses the bay twice a day with cars, bikes and sheep. " * 30)["input_ids"][:301]
    eng, out = _run(make_engine, select_paths, prompt, 2.0, 60)
    peak, end = request_blocks(eng.plans["select"], 301, 12, BS, 60, prefix_caching=False, margin=2.0).max(axis=0)
    assert (out.kv_bytes, out.kv_bytes_decode) == (peak * eng.kv_manager.block_bytes, end * eng.kv_manager.block_bytes)
    assert len(out.token_ids) == 12
    assert eng.stats().num_free_blocks == eng.stats().num_blocks - eng.block_census()["evictable"]
