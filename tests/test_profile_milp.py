"""The MoA rule MILP: density bound, rules per layer, and the optimum on small problems."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from headwise.kvcache.milp import InfeasibleRules, band_density, solve_rules


def brute_force(cost, density, layer_of, bound, max_rules):
    best, best_choice = np.inf, None
    h, r = cost.shape
    for choice in itertools.product(range(r), repeat=h):
        if any(len({choice[i] for i in range(h) if layer_of[i] == l}) > max_rules for l in set(layer_of)):
            continue
        if any(np.mean([density[choice[i], n] for i in range(h)]) > bound + 1e-9 for n in range(density.shape[1])):
            continue
        total = sum(cost[i, choice[i]] for i in range(h))
        if total < best - 1e-12:
            best, best_choice = total, choice
    return best, best_choice


@pytest.mark.parametrize("seed", range(4))
def test_milp_matches_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    h, r = 6, 4
    density = np.array([[0.1, 0.2], [0.3, 0.35], [0.6, 0.5], [1.0, 1.0]])  # cheaper rules are denser
    cost = rng.random((h, r)) * np.array([4, 2, 1, 0])  # full (rule 3) costs nothing
    layer_of = [0, 0, 0, 1, 1, 1]
    choice = solve_rules(cost, density, layer_of, bound=0.45, max_rules=2)
    best, _ = brute_force(cost, density, layer_of, 0.45, 2)
    assert sum(cost[i, choice[i]] for i in range(h)) == pytest.approx(best, abs=1e-6)
    for n in range(2):
        assert np.mean([density[choice[i], n] for i in range(h)]) <= 0.45 + 1e-9
    for layer in (0, 1):
        assert len({choice[i] for i in range(h) if layer_of[i] == layer}) <= 2


def test_rules_per_layer_binds():
    # every head wants its own rule; with one rule per layer the best is the shared cheapest
    cost = np.array([[0, 5, 5], [5, 0, 5], [5, 5, 0]], dtype=float)
    density = np.full((3, 1), 0.1)
    assert solve_rules(cost, density, [0, 0, 0], bound=1.0, max_rules=1) in ([0, 0, 0], [1, 1, 1], [2, 2, 2])
    assert solve_rules(cost, density, [0, 1, 2], bound=1.0, max_rules=1) == [0, 1, 2]


def test_density_bound_picks_the_head_that_needs_full():
    # two heads, one full allowed on average: the head losing most without it keeps it
    cost = np.array([[1.0, 0.0], [9.0, 0.0]])
    density = np.array([[0.0], [1.0]])
    assert solve_rules(cost, density, [0, 0], bound=0.5, max_rules=2) == [0, 1]


def test_infeasible_bound_is_refused():
    with pytest.raises(InfeasibleRules, match="density 0.05"):
        solve_rules(np.zeros((2, 1)), np.array([[0.5]]), [0, 0], bound=0.05, max_rules=2)


def test_band_density_counts_mask_entries():
    n, sink, span = 10, 2, 3
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    mask = (j <= i) & ((j < sink) | (j > i - span))
    assert band_density(sink, span, n) == pytest.approx(mask.sum() / (n * (n + 1) / 2))
    assert band_density(0, n, n) == 1.0
