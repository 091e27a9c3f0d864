"""MoA's rule assignment as a mixed-integer program, solved by `scipy.optimize.milp` (HiGHS).

Choose one rule per head minimising the summed cost, with the mean density over heads at
most `bound` at every length, and at most `max_rules` distinct rules in any layer.
Variables: x[h, r] = head h uses rule r; y[l, r] = layer l uses rule r (x[h, r] <= y[l, r]).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix


class InfeasibleRules(ValueError):
    """No assignment meets the density bound (or the solver found none in time)."""


def solve_rules(
    cost: np.ndarray, density: np.ndarray, layer_of: list[int], bound: float, max_rules: int, time_limit: float = 120.0
) -> list[int]:
    """cost `[H, R]`, density `[R, N]` (rule r's density at length n) -> a rule index per head."""
    h, r = cost.shape
    layers = sorted(set(layer_of))
    nl = len(layers)
    lidx = {l: i for i, l in enumerate(layers)}
    nx, ny = h * r, nl * r
    c = np.concatenate([cost.reshape(-1), np.zeros(ny)])
    rows, cols, vals, lo, hi = [], [], [], [], []
    row = 0

    def add(entries: list[tuple[int, float]], lower: float, upper: float) -> None:
        nonlocal row
        for col, v in entries:
            rows.append(row)
            cols.append(col)
            vals.append(v)
        lo.append(lower)
        hi.append(upper)
        row += 1

    for i in range(h):  # one rule per head
        add([(i * r + k, 1.0) for k in range(r)], 1, 1)
    for i in range(h):  # a head's rule is one of its layer's rules
        for k in range(r):
            add([(i * r + k, 1.0), (nx + lidx[layer_of[i]] * r + k, -1.0)], -np.inf, 0)
    for li in range(nl):
        add([(nx + li * r + k, 1.0) for k in range(r)], -np.inf, max_rules)
    for n in range(density.shape[1]):  # mean density over heads at each length
        add([(i * r + k, float(density[k, n])) for i in range(h) for k in range(r)], -np.inf, bound * h)
    a = coo_matrix((vals, (rows, cols)), shape=(row, nx + ny)).tocsr()
    res = milp(
        c,
        constraints=LinearConstraint(a, lo, hi),
        integrality=np.ones(nx + ny),
        bounds=Bounds(0, 1),
        options={"time_limit": time_limit, "disp": False},
    )
    if res.x is None:
        raise InfeasibleRules(
            f"no rule assignment meets density {bound} with at most {max_rules} rules per layer ({res.message})"
        )
    x = res.x[:nx].reshape(h, r)
    return [int(k) for k in x.argmax(1)]


def band_density(sink: int, span: float, n: int) -> float:
    """Fraction of the n(n+1)/2 causal entries a sink + band(span) mask keeps: query i sees
    j < sink or i - span < j <= i (docs/design.md, "KV cache")."""
    s = int(min(max(span, 0), n))
    i = np.arange(n)
    recent = np.minimum(s, i + 1)
    sinks = np.clip(np.minimum(sink, i + 1 - s), 0, None)
    return float((recent + sinks).sum() / (n * (n + 1) / 2))
