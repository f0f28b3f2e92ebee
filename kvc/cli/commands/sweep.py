"""``kvc sweep``: methods x bit widths x key placement on one capture; Pareto fronts and bit savings.

Views: ``k_pre`` = keys compressed before RoPE (runs with ``--keys pre``), ``k`` = keys compressed
after RoPE (``--keys post``), ``v`` = values (from the ``--keys post`` runs when a method has both).
On a key view the x axis is the keys' bits per entry for key metrics and the overall bits per entry
for attention metrics (K and V together); on ``v`` it is the values' bits per entry.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import typer
from rich import box
from rich.table import Table

from ...io.capture import CaptureFile
from ..console import err, out, progress_bar
from ...errors import KvcError, MethodFailure
from ...io.safetensors import check_outputs, write_json
from ...gpu import require_device
from ...model.load import DEFAULT_MODEL_NAME
from ...compression.protocol import option_fields
from .compress import compute_dtype, convert, fmt

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


# ----------------------------------------------------------------------------- planning and running


def plan(methods: list[str], bits: list[str], keys: list[str], has_pre: bool, opts: list[str],
         seed: int) -> tuple[list[dict], list[dict]]:
    """(jobs, skipped): one job per supported (method, bits, keys); every skip says why."""
    from ...compression.protocol import build, get

    parsed = []
    for item in opts:
        key, eq, text = item.partition("=")
        if not eq:
            raise KvcError(f"--opt {item!r}: expected [method.]key=value")
        target, _, key = key.rpartition(".")
        parsed.append((item, target, key.strip().replace("-", "_"), text.strip()))
    used: set[str] = set()
    jobs, skipped = [], []
    for name in methods:
        cls = get(name)
        fields = option_fields(cls)
        extra = {}
        for item, target, key, text in parsed:
            if target in ("", name) and key in fields:
                extra[key] = convert(text, fields[key][0], f"--opt {item}")
                used.add(item)
        if "bits" not in fields:
            skipped.append({"method": name, "bits": None, "keys": None, "reason": f"{name} has no --bits option"})
            continue
        placements = [None]
        if "keys" in fields:
            choices = fields["keys"][1].metadata.get("choices") or ("pre", "post")
            placements = [k for k in keys if k in choices and (k == "post" or has_pre)]
            for k in keys:
                if k not in placements:
                    reason = "the capture has no keys before RoPE" if k == "pre" and not has_pre else f"{name} has no --keys {k}"
                    skipped.append({"method": name, "bits": None, "keys": k, "reason": reason})
        for text in bits:
            try:
                value = convert(text, fields["bits"][0], "--bits")
            except KvcError as error:
                skipped.append({"method": name, "bits": text, "keys": None, "reason": str(error)})
                continue
            for k in placements:
                params = {**extra, "bits": value, "seed": seed, **({"keys": k} if k else {})}
                try:
                    compressor = build(name, **params)
                except KvcError as error:
                    skipped.append({"method": name, "bits": text, "keys": k, "reason": str(error)})
                    continue
                jobs.append({"method": name, "bits": float(text), "keys": k, "compressor": compressor, "params": params,
                             "view": "k_pre" if k == "pre" else "k",
                             "values": k in (None, "post") or "post" not in placements})
    unused = [item for item, *_ in parsed if item not in used]
    if unused:
        raise KvcError(f"--opt {', '.join(unused)}: no method of {', '.join(methods)} has that option")
    return jobs, skipped


def run_jobs(jobs: list[dict], capture: CaptureFile, layers: list[int], device, dtype, seed: int,
             query_stride: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(runs, skipped, failures); impossible parameters skip, loud method failures are collected."""
    from ...compression import engine

    runs, skipped, failures = [], [], []
    with progress_bar() as bar:
        task = bar.add_task("sweep", total=len(jobs))
        for job in jobs:
            compressor = job.pop("compressor")
            label = {k: job[k] for k in ("method", "bits", "keys")}
            bar.update(task, description=f"{job['method']} {job['bits']:g} {job['keys'] or ''}")
            try:
                torch.manual_seed(seed)  # engine.run validates the options on the first layer
                result = engine.run(compressor, capture, layers, device, dtype, query_stride=query_stride)
            except MethodFailure as error:
                failures.append({**label, "reason": str(error)})
            except KvcError as error:
                skipped.append({**label, "reason": str(error)})
            else:
                runs.append({**job, "result": result.to_json()})
            bar.advance(task)
    return runs, skipped, failures


def add_end_to_end(runs: list[dict], model: str, device) -> dict[str, float | None]:
    """Each run's method inside the model (``kvc.eval.evaluate.end_to_end``): adds ``run["e2e"]`` and returns
    the Spearman rank correlation of each tensor proxy with the perplexity delta across runs."""
    from scipy.stats import spearmanr

    from ...compression.protocol import build
    from ...model.text import load_corpus
    from ...eval.evaluate import end_to_end
    from ...model.load import load_model, resolve_model

    source = resolve_model(None if model == DEFAULT_MODEL_NAME else model)
    lm, tokenizer = load_model(source, device=str(device))
    rows = end_to_end(lm, tokenizer, load_corpus(None), [build(r["method"], **r["params"]) for r in runs])
    for run, row in zip(runs, rows):
        run["e2e"] = row
    ppl = [r["e2e"]["ppl_delta_rel"] for r in runs]
    proxies = {"mse_rel": [(r["result"]["summary"]["k"]["mse_rel"] + r["result"]["summary"]["v"]["mse_rel"]) / 2
                           for r in runs],
               **{m: [r["result"]["summary"]["kv"][m] for r in runs] for m in ("attn_out_rel", "attn_kl")}}
    if len(runs) < 3:
        return {m: None for m in proxies}
    return {m: float(spearmanr(values, ppl).statistic) for m, values in proxies.items()}


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


# ----------------------------------------------------------------------------- output


def skip_reason(s: dict) -> str:
    """'METHOD --bits B --keys K: reason' of a skipped or failed job."""
    bits = f"{s['bits']:g}" if isinstance(s["bits"], float) else s["bits"]
    return (s["method"] + (f" --bits {bits}" if bits else "") + (f" --keys {s['keys']}" if s["keys"] else "")
            + f": {s['reason']}")


def plot(runs: list[dict], metric: str, methods: list[str], path: Path, force: bool) -> None:
    """Pareto fronts of one metric against bits per entry, one panel per view (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ...io.safetensors import atomic_path

    views = VIEWS if metric == "mse_rel" else VIEWS[:2]
    fig, axes = plt.subplots(1, len(views), figsize=(4.6 * len(views), 3.8), squeeze=False)
    for ax, view in zip(axes[0], views):
        points = view_points(runs, view, metric)
        for method, p in points.items():
            index = methods.index(method)
            color, marker = f"C{index % 10}", "os^Dv<>PX*"[index % 10]
            ax.scatter([x for x, _, _ in p], [y for _, y, _ in p], color=color, marker=marker, s=14, alpha=0.35)
            front = pareto_front(p)
            ax.plot([x for x, _, _ in front], [y for _, y, _ in front], "-", marker=marker, color=color,
                    ms=5, mfc="none", label=method)
        values = [y for p in points.values() for _, y, _ in p]
        if values and min(values) > 0:
            ax.set_yscale("log")
        attention = metric in ATTENTION_METRICS
        ax.set_title({"k_pre": "keys compressed before RoPE", "k": "keys compressed after RoPE",
                      "v": "values"}[view], fontsize=10)
        ax.set_xlabel("bits per entry" + (" (K and V)" if attention else ""))
        ax.set_ylabel(METRICS[metric][0], fontsize=9)
        ax.grid(alpha=0.3)
        if points:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, force) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def grid_table(runs: list[dict], view: str, metric: str, bits: list[float]) -> Table:
    """Methods x bits asked: the metric (raw value) @ bits per entry."""
    tensor = "v" if view == "v" else ("k" if metric in KEY_METRICS else "kv")
    table = Table(title=f"{view}: {metric} @ bits per entry", box=box.SIMPLE_HEAD)
    table.add_column("method")
    for b in bits:
        table.add_column(f"--bits {b:g}", justify="right")
    cells: dict[str, dict[float, str]] = {}
    for run in runs:
        if run["view"] == view or (view == "v" and run["values"]):
            s = run["result"]["summary"][tensor]
            cells.setdefault(run["method"], {})[run["bits"]] = f"{fmt(s.get(metric))} @ {s['bits_per_entry']:.2f}"
    for method, row in cells.items():
        table.add_row(method, *(row.get(b, "-") for b in bits))
    return table


def savings(runs: list[dict], pairs: list[tuple[str, str]]) -> dict[str, dict[str, list[dict]]]:
    """For each (method, reference) pair and view: bits saved at equal mse_rel."""
    out_: dict[str, dict[str, list[dict]]] = {}
    for a, b in pairs:
        per_view = {}
        for view in VIEWS:
            points = view_points(runs, view, "mse_rel")
            if a in points and b in points:
                per_view[view] = bit_saving(points[a], points[b])
        out_[f"{a}_vs_{b}"] = per_view
    return out_


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
                                 f"saving {r['saving']:+.3f} bits per entry")
            if inside:
                mean = sum(r["saving"] for r in inside) / len(inside)
                lines.append(f"{view}: mean bit saving of {a} over {b} at equal mse: {mean:+.3f} bits per entry "
                             f"({len(inside)} of {len(rows)} points inside {b}'s range)")
    return lines


# ----------------------------------------------------------------------------- command

NAME = "sweep"


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def command(
    capture: Path = typer.Argument(..., help="Capture file (kvc capture, kvc synth)."),
    methods: str = typer.Option("eoptshrinkq,svdq,turboquant,kivi,kvquant", "--methods", help="Comma list of methods with a --bits option."),
    bits: str = typer.Option("1,1.5,2,2.5,3,4", "--bits", help="Comma list of --bits values."),
    keys: str = typer.Option("pre,post", "--keys", help="Key placements to run: pre, post or both."),
    compare: str = typer.Option("eoptshrinkq:turboquant", "--compare", help="METHOD:REFERENCE pairs for the equal-mse bit saving."),
    opt: List[str] = typer.Option([], "--opt", help="[method.]key=value passed to the methods that have the option."),
    out_dir: Path = typer.Option(Path("sweep"), "--out-dir", "-o", help="Folder for sweep.json and the PNG plots."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|cuda:N"),
    layers: str = typer.Option("all", "--layers", help="'all' or a list like '0,2,5-9'."),
    dtype: str = typer.Option("float32", "--dtype", help="Compute dtype: float32|float64."),
    seed: int = typer.Option(0, "--seed"),
    query_stride: int = typer.Option(1, "--query-stride", help="Measure with every N-th captured query."),
    e2e: bool = typer.Option(False, "--e2e", help="Also run each method inside the model (kvc eval's perplexity) and rank-correlate the proxies with it."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model for --e2e (required with it): the one whose cache the capture holds; hub id, local HF directory, GGUF file or SmolLM2-135M-Instruct for the default model."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
) -> None:
    """Run methods x bit widths x key placement; print and plot Pareto fronts and bit savings."""
    from ...compression.protocol import get

    method_list = _split(methods)
    for name in method_list:
        get(name)
    try:
        bit_values = sorted({float(b) for b in _split(bits)})
    except ValueError:
        raise KvcError(f"--bits {bits!r}: expected comma-separated numbers") from None
    key_list = _split(keys)
    if not key_list or set(key_list) - {"pre", "post"}:
        raise KvcError(f"--keys {keys!r}: expected pre, post or pre,post")
    pairs = [tuple(p.split(":")) for p in _split(compare)]
    if any(len(p) != 2 for p in pairs):
        raise KvcError(f"--compare {compare!r}: expected METHOD:REFERENCE pairs")
    if query_stride < 1:
        raise KvcError("--query-stride must be >= 1")
    if e2e and model is None:  # a capture's metadata never chooses a model to load
        raise KvcError(f"--e2e needs --model, the model whose cache the capture holds (the default model is "
                       f"{DEFAULT_MODEL_NAME}); kvc loads only a model named on the command line")
    source = CaptureFile(capture)
    selected = source.select_layers(layers)
    jobs, skipped = plan(method_list, [f"{b:g}" for b in bit_values], key_list, source.has(selected[0], "k_pre"), opt, seed)
    if not jobs:
        raise KvcError("nothing to run: " + "; ".join(map(skip_reason, skipped)))
    check_outputs([out_dir / "sweep.json"] + [out_dir / f"pareto_{m}.png" for m in METRICS], force,
                  inputs=[capture])
    torch_device = require_device(device)
    runs, skipped_run, failures = run_jobs(jobs, source, selected, torch_device, compute_dtype(dtype),
                                           seed, query_stride)
    skipped += skipped_run
    if not runs:  # nothing to plot or compare
        problem = MethodFailure if failures else KvcError
        raise problem("no run succeeded: " + "; ".join(map(skip_reason, failures + skipped)))
    for metric, views in (("mse_rel", VIEWS), ("attn_out_rel", VIEWS[:2])):
        for view in views:
            if view_points(runs, view, metric):  # a view with no runs (e.g. --keys pre only) is left out
                out.print(grid_table(runs, view, metric, bit_values))
    for s in skipped:
        err.print(f"skipped {skip_reason(s)}")
    saved = savings(runs, pairs)
    for line in saving_lines(saved):
        out.print(line)
    correlation = None
    if e2e:
        correlation = add_end_to_end(runs, model, torch_device)
        out.print(e2e_table(runs, correlation))
    for metric in METRICS:
        plot(runs, metric, method_list, out_dir / f"pareto_{metric}.png", force)
    report = {"e2e_rank_correlation": correlation, "capture": str(capture), "layers": selected, "methods": method_list, "bits": bit_values,
              "keys": key_list, "seed": seed, "query_stride": query_stride, "runs": runs, "skipped": skipped,
              "failures": failures, "savings": saved,
              "pareto": {view: {metric: {m: pareto_front(p) for m, p in view_points(runs, view, metric).items()}
                                for metric in METRICS} for view in VIEWS}}
    write_json(out_dir / "sweep.json", report, force=force)
    out.print(f"wrote {out_dir}/sweep.json and {len(METRICS)} Pareto plots")
    if failures:
        raise MethodFailure("; ".join(map(skip_reason, failures)))
