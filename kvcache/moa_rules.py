"""MoA's rule grid and its MILP: one (alpha, beta) band per KV head under a density bound.

`headwise profile moa` measures the per-head rule costs; this module turns saved costs into
a plan for any density bound, so `plan ratio` on a moa plan re-solves without the model.
"""

from __future__ import annotations

import numpy as np

from headwise.kvcache.milp import band_density, solve_rules
from headwise.kvcache.plan_build import plan_source
from headwise.kvcache.plans import FULL, HeadSpec, Plan, PlanError

ALPHAS = (0, 64, 128, 256, 512, 1024)
BETAS = tuple(k / 8 for k in range(9))  # multiples of 0.125, as MoA's grid


def rules() -> list[tuple[float, float]]:
    return [(a, b) for a in ALPHAS for b in BETAS if a + b > 0]


def plan_for_density(shape, params: dict, density: float, name: str) -> tuple[Plan, str]:
    """Solve the MILP of a profile (`params`: lengths, sink, rules_per_layer, rule_costs) for
    one density bound: `profile moa` and `plan ratio` on a moa plan both end here."""
    lengths, sink, max_rules = params["lengths"], params["sink"], params["rules_per_layer"]
    rule_list = rules()
    cost = np.array(params["rule_costs"], dtype=np.float64)
    if cost.shape != (shape.layers * shape.kv_heads, len(rule_list)):
        raise PlanError(
            f"moa rule_costs: expected {shape.layers * shape.kv_heads} x {len(rule_list)}, "
            f"got {' x '.join(map(str, cost.shape))}"
        )
    dens = np.array([[band_density(sink, a + b * n, n) for n in lengths] for a, b in rule_list])
    layer_of = [l for l in range(shape.layers) for _ in range(shape.kv_heads)]
    choice = solve_rules(cost, dens, layer_of, density, max_rules)
    heads = []
    for l in range(shape.layers):
        row = []
        for j in range(shape.kv_heads):
            alpha, beta = rule_list[choice[l * shape.kv_heads + j]]
            row.append(FULL if beta >= 1 else HeadSpec("elastic", sink=sink, alpha=float(alpha), beta=float(beta)))
        heads.append(row)
    # a head's score: the share of its influence a sink + 256 band would drop, mean over lengths
    ref = rule_list.index((256, 0.0))
    scores = [
        [round(float(cost[l * shape.kv_heads + j, ref]), 6) for j in range(shape.kv_heads)] for l in range(shape.layers)
    ]
    mean_density = [float(np.mean([dens[choice[i], c] for i in range(len(choice))])) for c in range(len(lengths))]
    params = {
        **params,
        "density": density,
        "alphas": list(ALPHAS),
        "betas": list(BETAS),
        "mean_density": [round(d, 4) for d in mean_density],
        "cost": round(float(sum(cost[i, choice[i]] for i in range(len(choice)))), 6),
    }
    plan = Plan(name, shape, heads, scores, plan_source("moa", params))
    note = (
        "mean density "
        + ", ".join(f"{d:.3f}@{n}" for d, n in zip(mean_density, lengths))
        + f", {len(set(choice))} distinct rules"
    )
    return plan, note
