"""How well do the tensor proxies of ``kvc compress`` predict the end-to-end perplexity delta?

Usage: python scripts/eval_correlation.py [--contexts 512] [--windows 4] [--continuation 128]
       python scripts/eval_correlation.py --from-json docs/eval_correlation.json   (re-render only)
Runs ``kvc.evaluate`` (perplexity only, with the compress engine's metrics measured on the very
prefills whose cache is compressed) for a grid of methods and bit widths on the default model, then
the Spearman rank correlation of mse_rel (K, V), attn_out_rel and attn_kl with the perplexity delta
and the next-token KL, over all methods and over the quantizers alone. Writes
docs/eval_correlation.md and docs/eval_correlation.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from scipy.stats import spearmanr

import kvc

ROOT = Path(__file__).resolve().parents[1]
GRID = ["turboquant --bits 1", "turboquant --bits 2", "turboquant --bits 3", "turboquant --bits 4",
        "turboquant --bits 2.5", "kivi --bits 2", "kivi --bits 4", "int --bits 2", "int --bits 3",
        "int --bits 4", "int --bits 4 --axis channel", "eoptshrinkq --bits 1", "eoptshrinkq --bits 2",
        "eoptshrinkq --bits 3", "svdq --bits 2", "kvquant --bits 2", "kvquant --bits 3", "qjl",
        "fp8 --format e4m3", "fp8 --format e5m2", "snapkv --budget 0.25", "snapkv --budget 0.5",
        "streamingllm --budget 0.25", "h2o --budget 0.25", "pyramidkv --budget 0.25"]
PROXIES = [("K mse_rel", "k", "mse_rel"), ("V mse_rel", "v", "mse_rel"),
           ("attn_out_rel", "kv", "attn_out_rel"), ("attn_kl", "kv", "attn_kl")]
TARGETS = [("ppl delta", "delta_rel"), ("next-token KL", "kl")]


def parse(spec: str) -> tuple[str, dict[str, str | bool]]:
    """'int --bits 4 --axis channel' -> ('int', {'bits': '4', 'axis': 'channel'}): the method and its
    options as ``kvc.method`` takes them (strings are converted as on the command line; a flag
    without a value, like --symmetric, is True)."""
    name, *words = shlex.split(spec)
    options: dict[str, str | bool] = {}
    while words:
        flag = words.pop(0)
        if not flag.startswith("--"):
            raise kvc.KvcError(f"{spec!r}: expected METHOD --option value ..., got {flag!r}")
        options[flag[2:].replace("-", "_")] = words.pop(0) if words and not words[0].startswith("--") else True
    return name, options


def evicts(name: str) -> bool:
    """Whether a method (or EVICTOR+COMPRESSOR) drops tokens."""
    return any(kvc.methods()[part]["kind"] == "eviction" for part in name.split("+"))


def spearman(rows: list[dict], tensor: str, metric: str, target: str) -> tuple[float, float, int]:
    """(rho, p, n) of a proxy against an end-to-end change, over the rows that have the proxy."""
    pairs = [(r["proxies"][tensor][metric], r["perplexity"][target]) for r in rows
             if r["proxies"][tensor].get(metric) is not None]
    if len(pairs) < 3:
        return float("nan"), float("nan"), len(pairs)
    rho, p = spearmanr(*zip(*pairs))
    return float(rho), float(p), len(pairs)


def rank_table(rows: list[dict], subset: str) -> list[str]:
    lines = [f"| proxy | {' | '.join(t for t, _ in TARGETS)} |", "|---|" + "---|" * len(TARGETS)]
    for label, tensor, metric in PROXIES:
        cells = [spearman(rows, tensor, metric, target) for _, target in TARGETS]
        lines.append(f"| {label} | " + " | ".join(f"{r:+.2f} (p = {p:.2g}, n = {n})" for r, p, n in cells) + " |")
    best = max(PROXIES, key=lambda x: spearman(rows, x[1], x[2], "delta_rel")[0])
    rho = spearman(rows, best[1], best[2], "delta_rel")[0]
    return [f"**{subset}**", "", *lines, "", f"Best predictor of the perplexity delta here: {best[0]} "
            f"(rho = {rho:+.2f}).", ""]


def render(report: dict) -> str:
    rows, settings = report["rows"], report["settings"]
    lines = [
        "# Do the tensor proxies predict the end-to-end perplexity delta?",
        "",
        f"Made by `python scripts/eval_correlation.py` ({report['date']}, {report['seconds'] / 60:.0f} min on CPU). "
        f"Default model, contexts of {', '.join(map(str, settings['contexts']))} tokens x {settings['windows']} windows of the CPython docs, "
        f"{settings['continuation']} continuation tokens scored per window with the method's compressed cache "
        "(`kvc.evaluate`). The proxies are `kvc compress`'s metrics (compress engine), measured on the very "
        "prefills whose cache is compressed, averaged over layers and heads.",
        "",
        "| method | bits/entry | K mse_rel | V mse_rel | attn_out_rel | attn_kl | ppl delta | next-token KL | top-1 agree |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
    for r in sorted(rows, key=lambda r: r["perplexity"]["delta_rel"]):
        p, x = r["perplexity"], r["proxies"]
        lines.append(f"| `{r['spec']}` | {r['bits_per_entry']:.3f} | "
                     + " | ".join(fmt(x[t].get(m)) for _, t, m in PROXIES)
                     + f" | {100 * p['delta_rel']:+.2f}% | {p['kl']:.3g} | {100 * p['top1_agree']:.1f}% |")
    lines += ["", "## Spearman rank correlation of each proxy with the end-to-end change", ""]
    lines += rank_table(rows, "All methods")
    lines += rank_table([r for r in rows if not r["evicts"]], "Quantizers and low-rank methods only (no eviction)")
    lines += [
        "## Reading",
        "",
        "- Eviction methods score mse_rel close to the evicted fraction (an evicted token counts as a "
        "full error), whatever the tokens were worth to attention; across families the proxies are "
        "therefore weaker predictors than within the quantizers, where every token keeps an approximation.",
        f"- The perplexity delta of a near-lossless method is sampling noise of the "
        f"{settings['windows'] * settings['continuation'] * len(settings['contexts'])} scored tokens "
        "(it can come out negative); the next-token KL against the uncompressed run compares the two "
        "whole distributions at every scored token, not only the target's probability, and is the "
        "steadier end-to-end target.",
        "",
    ]
    if report["failed"]:
        lines += ["Methods that failed:", ""] + [f"- `{s}`: {e}" for s, e in report["failed"]] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="512")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=GRID)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "eval_correlation.md")
    parser.add_argument("--from-json", type=Path, help="Re-render the report from an earlier run's JSON.")
    args = parser.parse_args()
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
    else:
        report = run(args)
        kvc.write_text(args.out.with_suffix(".json"), json.dumps(report, indent=1, allow_nan=True) + "\n",
                       force=True)
    text = render(report)
    kvc.write_text(args.out, text, force=True)
    print(text)


def run(args) -> dict:
    """Evaluate every method of the grid; the rows, the failures, the settings and the time."""
    model, tokenizer = kvc.load_model(dtype="float32", device="cpu")
    contexts = [int(c) for c in args.contexts.split(",")]
    rows, failed = [], []
    start = time.perf_counter()
    for spec in args.methods:
        try:
            name, options = parse(spec)
            result = kvc.evaluate(kvc.method(name, **options), model, tokenizer=tokenizer, contexts=contexts,
                                  windows=args.windows, continuation=args.continuation, retrieval=False).to_json()
        except kvc.KvcError as err:
            failed.append((spec, str(err)))
            print(f"{spec}: FAILED {err}", file=sys.stderr)
            continue
        result["spec"], result["evicts"] = spec, evicts(name)
        rows.append(result)
        print(f"{spec}: {result['bits_per_entry']:.3f} bits, ppl {100 * result['perplexity']['delta_rel']:+.2f}%",
              file=sys.stderr)
    return {"rows": rows, "failed": failed, "settings": rows[0]["settings"] if rows else {},
            "seconds": time.perf_counter() - start, "date": time.strftime("%Y-%m-%d")}


if __name__ == "__main__":
    main()
