"""``kvc sweep``: methods x bit widths x key placement on one capture; Pareto fronts and bit savings.

The sweep is :func:`kvc.sweep` (:mod:`kvc.compression.sweep`, :mod:`kvc.metrics.pareto`); this
module prints its tables and writes sweep.json and the plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich import box
from rich.table import Table

import kvc

from ..console import err, out, progress_task
from ..options import ComputeDtype, Device, Force, Layers, MethodSeed, QueryStride, Seeds
from ...errors import KvcError, MethodFailure
from ...io.atomic import check_outputs
from .compress import fmt, pm
from ..lazy import LazyModule

pareto = LazyModule("kvc.metrics.pareto")
sweeps = LazyModule("kvc.compression.sweep")


# ----------------------------------------------------------------------------- output


def e2e_table(runs: list[dict], correlation: dict[str, float | None]) -> Table:
    """Per run: bits per entry, the tensor proxies and the end-to-end perplexity delta."""
    table = Table(title="end to end: the method's cache inside the model", box=box.SIMPLE_HEAD,
                  caption="Spearman rank correlation with the ppl delta: " + ", ".join(
                      f"{m} {fmt(c)}" for m, c in correlation.items()))
    for col in ("method", "bpe", "attn_out", "attn_kl", "ppl delta", "token KL", "top-1"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for r in runs:
        kv, e2e = r["result"]["summary"]["kv"], r["e2e"]
        label = f"{r['method']} {r['bits']:g}" + (f" {r['keys']}" if r["keys"] else "")
        table.add_row(label, f"{e2e['e2e_bits_per_entry']:.2f}",
                      fmt(kv["attn_out_rel"]), fmt(kv["attn_kl"]), f"{e2e['ppl_delta_rel']:+.1%}",
                      fmt(e2e["next_token_kl"]), f"{e2e['top1_agree']:.0%}")
    return table


def grid_table(runs: list[dict], view: str, metric: str, bits: list[float]) -> Table:
    """Methods x bits asked: the metric (raw value) @ bits per entry."""
    tensor = pareto.view_tensor(view, metric)
    table = Table(title=f"{view}: {metric} @ bits per entry", box=box.SIMPLE_HEAD)
    table.add_column("method")
    for b in bits:
        table.add_column(f"--bits {b:g}", justify="right")
    cells: dict[str, dict[float, str]] = {}
    for run in runs:
        if pareto.in_view(run, view):
            s = run["result"]["summary"][tensor]
            seeded = run["result"].get("seeds", {}).get("summary", {}).get(tensor, {}).get(metric)
            value = fmt(s.get(metric)) if seeded is None else pm(seeded)
            cells.setdefault(run["method"], {})[run["bits"]] = f"{value} @ {s['bits_per_entry']:.2f}"
    for method, row in cells.items():
        table.add_row(method, *(row.get(b, "-") for b in bits))
    return table


def _bounds(r: dict) -> str:
    """' (seed bounds -0.010..+0.050: within the seed noise)' with several seeds, else ''."""
    if "ci_overlap" not in r:
        return ""
    lo, hi = (f"{x:+.3f}" if x is not None else "?" for x in (r["saving_low"], r["saving_high"]))
    return f" (seed bounds {lo}..{hi}" + (": within the seed noise)" if r["ci_overlap"] else ")")


def saving_lines(saved: dict[str, dict[str, list[dict]]]) -> list[str]:
    lines = []
    for pair, per_view in saved.items():
        a, b = pair.split("_vs_")
        if not per_view:
            lines.append(f"{a} vs {b}: no view has runs of both")
        for view, rows in per_view.items():
            inside = [r for r in rows if r["saving"] is not None]
            for r in rows:
                head = f"{view}: {a} --bits {r['bits']:g} ({r['bits_per_entry']:.3f} bits/entry, mse {fmt(r['error'])})"
                if r["saving"] is None:
                    lines.append(f"{head}: {r['outside']} than every mse of {b}, no equal-mse point")
                else:
                    lines.append(f"{head}: {b} needs {r['reference_bits_per_entry']:.3f} at equal mse, "
                                 f"saving {r['saving']:+.3f} bits per entry" + _bounds(r))
            if inside:
                mean = sum(r["saving"] for r in inside) / len(inside)
                noisy = sum(bool(r.get("ci_overlap")) for r in inside)
                lines.append(f"{view}: mean bit saving of {a} over {b} at equal mse: {mean:+.3f} bits per entry "
                             f"({len(inside)} of {len(rows)} points inside {b}'s range"
                             + (f", {noisy} of them within the seed noise)" if "ci_overlap" in inside[0] else ")"))
    return lines


# ----------------------------------------------------------------------------- command

NAME = "sweep"


def command(
    capture: Path = typer.Argument(..., help="Capture file (kvc capture, kvc synth)."),
    methods: str = typer.Option("eoptshrinkq,svdq,turboquant,kivi,kvquant", "--methods", help="Comma list of methods with a --bits option."),
    bits: str = typer.Option("1,1.5,2,2.5,3,4", "--bits", help="Comma list of --bits values."),
    keys: str = typer.Option("pre,post", "--keys", help="Key placements to run: pre, post or both."),
    compare: str = typer.Option("eoptshrinkq:turboquant", "--compare", help="METHOD:REFERENCE pairs for the equal-mse bit saving."),
    opt: List[str] = typer.Option([], "--opt", help="[method.]key=value passed to the methods that have the option."),
    out_dir: Path = typer.Option(Path("sweep"), "--out-dir", "-o", help="Folder for sweep.json and the PNG plots."),
    device: Device = "auto",
    layers: Layers = "all",
    dtype: ComputeDtype = "float32",
    seed: MethodSeed = 0,
    seeds: Seeds = 1,
    query_stride: QueryStride = 1,
    e2e: bool = typer.Option(False, "--e2e", help="Also run each method inside the model (kvc eval's perplexity) and rank-correlate the proxies with it."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model for --e2e (required with it): the one whose cache the capture holds; hub id, local HF directory, GGUF file or SmolLM2-135M-Instruct for the default model."),
    force: Force = False,
) -> None:
    """Run methods x bit widths x key placement; print and plot Pareto fronts and bit savings."""
    try:
        bit_values = sorted({float(b) for b in bits.split(",") if b.strip()})
    except ValueError:
        raise KvcError(f"--bits {bits!r}: expected comma-separated numbers") from None
    check_outputs([out_dir / "sweep.json"] + [out_dir / f"pareto_{m}.png" for m in pareto.METRICS], force,
                  inputs=[capture])
    with progress_task("sweep") as progress:
        result = kvc.sweep(capture, methods=methods, bits=bit_values, keys=keys, compare=compare,
                           options=sweeps.parse_opts(opt), layers=layers, device=device, dtype=dtype, seed=seed,
                           query_stride=query_stride, e2e=e2e, model=model, seeds=seeds, progress=progress)
    runs = result.runs
    for metric, views in (("mse_rel", pareto.VIEWS), ("attn_out_rel", pareto.VIEWS[:2])):
        for view in views:
            if result.points(view, metric):  # a view with no runs (e.g. --keys pre only) is left out
                out.print(grid_table(runs, view, metric, bit_values))
    for s in result.skipped:
        err.print(f"skipped {sweeps.skip_reason(s)}")
    for line in saving_lines(result.savings):
        out.print(line)
    if result.e2e_rank_correlation is not None:
        out.print(e2e_table(runs, result.e2e_rank_correlation))
    result.save(out_dir, force)
    out.print(f"wrote {out_dir}/sweep.json and {len(pareto.METRICS)} Pareto plots")
    if result.failures:
        raise MethodFailure("; ".join(map(sweeps.skip_reason, result.failures)))
