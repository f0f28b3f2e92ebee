"""The multiple-choice knapsack problem (MCKP), solved exactly by dynamic programming
(docs/methods.md#plan-knapsack).

Items i = 1..n each take exactly one of their choices j, with integer cost w_ij >= 0 and error
e_ij; minimize sum_i e_i,j(i) subject to sum_i w_i,j(i) <= W. The recursion over the items
(Sinha & Zoltners 1979, "The multiple-choice knapsack problem", Operations Research 27(3), sec. 1;
Kellerer, Pferschy & Pisinger 2004, "Knapsack Problems", sec. 11.5, the DP of eq. 11.22):

    F_0(c) = 0,   F_i(c) = min_j F_{i-1}(c - w_ij) + e_ij   (infinite where c - w_ij < 0)

gives the optimum F_n(W) in O(W sum_i |J_i|) operations, vectorized over the capacities c. Real
costs (bits) are put on a grid by :func:`allocate`: each item's cheapest choice is paid first, and
the extra cost of the others is rounded up to the grid, so a grid-feasible choice is always
feasible in real bits.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

GRID = 20000  # capacity units of the real-cost grid (allocate)


def solve(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], capacity: int) -> list[int] | None:
    """The choice per item minimizing the total error with total cost <= ``capacity`` (integers),
    or None when even the cheapest choices exceed it. Ties go to the lower total cost."""
    if capacity < 0:
        return None
    W = int(capacity)
    best = np.zeros(W + 1)  # F_i(c): least error at total cost <= c
    picks = []
    for w, e in zip(costs, errors):
        w = np.asarray(w, dtype=np.int64)
        e = np.asarray(e, dtype=np.float64)
        candidates = np.full((len(w), W + 1), np.inf)
        for j, (wj, ej) in enumerate(zip(w, e)):
            if wj <= W:
                candidates[j, wj:] = best[: W + 1 - wj] + ej
        picks.append(candidates.argmin(0).astype(np.int32))
        best = candidates.min(0)
    if not math.isfinite(best[W]):
        return None
    # F_n is non-increasing in c: the least capacity reaching the optimum gives the cheapest optimum
    c = int(np.flatnonzero(best <= best[W])[0])
    choice = [0] * len(picks)
    for i in range(len(picks) - 1, -1, -1):
        choice[i] = int(picks[i][c])
        c -= int(costs[i][choice[i]])
    return choice


def allocate(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]], capacity: float,
             grid: int = GRID) -> list[int] | None:
    """:func:`solve` for real costs: None when the cheapest choices exceed ``capacity``; the
    per-item least error when it fits whole; else the DP over ``grid`` units of the capacity left
    after the cheapest choices, each extra cost rounded up (never over ``capacity``)."""
    cheapest = [min(w) for w in costs]
    base = sum(cheapest)
    if base > capacity:
        return None
    least = [int(np.lexsort((np.asarray(w), np.asarray(e)))[0]) for w, e in zip(costs, errors)]
    if sum(w[j] for w, j in zip(costs, least)) <= capacity:
        return least
    spare = capacity - base
    unit = spare / grid if spare > 0 else 1.0
    units = [[0 if x == c0 else max(1, math.ceil((x - c0) / unit)) for x in w]
             for w, c0 in zip(costs, cheapest)]
    return solve(units, errors, grid if spare > 0 else 0)
