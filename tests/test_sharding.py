"""Head-balanced tensor-parallel sharding: every rank gets the same number of full heads
(within one) and about the same blocks; contiguous sharding can put them all on one rank."""

from __future__ import annotations

import pytest

from headwise.kvcache.plans import FULL, DynamicSpec, HeadSpec, ModelShape, Plan
from headwise.kvcache.sharding import ShardingError, balanced, contiguous, imbalance, rank_blocks

SHAPE = ModelShape(layers=6, kv_heads=4, heads=8, head_dim=16)
WINDOW = HeadSpec("window", sink=16, recent=48)  # 4 blocks of 16


def _plan(full_heads: set[tuple[int, int]]) -> Plan:
    heads = [[FULL if (l, h) in full_heads else WINDOW for h in range(SHAPE.kv_heads)] for l in range(SHAPE.layers)]
    return Plan("planted", SHAPE, heads)


def test_contiguous_sharding_takes_consecutive_heads():
    s = contiguous(SHAPE, 2)
    assert s.heads_of(0) == [[0, 1]] * 6 and s.heads_of(1) == [[2, 3]] * 6 and s.is_contiguous


def test_balanced_sharding_spreads_full_heads_that_cluster_on_one_rank():
    # every layer's full heads are heads 0 and 1: contiguous puts all 12 on rank 0
    plan = _plan({(l, h) for l in range(6) for h in (0, 1)})
    ctx = 1024  # full head 64 blocks, window head 4
    contig = rank_blocks(plan, contiguous(SHAPE, 2), ctx)
    assert contig == [6 * 2 * 64, 6 * 2 * 4]
    s = balanced(plan, 2, ctx)
    per_rank = rank_blocks(plan, s, ctx)
    assert per_rank == [6 * (64 + 4)] * 2
    assert imbalance(per_rank) == 1.0 and imbalance(contig) == pytest.approx(768 / 408)
    for r in range(2):  # one full head per layer on each rank
        assert all(sum(plan.heads[l][h].kind == "full" for h in row) == 1 for l, row in enumerate(s.heads_of(r)))
    # a permutation of every layer's heads
    assert all(sorted(row) == [0, 1, 2, 3] for row in s.order)


def test_odd_full_heads_alternate_between_ranks_across_layers():
    plan = _plan({(l, 0) for l in range(6)})  # one full head per layer: 3 per rank balanced
    s = balanced(plan, 2, 1024)
    fulls = [sum(plan.heads[l][h].kind == "full" for l, row in enumerate(s.heads_of(r)) for h in row) for r in range(2)]
    assert fulls == [3, 3]
    assert rank_blocks(plan, s, 1024) == [3 * 64 + 9 * 4] * 2


def test_heads_that_do_not_divide_are_refused_with_the_reason():
    with pytest.raises(ShardingError, match=r"4 KV heads and 8 query heads per layer must both divide by it"):
        balanced(_plan(set()), 3, 1024)


def test_dynamic_plans_keep_contiguous_sharding():
    plan = Plan(
        "dyn",
        SHAPE,
        [[FULL] * 4 for _ in range(6)],
        dynamic=DynamicSpec(0.25, HeadSpec("select", sink=4, recent=16, select=16, window=8)),
    )
    assert balanced(plan, 2, 1024).is_contiguous


def test_plan_show_prints_per_rank_bytes_balanced_and_contiguous(capsys):
    """The shipped duo-10 plan at 4096 tokens over 3 ranks: its 9 full heads cluster (rank 0
    holds 4 of them contiguously); balanced gives each rank 3."""
    from headwise.clients.cli import main
    from headwise.kvcache.shipped_plans import shipped_plans

    assert main(["plan", "show", str(shipped_plans("smollm2-135m")["duo-10"]), "--context", "4096", "--tp", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == "tp 3 balanced: rank 0 13.6 MiB, rank 1 13.6 MiB, rank 2 13.6 MiB; largest / mean 1.000"
    assert lines[-1] == "tp 3 contiguous: rank 0 15.3 MiB, rank 1 11.9 MiB, rank 2 13.6 MiB; largest / mean 1.126"
    assert main(["plan", "show", str(shipped_plans("smollm2-135m")["duo-10"]), "--tp", "2"]) == 2
