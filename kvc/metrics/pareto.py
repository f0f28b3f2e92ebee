"""Pareto fronts of error against bits per entry, and the bit saving of one method over another at
equal error (``kvc sweep``).

Views: ``k_pre`` = keys compressed before RoPE (runs with ``--keys pre``), ``k`` = keys compressed
after RoPE (``--keys post``), ``v`` = values (from the ``--keys post`` runs when a method has both).
On a key view the x axis is the keys' bits per entry for key metrics and the overall bits per entry
for attention metrics (K and V together); on ``v`` it is the values' bits per entry.

A run is one ``kvc compress --json`` result with its sweep labels: ``{"method", "bits", "keys",
"view", "values", "result"}``.
"""

from __future__ import annotations

import math

import numpy as np

VIEWS = ("k_pre", "k", "v")
KEY_METRICS = ("mse_rel", "ip_bias_rel", "ip_slope", "ip_rmse_rel")
ATTENTION_METRICS = ("attn_logit_rmse", "attn_kl", "attn_out_rel", "attn_topk_overlap")
# metric -> (axis label, error transform: lower is better after it)
METRICS = {
    "mse_rel": ("relative MSE", lambda x: x),
    "ip_bias_rel": ("|inner-product bias| / mean |<q,k>|", abs),
    "ip_slope": ("|1 - inner-product slope|", lambda x: abs(1 - x)),
    "ip_rmse_rel": ("inner-product RMSE (relative)", lambda x: x),
    "attn_logit_rmse": ("attention-logit RMSE", lambda x: x),
    "attn_kl": ("attention KL(p_hat || p)", lambda x: x),
    "attn_out_rel": ("attention-output error (relative)", lambda x: x),
    "attn_topk_overlap": ("1 - top-8 overlap", lambda x: 1 - x),
}

Point = tuple[float, float, float]  # (bits per entry, error, bits asked)


def view_tensor(view: str, metric: str) -> str:
    """The summary row a view reads a metric from: ``v``, ``k`` (key metrics) or ``kv``."""
    return "v" if view == "v" else ("k" if metric in KEY_METRICS else "kv")


def in_view(run: dict, view: str) -> bool:
    return run["view"] == view or (view == "v" and run["values"])


def view_points(runs: list[dict], view: str, metric: str, bound: str | None = None) -> dict[str, list[Point]]:
    """method -> [(bits per entry, error value, bits asked)] of the runs that belong to ``view``;
    ``bound`` ("ci_low" or "ci_high"): the error at that end of the run's interval over seeds
    (``kvc.metrics.seeds``) instead of its mean."""
    points: dict[str, list[Point]] = {}
    if view == "v" and metric != "mse_rel":
        return points
    tensor = view_tensor(view, metric)
    for run in runs:
        if not in_view(run, view):
            continue
        summary = run["result"]["summary"]
        value = summary[tensor].get(metric) if bound is None else \
            run["result"]["seeds"]["summary"][tensor].get(metric, {}).get(bound)
        if value is not None:
            points.setdefault(run["method"], []).append(
                (summary[tensor]["bits_per_entry"], METRICS[metric][1](value), run["bits"]))
    return {m: sorted(p) for m, p in points.items()}


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point beats in both bits and error (fewer bits first)."""
    front: list[Point] = []
    for p in sorted(points):
        if not front or p[1] < front[-1][1]:
            if front and p[0] == front[-1][0]:
                front.pop()
            front.append(p)
    return front


def bit_saving(points: list[Point], reference: list[Point]) -> list[dict]:
    """For each point, the reference's bits per entry at equal error (on the reference's Pareto
    front, interpolated linearly in bits against log error) and the saving; None outside its range."""
    front = [p for p in pareto_front(reference) if p[1] > 0][::-1]  # error increasing
    logs = np.log([p[1] for p in front])
    rows = []
    for b, e, asked in points:
        equal, outside = None, None
        if not front or e <= 0:
            outside = "no reference"
        elif math.log(e) < logs[0]:
            outside = "lower"  # better than the reference's best point
        elif math.log(e) > logs[-1]:
            outside = "higher"
        else:
            equal = float(np.interp(math.log(e), logs, [p[0] for p in front]))
        rows.append({"bits": asked, "bits_per_entry": b, "error": e, "reference_bits_per_entry": equal,
                     "saving": None if equal is None else equal - b, "outside": outside})
    return rows


def saving_bounds(rows: list[dict], low: dict[str, list[Point]], high: dict[str, list[Point]],
                  a: str, b: str) -> None:
    """Add to each row of ``bit_saving(a's means, b's means)`` the saving's bounds over the seeds'
    intervals (``low``/``high``: the points at the ends of each run's interval): ``saving_low`` takes
    a at the top of its interval against b's front at the bottom of b's, ``saving_high`` the reverse
    (None outside the range); ``ci_overlap``: the bounds do not exclude 0, so the seeds do not tell
    the two methods apart at that point (docs/methods.md#seed-noise)."""
    lows = {r["bits"]: r["saving"] for r in bit_saving(high.get(a, []), low.get(b, []))}  # by bits asked
    highs = {r["bits"]: r["saving"] for r in bit_saving(low.get(a, []), high.get(b, []))}
    for row in rows:
        lo, hi = lows.get(row["bits"]), highs.get(row["bits"])
        row["saving_low"], row["saving_high"] = lo, hi
        row["ci_overlap"] = lo is None or hi is None or lo <= 0 <= hi


def savings(runs: list[dict], pairs: list[tuple[str, str]]) -> dict[str, dict[str, list[dict]]]:
    """For each (method, reference) pair and view: bits saved at equal mse_rel (the means over seeds,
    with their bounds when the runs have several seeds)."""
    seeded = bool(runs) and all("seeds" in r["result"] for r in runs)
    out: dict[str, dict[str, list[dict]]] = {}
    for a, b in pairs:
        per_view = {}
        for view in VIEWS:
            points = view_points(runs, view, "mse_rel")
            if a in points and b in points:
                per_view[view] = bit_saving(points[a], points[b])
                if seeded:
                    saving_bounds(per_view[view], view_points(runs, view, "mse_rel", "ci_low"),
                                  view_points(runs, view, "mse_rel", "ci_high"), a, b)
        out[f"{a}_vs_{b}"] = per_view
    return out


def fronts(runs: list[dict]) -> dict[str, dict[str, dict[str, list[Point]]]]:
    """view -> metric -> method -> its Pareto front."""
    return {view: {metric: {m: pareto_front(p) for m, p in view_points(runs, view, metric).items()}
                   for metric in METRICS} for view in VIEWS}
