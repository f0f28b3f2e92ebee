"""``kvc plan``: a method and bit width per (layer, K or V, KV head) within a memory budget (docs/plan.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich import box
from rich.table import Table

import kvc

from ..console import err, out, progress_task
from ..options import ComputeDtype, Device, Force, JsonOut, Layers, QueryStride
from ...errors import KvcError
from ...io.atomic import check_outputs, emit_json
from ..lazy import LazyModule
from .compress import fmt

sweeps = LazyModule("kvc.compression.sweep")

NAME = "plan"


def command(
    capture: str = typer.Argument(..., metavar="CAPTURE", help="Calibration capture (kvc capture): every candidate is measured on it."),
    budget: Optional[float] = typer.Option(None, "--budget", "-b", help="Average stored bits per K and V entry, fully counted as kvc compress counts them."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Instead of --budget: the KV cache's memory, e.g. 40GB (with --context, --batch, --model)."),
    model: Optional[str] = typer.Option(None, "--model", help="With --memory: the model whose geometry sizes the cache (as kvc budget; default: the default model)."),
    context: Optional[str] = typer.Option(None, "--context", help="With --memory: tokens per sequence (k = 1024), e.g. 32k."),
    batch: int = typer.Option(1, "--batch", help="With --memory: sequences held at once."),
    methods: str = typer.Option("eoptshrinkq,svdq,turboquant,kvquant,fp16", "--methods", help="Candidate per-tensor methods, comma-separated."),
    bits: str = typer.Option("1,2,2.5,3,4", "--bits", help="Candidate --bits values (a width a method cannot take is skipped)."),
    opt: List[str] = typer.Option([], "--opt", help="[method.]key=value passed to the candidates that have the option."),
    out_path: Path = typer.Option(Path("plan.toml"), "--out", "-o", help="The plan file to write (TOML, docs/plan.md)."),
    predict: bool = typer.Option(False, "--predict", help="Predict the errors of turboquant (whole bits), eoptshrinkq and svdq from the spectrum and one measured anchor per head instead of measuring them; then measure the plan and report the prediction error."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the heatmap of bits per layer and head (PNG)."),
    json_path: JsonOut = None,
    layers: Layers = "all",
    device: Device = "auto",
    dtype: ComputeDtype = "float32",
    query_stride: QueryStride = 1,
    force: Force = False,
) -> None:
    """Allocate a memory budget over layers, K/V and KV heads: the method and bit width of least
    predicted attention-output error per head, fully counted bits within the budget."""
    try:
        bit_values = sorted({float(b) for b in bits.split(",") if b.strip()})
    except ValueError:
        raise KvcError(f"--bits {bits!r}: expected comma-separated numbers") from None
    check_outputs([out_path, plot, json_path], force, inputs=[capture])
    with progress_task("plan") as progress:
        result = kvc.plan(capture, budget, memory=memory, model=model, context=context, batch=batch,
                          methods=methods, bits=bit_values, options=sweeps.parse_opts(opt), layers=layers,
                          device=device, dtype=dtype, query_stride=query_stride, predict=predict,
                          progress=progress)
    report = result.to_json()
    console = err if json_path == "-" else out
    console.print(layer_table(report))
    for line in summary_lines(report):
        console.print(line)
    result.save(out_path, force=force)
    console.print(f"wrote {out_path}")
    if plot is not None:
        console.print(f"wrote {result.plot(plot, force)}")
    emit_json(json_path, report, force)


def layer_table(report: dict) -> Table:
    """Bits per entry by layer (K, V, both) and the choices per head."""
    table = Table(title="kvc plan: bits per entry by layer", box=box.SIMPLE_HEAD)
    for col in ("layer", "K bits", "V bits", "bits", "K heads", "V heads"):
        table.add_column(col, justify="left" if "heads" in col else "right")
    for row in report["per_layer"]:
        labels = {t: ", ".join(h["label"] for h in report["heads"] if h["layer"] == row["layer"] and h["tensor"] == t)
                  for t in ("k", "v")}
        table.add_row(str(row["layer"]), f"{row['k_bits']:.2f}", f"{row['v_bits']:.2f}", f"{row['bits']:.2f}",
                      labels["k"], labels["v"])
    return table


def summary_lines(report: dict) -> list[str]:
    """The plan against every candidate applied uniformly, as predicted on the calibration capture."""
    lines = [f"plan: {report['bits_per_entry']:.4f} bits per entry (budget {report['budget']:.4g}), predicted "
             f"attn_out_rel {fmt(report['attn_out_rel'])}; "
             + ", ".join(f"{k} x{v}" for k, v in sorted(report["choices"].items(), key=lambda kv: -kv[1]))]
    within = [u for u in report["uniform"] if u["bits_per_entry"] <= report["budget"]]
    if within:
        best = min(within, key=lambda u: u["error"])
        lines.append(f"best uniform candidate within the budget: {best['label']} at {best['bits_per_entry']:.4f} bits "
                     f"per entry, predicted attn_out_rel {fmt(best['attn_out_rel'])}")
    p = report.get("prediction")
    if p:
        lines.append(f"predicted ({', '.join(p['predicted_candidates'])}) against measured on the plan: total error "
                     f"{p['predicted_error']:.4g} vs {p['measured_error']:.4g} ({p['error_rel']:+.1%}), bits per entry "
                     f"{p['predicted_bits_per_entry']:.4f} vs {p['measured_bits_per_entry']:.4f} "
                     f"({p['bits_rel']:+.2%}), rank correlation of the per-head errors {p['spearman']:.3f}")
    for s in report["skipped"]:
        lines.append(f"skipped {s['method']} --bits {s['bits']:g}: {s['reason']}")
    return lines
