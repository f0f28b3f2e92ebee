"""``kvc sweep``: methods x bit widths x key placement on one capture; Pareto fronts and bit savings.

Views: ``k_pre`` = keys compressed before RoPE (runs with ``--keys pre``), ``k`` = keys compressed
after RoPE (``--keys post``), ``v`` = values (from the ``--keys post`` runs when a method has both).
On a key view the x axis is the keys' bits per entry for key metrics and the overall bits per entry
for attention metrics (K and V together); on ``v`` it is the values' bits per entry.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import typer
from rich import box
from rich.table import Table

from ..capture_format import CaptureFile
from ..console import err, out, progress_bar
from ..errors import KvcError, MethodFailure
from ..fileio import check_writable, write_json
from ..models import resolve_device
from .compress import compute_dtype, convert, fmt, option_fields, select_layers

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


# ----------------------------------------------------------------------------- pure helpers


def view_points(runs: list[dict], view: str, metric: str) -> dict[str, list[tuple[float, float, float]]]:
    """method -> [(bits per entry, error value, bits asked)] of the runs that belong to ``view``."""
    points: dict[str, list[tuple[float, float, float]]] = {}
    for run in runs:
        if run["view"] != view and not (view == "v" and run["values"]):
            continue
        summary = run["result"]["summary"]
        tensor = "v" if view == "v" else ("k" if metric in KEY_METRICS else "kv")
        if view == "v" and metric != "mse_rel":
            continue
        value = summary[tensor].get(metric)
        if value is not None:
            points.setdefault(run["method"], []).append(
                (summary[tensor]["bits_per_entry"], METRICS[metric][1](value), run["bits"]))
    return {m: sorted(p) for m, p in points.items()}


def pareto_front(points: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """The points no other point beats in both bits and error (fewer bits first)."""
    front: list[tuple[float, float, float]] = []
    for p in sorted(points):
        if not front or p[1] < front[-1][1]:
            if front and p[0] == front[-1][0]:
                front.pop()
            front.append(p)
    return front


def bit_saving(points: list[tuple[float, float, float]], reference: list[tuple[float, float, float]]) -> list[dict]:
    """For each point, the reference's bits per entry at equal error (on the reference's Pareto
    front, interpolated linearly in bits against log error) and the saving; None outside its range."""
    front = [p for p in pareto_front(reference) if p[1] > 0][::-1]  # error increasing
    logs = np.log([p[1] for p in front])
    rows = []
    for b, e, asked in points:
        equal = None
        if e > 0 and front and logs[0] <= math.log(e) <= logs[-1]:
            equal = float(np.interp(math.log(e), logs, [p[0] for p in front]))
        rows.append({"bits": asked, "bits_per_entry": b, "error": e, "reference_bits_per_entry": equal,
                     "saving": None if equal is None else equal - b})
    return rows
