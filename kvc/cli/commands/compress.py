"""``kvc compress``: one method over a capture; bits per entry and fidelity per layer and head.

Method options come from the method's ``Options`` dataclass: ``--group-size 32`` or
``--opt group_size=32`` (hyphens and underscores both work), converted to the field's type
(:mod:`kvc.compression.options`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

import kvc

from ..console import err, human_bytes, out, progress_task
from ..options import ComputeDtype, Device, Force, JsonOut, Layers, MethodOptions, MethodSeed, PlanFile, QueryStride, Seeds
from ...errors import KvcError
from ...io.atomic import check_outputs, emit_json
from ..lazy import LazyModule

engine = LazyModule("kvc.compression.engine")
options = LazyModule("kvc.compression.options")


# ----------------------------------------------------------------------------- tables

COLUMNS = (("bits", "kv", "bits_per_entry"), ("K mse", "k", "mse_rel"), ("V mse", "v", "mse_rel"),
           ("ip bias", "k", "ip_bias_rel"), ("slope", "k", "ip_slope"), ("KL", "kv", "attn_kl"),
           ("out err", "kv", "attn_out_rel"), ("top8", "kv", "attn_topk_overlap"))


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) >= 1e-2 or x == 0 else f"{x:.1e}"


def results_tables(result: dict, worst: int = 5) -> list[Table]:
    """Per-layer averages with the overall row, and the worst heads by attention-output error."""
    heads = result["heads"]
    per_layer = Table(title=f"{result['method']}: per-layer averages", box=box.SIMPLE_HEAD)
    per_layer.add_column("layer", justify="right")
    for title, _, _ in COLUMNS:
        per_layer.add_column(title, justify="right")
    for L in sorted({r["layer"] for r in heads}):
        summary = engine.aggregate([r for r in heads if r["layer"] == L])
        per_layer.add_row(str(L), *(fmt(summary[t].get(m)) for _, t, m in COLUMNS))
    per_layer.add_row("all", *(fmt(result["summary"][t].get(m)) for _, t, m in COLUMNS), style="bold")
    rows = {(r["layer"], r["head"], r["tensor"]): r for r in heads}
    kv = sorted((r for r in heads if r["tensor"] == "kv"),
                key=lambda r: -(r["attn_out_rel"] if r["attn_out_rel"] is not None else float("inf")))
    worst_table = Table(title=f"worst {worst} heads by attention-output error", box=box.SIMPLE_HEAD)
    for col in ("layer", "head", *(title for title, _, _ in COLUMNS[1:])):
        worst_table.add_column(col, justify="right")
    for r in kv[:worst]:
        key = (r["layer"], r["head"])
        worst_table.add_row(str(r["layer"]), str(r["head"]),
                            *(fmt(rows[(*key, t)].get(m)) for _, t, m in COLUMNS[1:]))
    return [per_layer, worst_table]


def pm(stat: dict) -> str:
    """'0.0123 ± 0.0004' (mean ± half-width of its interval), or the mean alone."""
    if stat["half_width"] is None:
        return fmt(stat["mean"])
    return f"{fmt(stat['mean'])} ± {fmt(stat['half_width'])}"


def seeds_table(result: dict) -> Table:
    """Each metric of the summary as its mean over the seeds ± the half-width of its interval."""
    seeds = result["seeds"]
    table = Table(title=f"{result['method']} over seeds {', '.join(map(str, seeds['seeds']))}: mean ± "
                        f"{seeds['level']:.0%} Student-t interval", box=box.SIMPLE_HEAD)
    table.add_column("metric")
    for title, t, m in COLUMNS:
        table.add_column(title, justify="right")
    table.add_row("all", *(pm(seeds["summary"][t][m]) if m in seeds["summary"][t] else "-"
                           for _, t, m in COLUMNS))
    return table


def overall_line(result: dict) -> str:
    paper = result["bits_per_entry_paper"]
    s = result["summary"]
    return (f"{result['method']}: {result['bits_per_entry']:.4f} bits per entry (K {s['k']['bits_per_entry']:.4f}, "
            f"V {s['v']['bits_per_entry']:.4f}" + (f"; paper's count {paper:.4f}" if paper is not None else "")
            + f"), K mse {fmt(s['k']['mse_rel'])}, V mse {fmt(s['v']['mse_rel'])}, "
            f"attention output error {fmt(s['kv']['attn_out_rel'])}")


# ----------------------------------------------------------------------------- command


def method_or_plan(method: str | None, plan: Path | None, tokens: list[str], assignments: list[str],
                   seed: int | None, command: str = "compress"):
    """(the compressor of --method and its options, or of --plan; the positional arguments)."""
    if (method is None) == (plan is None):
        raise KvcError(f"give --method NAME (with its options) or --plan PLAN, one of them (see kvc {command} --help)")
    if plan is not None:
        extra = [t for t in tokens if t.startswith("-")]
        if extra or assignments or seed is not None:
            raise KvcError(f"--plan takes no method options ({' '.join(extra + assignments) or '--seed'}); "
                           "the plan file holds them")
        return kvc.load_plan(plan), tokens
    cls = options.get(method)
    params, positional = options.parse_method_args(cls, tokens, assignments)
    if seed is not None:
        params["seed"] = seed
    return kvc.method(cls.name, **params), positional


NAME = "compress"
CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def command(
    ctx: typer.Context,
    capture: Optional[str] = typer.Argument(None, metavar="CAPTURE", help="Capture file (kvc capture, kvc synth)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="Method (kvc methods), or EVICTOR+COMPRESSOR, e.g. snapkv+turboquant."),
    plan: PlanFile = None,
    opt: MethodOptions = [],
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the compressed form (safetensors)."),
    json_path: JsonOut = None,
    device: Device = "auto",
    layers: Layers = "all",
    dtype: ComputeDtype = "float32",
    seed: MethodSeed = None,
    seeds: Seeds = 1,
    query_stride: QueryStride = 1,
    force: Force = False,
) -> None:
    """Compress a capture with one method (or a plan); report bits per entry and fidelity per layer and head.

    Method options (see kvc methods) follow as --name value, e.g. --bits 2 --group-size 32.
    """
    compressor, positional = method_or_plan(method, plan, ([capture] if capture else []) + list(ctx.args), opt, seed)
    if len(positional) != 1:
        raise KvcError(f"expected one CAPTURE file, got {len(positional)}: {' '.join(positional) or 'none'}")
    if plan is not None and out_path is not None:
        raise KvcError("--out with --plan: a plan's compression cannot be written to a compressed file yet "
                       "(kvc decompress reads single methods)")
    check_outputs([out_path, json_path], force, inputs=[positional[0], plan])
    with progress_task(compressor.name) as progress:
        result = kvc.compress(positional[0], compressor, layers=layers, device=device, dtype=dtype,
                              query_stride=query_stride, keep=out_path is not None, seeds=seeds,
                              progress=progress)
    report = result.to_json()
    console = err if json_path == "-" else out
    for table in results_tables(report):
        console.print(table)
    if "seeds" in report:
        console.print(seeds_table(report))
    console.print(overall_line(report))
    if out_path is not None:
        result.save(out_path, force=force)
        console.print(f"wrote {out_path}: {human_bytes(out_path.stat().st_size)} "
                      f"({human_bytes(result.array_bytes)} of packed arrays)")
    emit_json(json_path, report, force)
