"""``kvc analyze``: per-head spectra with random-matrix theory, outlier channels, pre- vs post-RoPE."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

import kvc

from ..console import err, out, printable, progress_task
from ..options import Device, Force, JsonOut, Layers
from ...io.atomic import check_outputs, emit_json
from ..lazy import LazyModule

if TYPE_CHECKING:
    from ...analysis.report import Report

reports = LazyModule("kvc.analysis.report")

NAME = "analyze"


def command(
    capture: Path = typer.Argument(..., help="A kvc capture file (from `kvc capture` or `kvc synth`)."),
    layers: Layers = "all",
    tensors: Optional[str] = typer.Option(None, "--tensors", help="Comma list of k_pre, k, v (default: those in the file)."),
    block: Optional[int] = typer.Option(None, "--block", help="Analyze blocks of N consecutive tokens of each sequence (eOptShrinkQ uses 128)."),
    per_seq: bool = typer.Option(False, "--per-seq", help="One matrix per sequence instead of pooling the sequences."),
    rank_rule: str = typer.Option("eoptshrinkq", "--rank-rule", help="eoptshrinkq | matlab (eOptShrink v5, 1.1 edge factor)."),
    outlier_factor: float = typer.Option(6.0, "--outlier-factor", help="Outlier channel: RMS above this many times the median channel RMS."),
    outlier_topk: Optional[int] = typer.Option(None, "--outlier-topk", help="Flag the K channels of largest RMS instead."),
    json_path: JsonOut = None,
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write PNG figures into this directory."),
    device: Device = "auto",
    force: Force = False,
) -> None:
    """Spectra, rank, shrinkage and outlier channels of every (layer, KV head) of a capture."""
    plot_paths = []
    if plots:
        from ...analysis.plots import PLOT_FILES  # matplotlib only when asked for

        plot_paths = [plots / name for name in PLOT_FILES]
    check_outputs([json_path, *plot_paths], force, inputs=[capture])
    with progress_task("analyzing") as progress:
        report = kvc.analyze(capture, layers=layers, tensors=tensors, block=block, per_seq=per_seq,
                             rank_rule=rank_rule, outlier_factor=outlier_factor, outlier_topk=outlier_topk,
                             device=device, progress=progress)
    console = err if json_path == "-" else out
    print_summary(console, report, report.tensors)
    emit_json(json_path or None, report.to_json(), force, indent=None)
    if json_path not in (None, "", "-"):
        console.print(f"wrote {json_path}")
    if plots:
        console.print(f"wrote {', '.join(str(p) for p in report.plot(plots, force))}")


def _outlier_cell(cell: dict) -> str:
    """'3' records with outliers, '3+2b' when 2 records also hold a band."""
    bands = cell["records_with_bands"]
    return f"{cell['records_with_outliers']}" + (f"+{bands}b" if bands else "")


def _flagged(record: dict) -> str:
    """'3,17, ch 40-47 (band, 8 channels)': isolated outlier channels, then bands; '-' for none."""
    parts = [",".join(map(str, record["outlier_channels"]))] if record["outlier_channels"] else []
    return ", ".join(parts + [reports.band_label(b) for b in record["bands"]]) or "-"


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_latent(console: Console, s: dict) -> None:
    """Per layer: the rank of the joint [K | V] over all KV heads at each energy share and the fp16
    bytes per token of a latent of that dimension (docs/analyze.md#mla-style-latent)."""
    lat = s["latent"]
    shares = "/".join(f"{e:.0%}" for e in lat["energy"])
    table = Table(title=f"MLA-style latent: rank of the joint [{lat['keys']} | v] of all KV heads (width "
                        f"{lat['width']}) at {shares} energy, fp16 bytes per token against the full K/V")
    for col in ("layer", f"rank {shares}", f"bytes {shares}", "full"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in s["per_layer"]:
        r = row["latent"]
        table.add_row(str(row["layer"]), "/".join(map(str, r["rank"])), "/".join(map(str, r["bytes_per_token"])),
                      str(r["bytes_per_token_full"]))
    table.add_row("all", "median " + "/".join(f"{x:g}" for x in lat["median_rank"]),
                  "/".join(map(str, lat["bytes_per_token"])), str(lat["bytes_per_token_full"]))
    console.print(table)


def print_summary(console: Console, report: Report, tensors: list[str]) -> None:
    s = report.summary
    console.print(Text.assemble(("kvc analyze", "bold"), printable(
        f" {s['capture']} ({s['model']}): {len(s['layers'])} layers, {s['mode']}, n x d = {s['n']} x {s['d']}, "
        f"{s['rank_rule']} rule, {s['seconds']:.1f} s")))
    table = Table(title="per layer (medians over heads): rank, energy share rho of the low-rank part, "
                        "predicted bits/entry saved; records with outlier channels (+Nb: with a band)")
    table.add_column("layer", justify="right")
    for name in tensors:
        table.add_column(f"{name}\nrank  rho   bits", justify="right", no_wrap=True)
    table.add_column("outliers\n" + "/".join(tensors), justify="right", no_wrap=True)
    for row in s["per_layer"]:
        cells = [str(row["layer"])]
        for name in tensors:
            c = row[name]
            cells.append(f"{_fmt(c['median_rank'], 'g'):>4} {_fmt(c['median_energy_lowrank'], '.0%'):>4} "
                         f"{_fmt(c['median_predicted_bit_saving'], '+.2f'):>6}")
        cells.append("/".join(_outlier_cell(row[name]) for name in tensors))
        table.add_row(*cells)
    console.print(table)
    if s["latent"]:
        print_latent(console, s)
    worst = Table(title="heads with the least to gain (lowest predicted bit saving)")
    cols = ["layer", "head", "tensor"] + (["seq"] if s["mode"] != "pooled" else []) + \
        (["block"] if s["mode"].startswith("block") else []) + ["rank", "rho", "bits", "max RMS/med", "outliers"]
    for col in cols:
        worst.add_column(col, justify="left" if col in ("tensor", "outliers") else "right")
    for r in s["worst_heads"]:
        values = {"layer": str(r["layer"]), "head": str(r["head"]), "tensor": r["tensor"], "seq": str(r["seq"]),
                  "block": str(r["block"]), "rank": str(r["rank"]), "rho": _fmt(r["energy_lowrank"], ".0%"),
                  "bits": _fmt(r["predicted_bit_saving"], "+.2f"), "max RMS/med": _fmt(r["max_rms_ratio"], ".1f"),
                  "outliers": _flagged(r)}
        worst.add_row(*(values[c] for c in cols))
    console.print(worst)
    console.print(Panel(s["reading"], title="reading", expand=False))
