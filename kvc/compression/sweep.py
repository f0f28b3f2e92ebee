"""Methods x bit widths x key placement on one capture (``kvc sweep``): plan the runs, run them,
Pareto fronts and bit savings (:mod:`kvc.metrics.pareto`), optionally each method inside the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import KvcError, MethodFailure
from ..io.capture import CaptureFile
from ..io.atomic import atomic_path
from ..metrics.seeds import combine, seed_list
from ..metrics.pareto import ATTENTION_METRICS, METRICS, VIEWS, fronts, pareto_front, savings, view_points
from ..model.load import DEFAULT_MODEL_NAME, open_model
from ..model.text import load_corpus
from . import engine
from .fields import coerce, typed_fields, valid_of
from .registry import build, get

Progress = Callable[[int, int, str], None]


def parse_opts(items: Sequence[str]) -> dict[str, str]:
    """``--opt [method.]key=value`` strings -> {"[method.]key": "value"}."""
    parsed = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq:
            raise KvcError(f"--opt {item!r}: expected [method.]key=value")
        parsed[key.strip()] = text.strip()
    return parsed


def plan(methods: list[str], bits: list[str], keys: list[str], has_pre: bool, options: Mapping[str, Any],
         seed: int) -> tuple[list[dict], list[dict]]:
    """(jobs, skipped): one job per supported (method, bits, keys); every skip says why.

    ``options``: {"[method.]key": value}, passed to the methods that have the option (all of
    ``methods`` without a ``method.`` prefix).
    """
    parsed = []
    for item, value in options.items():
        target, _, key = item.rpartition(".")
        parsed.append((f"{item}={value}", target, key.strip().replace("-", "_"), value))
    used: set[str] = set()
    jobs, skipped = [], []
    for name in methods:
        cls = get(name)
        fields = typed_fields(cls.Options)
        extra = {}
        for label, target, key, value in parsed:
            if target in ("", name) and key in fields:
                extra[key] = coerce(value, fields[key][0], f"--opt {label}")
                used.add(label)
        if "bits" not in fields:
            skipped.append({"method": name, "bits": None, "keys": None, "reason": f"{name} has no --bits option"})
            continue
        placements = [None]
        if "keys" in fields:
            choices = valid_of(fields["keys"][1]).choices or ("pre", "post")
            placements = [k for k in keys if k in choices and (k == "post" or has_pre)]
            for k in keys:
                if k not in placements:
                    reason = "the capture has no keys before RoPE" if k == "pre" and not has_pre else f"{name} has no --keys {k}"
                    skipped.append({"method": name, "bits": None, "keys": k, "reason": reason})
        for text in bits:
            try:
                value = coerce(text, fields["bits"][0], "--bits")
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
    unused = [label for label, *_ in parsed if label not in used]
    if unused:
        raise KvcError(f"--opt {', '.join(unused)}: no method of {', '.join(methods)} has that option")
    return jobs, skipped


def run_jobs(jobs: list[dict], capture: CaptureFile, layers: list[int], device, dtype, seed: int,
             query_stride: int, progress: Progress | None = None, seeds: int = 1
             ) -> tuple[list[dict], list[dict], list[dict]]:
    """(runs, skipped, failures); impossible parameters skip, loud method failures are collected.
    With ``seeds`` > 1 each job runs with seed, seed + 1, ... and its result holds the means and
    intervals (``kvc.metrics.seeds.combine``)."""
    seed_values = seed_list(seed, seeds)
    runs, skipped, failures = [], [], []
    for done, job in enumerate(jobs):
        compressor = job.pop("compressor")
        label = {k: job[k] for k in ("method", "bits", "keys")}
        if progress:
            progress(done, len(jobs), f"{job['method']} {job['bits']:g} {job['keys'] or ''}")
        try:
            reports = []
            for s in seed_values:
                torch.manual_seed(s)  # engine.run validates the options on the first layer
                reports.append(engine.run(compressor.reseeded(s), capture, layers, device, dtype,
                                          query_stride=query_stride).to_json())
        except MethodFailure as error:
            failures.append({**label, "reason": str(error)})
        except KvcError as error:
            skipped.append({**label, "reason": str(error)})
        else:
            runs.append({**job, "result": combine(reports, seed_values) if seeds > 1 else reports[0]})
    if progress:
        progress(len(jobs), len(jobs), "sweep")
    return runs, skipped, failures


def add_end_to_end(runs: list[dict], model: str, device) -> dict[str, float | None]:
    """Each run's method inside the model (``kvc.eval.evaluate.end_to_end``): adds ``run["e2e"]`` and returns
    the Spearman rank correlation of each tensor proxy with the perplexity delta across runs."""
    from scipy.stats import spearmanr

    from ..eval.evaluate import end_to_end  # transformers only when asked for

    _, lm, tokenizer = open_model(None if model == DEFAULT_MODEL_NAME else model, device=str(device))
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


def sweep(capture: CaptureFile, layers: list[int], methods: list[str], bits: Sequence[float],
          keys: Sequence[str], pairs: Sequence[tuple[str, str]], options: Mapping[str, Any], device, dtype,
          seed: int = 0, query_stride: int = 1, e2e: bool = False, model: str | None = None,
          progress: Progress | None = None, seeds: int = 1) -> dict:
    """The sweep report (``sweep.json``): runs, skips, failures, savings, Pareto fronts."""
    for name in methods:
        get(name)
    bit_values = sorted({float(b) for b in bits})
    key_list = list(keys)
    if not key_list or set(key_list) - {"pre", "post"}:
        raise KvcError(f"--keys {','.join(key_list)!r}: expected pre, post or pre,post")
    pairs = [tuple(p) for p in pairs]
    if any(len(p) != 2 for p in pairs):
        raise KvcError(f"--compare {','.join(map(':'.join, pairs))!r}: expected METHOD:REFERENCE pairs")
    if query_stride < 1:
        raise KvcError("--query-stride must be >= 1")
    seed_list(seed, seeds)
    if e2e and model is None:  # a capture's metadata never chooses a model to load
        raise KvcError(f"--e2e needs --model, the model whose cache the capture holds (the default model is "
                       f"{DEFAULT_MODEL_NAME}); kvc loads only a model named on the command line")
    jobs, skipped = plan(list(methods), [f"{b:g}" for b in bit_values], key_list,
                         capture.has(layers[0], "k_pre"), options, seed)
    if not jobs:
        raise KvcError("nothing to run: " + "; ".join(map(skip_reason, skipped)))
    runs, skipped_run, failures = run_jobs(jobs, capture, layers, device, dtype, seed, query_stride, progress, seeds)
    if not runs:  # nothing to plot or compare
        problem = MethodFailure if failures else KvcError
        raise problem("no run succeeded: " + "; ".join(map(skip_reason, failures + skipped + skipped_run)))
    correlation = add_end_to_end(runs, model, device) if e2e else None
    return {"e2e_rank_correlation": correlation, "capture": str(capture.path), "layers": layers,
            "methods": list(methods), "bits": bit_values, "keys": key_list, "seed": seed,
            **({"seeds": seed_list(seed, seeds)} if seeds > 1 else {}),
            "query_stride": query_stride, "runs": runs, "skipped": skipped + skipped_run,
            "failures": failures, "savings": savings(runs, pairs), "pareto": fronts(runs)}


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
