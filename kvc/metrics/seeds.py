"""Seed noise: a method run with several seeds, each metric as the mean and its Student-t confidence
interval over the seeds (``--seeds N`` of ``kvc compress`` and ``kvc sweep``; docs/methods.md#seed-noise).
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Sequence

from ..errors import KvcError

LEVEL = 0.95


def mean_ci(values: Sequence[float | None], level: float = LEVEL) -> dict[str, float | int | None]:
    """Mean of the values (None ignored) and the two-sided ``level`` Student-t interval around it,
    mean +- t_{(1+level)/2, n-1} s / sqrt(n) with s the sample standard deviation (Student 1908;
    ``scipy.stats.t``); the interval is None for fewer than two values."""
    xs = [float(x) for x in values if x is not None]
    if not xs:
        return {"mean": None, "half_width": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return {"mean": mean, "half_width": None, "ci_low": None, "ci_high": None, "n": 1}
    from scipy.stats import t as student  # scipy only when there are seeds to combine

    half = float(student.ppf((1 + level) / 2, len(xs) - 1)) * statistics.stdev(xs) / math.sqrt(len(xs))
    return {"mean": mean, "half_width": half, "ci_low": mean - half, "ci_high": mean + half, "n": len(xs)}


def combine(reports: Sequence[dict], seeds: Sequence[int], level: float = LEVEL) -> dict:
    """One ``kvc compress`` JSON from the runs of one method with ``seeds`` (one report each):
    ``summary`` and ``bits_per_entry`` are the means over the seeds, ``heads`` and everything else
    are the first seed's, and ``seeds`` holds the intervals:
    ``{"seeds", "level", "summary": {tensor: {metric: mean_ci}}}``."""
    first = reports[0]
    stats = {t: {m: mean_ci([r["summary"][t].get(m) for r in reports], level) for m in row}
             for t, row in first["summary"].items()}
    out = copy.deepcopy(first)
    out["summary"] = {t: {m: s["mean"] for m, s in row.items()} for t, row in stats.items()}
    out["bits_per_entry"] = statistics.fmean(r["bits_per_entry"] for r in reports)
    out["seeds"] = {"seeds": list(seeds), "level": level, "summary": stats}
    return out


def seed_list(seed: int, n: int) -> list[int]:
    """The seeds of ``--seeds n`` from ``--seed seed``: seed, seed + 1, ..., seed + n - 1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise KvcError(f"--seeds must be a positive integer, not {n!r}")
    return list(range(seed, seed + n))

