"""Regenerate the extensions section of docs/results.md: every eviction method, MiniCache, the MLA-style
latent, seed noise and compression during decoding, on the default model.

    python scripts/results_extensions.py [--capture out/default.safetensors] [--seeds 5]

Every number of the section comes from this run (``kvc.compress``, ``kvc.analyze``,
``kvc.evaluate``); the section sits between its markers in docs/results.md, which scripts/results.py keeps.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kvc  # noqa: E402
from doc_sections import replace_section  # noqa: E402

BEGIN = "<!-- scripts/results_extensions.py: extensions section -->"
END = "<!-- end of scripts/results_extensions.py's extensions section -->"
GAMMAS = (0.05, 0.5, 0.9, 1.0)
SEED_METHOD, SEED_BITS = "turboquant", 2
SEED_METRICS = (("k", "ip_bias_rel"), ("k", "mse_rel"), ("v", "mse_rel"), ("kv", "attn_out_rel"))
BUDGETS = (0.25, 0.5)
PRUNING = (("think", {}), ("snapkv+think", {"budget": 0.5}))  # key channel pruning, alone and after eviction
DECODING = (("turboquant", {"bits": 2}), ("kivi", {"bits": 2, "residual": 32}), ("snapkv", {"budget": 0.5}),
            ("streamingllm", {"budget": 0.5}), ("minicache", {"gamma": 0.9}))


def g(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def progress(done: int, total: int, what: str) -> None:
    print(f"[{done}/{total}] {what}", file=sys.stderr)


def eviction_rows(capture: Path, layers: str, query_stride: int) -> list[str]:
    """Every registered eviction method at each budget (gvote at its own nucleus), and ThinK: fully
    counted bits and the attention error, best attention-output error first."""
    runs = [(name, {"budget": b}) for name, m in kvc.methods().items() if m["kind"] == "eviction"
            for b in BUDGETS if any(o["name"] == "budget" for o in m["options"])]
    runs += [("gvote", {})] + list(PRUNING)
    rows = []
    for name, options in runs:
        s = kvc.compress(capture, name, layers=layers, query_stride=query_stride, keep=False, device="cpu",
                         **options).summary
        label = " ".join([name] + [f"--{k} {v:g}" for k, v in options.items()])
        rows.append((s["kv"]["attn_out_rel"], f"| `{label}` | {s['kv']['bits_per_entry']:.3f} | "
                     f"{g(s['kv']['attn_out_rel'])} | {g(s['kv']['attn_kl'])} | {g(s['kv']['attn_topk_overlap'])} |"))
    return (["| method | bits per entry (K and V) | attn_out_rel | attn_kl | attn_topk_overlap |",
             "|---|---|---|---|---|"] + [row for _, row in sorted(rows, key=lambda r: r[0])])


def minicache_rows(capture: Path, layers: str, query_stride: int) -> list[str]:
    """Per gamma: bits per entry, retained share, mse and attention-output error over merged pairs."""
    lines = ["| gamma | bits per entry | tokens retained | K mse_rel | V mse_rel | attn_out_rel |",
             "|---|---|---|---|---|---|"]
    for gamma in GAMMAS:
        result = kvc.compress(capture, "minicache", gamma=gamma, layers=layers, query_stride=query_stride,
                              start=0, device="cpu")
        held = [enc.arrays for enc in result.run.encoded.values() if enc.arrays["k.count"].numel()]
        retained = sum(int(a[f"{t}.count"].sum()) for a in held for t in ("k", "v"))
        tokens = sum(a[f"{t}.count"].numel() for a in held for t in ("k", "v")) * result.run.source["seq_len"]
        s = result.summary
        lines.append(f"| {gamma:g} | {result.bits_per_entry:.3f} | {retained / tokens:.1%} | {g(s['k']['mse_rel'])} | "
                     f"{g(s['v']['mse_rel'])} | {g(s['kv']['attn_out_rel'])} |")
    return lines


def latent_rows(capture: Path) -> tuple[list[str], str]:
    """Per layer: the joint [K_pre | V] rank at each energy share and the latent's fp16 bytes per token."""
    analysis = kvc.analyze(capture, tensors="k_pre,v", device="cpu", progress=progress)
    lat = analysis.summary["latent"]
    shares = "/".join(f"{e:.0%}" for e in lat["energy"])
    lines = [f"| layer | rank at {shares} | bytes per token at {shares} | full K/V bytes |", "|---|---|---|---|"]
    for row in analysis.summary["per_layer"]:
        r = row["latent"]
        lines.append(f"| {row['layer']} | {'/'.join(map(str, r['rank']))} | "
                     f"{'/'.join(map(str, r['bytes_per_token']))} | {r['bytes_per_token_full']} |")
    lines.append(f"| all | median {'/'.join(f'{x:g}' for x in lat['median_rank'])} | "
                 f"{'/'.join(map(str, lat['bytes_per_token']))} | {lat['bytes_per_token_full']} |")
    total = (f"over all {len(analysis.summary['per_layer'])} layers a latent of {shares} energy takes "
             + "/".join(f"{x:.1%}" for x in lat["size_ratio"]) + " of the fp16 K/V cache")
    return lines, total


def seed_rows(capture: Path, layers: str, seeds: int, query_stride: int) -> list[str]:
    result = kvc.compress(capture, SEED_METHOD, bits=SEED_BITS, seeds=seeds, layers=layers,
                          query_stride=query_stride, keep=False, device="cpu")
    stats = result.seeds["summary"]
    lines = ["| metric | mean over seeds | 95 % half-width |", "|---|---|---|"]
    for tensor, metric in SEED_METRICS:
        s = stats[tensor][metric]
        lines.append(f"| {tensor} {metric} | {g(s['mean'])} | {g(s['half_width'])} |")
    return lines


def decoding_rows(every: int, context: int, continuation: int) -> list[str]:
    """Perplexity with the prompt compressed only, and with the cache recompressed every ``every`` tokens."""
    model, tokenizer = kvc.load_model(device="cpu")
    lines = [f"| method | prompt bits/entry | ppl delta, prompt only | ppl delta, every {every} | "
             f"bits/entry of the recompressions | top-1 agree, every {every} |", "|---|---|---|---|---|---|"]
    base = None
    for name, options in DECODING:
        once, often = (kvc.evaluate(name, model, tokenizer=tokenizer, contexts=[context], windows=2,
                                    continuation=continuation, retrieval=False, proxies=False, decode_every=n,
                                    **options).to_json() for n in (None, every))
        label = " ".join([name] + [f"--{k.replace('_', '-')} {v}" for k, v in options.items()])
        lines.append(f"| `{label}` | {once['bits_per_entry']:.3f} | {once['perplexity']['delta_rel']:+.2%} | "
                     f"{often['perplexity']['delta_rel']:+.2%} | {often['decoding']['bits_per_entry']:.3f} | "
                     f"{often['perplexity']['top1_agree']:.1%} |")
        base = once["perplexity"]
    lines += ["", f"Uncompressed perplexity {base['ppl_base']:.3f} ({base['tokens']} scored tokens)."]
    return lines


def section(args, capture: Path) -> str:
    eviction = eviction_rows(capture, args.layers, args.query_stride)
    mc = minicache_rows(capture, args.minicache_layers, args.query_stride)
    latent, total = latent_rows(capture)
    seeds = seed_rows(capture, args.layers, args.seeds, args.query_stride)
    decoding = decoding_rows(args.decode_every, args.context, args.continuation)
    return "\n".join([
        BEGIN, "## Extensions: eviction, MiniCache, MLA-style latent, seed noise, compression during decoding", "",
        f"Generated by `python scripts/results_extensions.py` on `{capture}`; do not edit by hand.", "",
        f"### Eviction and key channel pruning (layers {args.layers})", "",
        "`kvc compress --method NAME --budget B` ([methods.md](methods.md#eviction)): bits per entry "
        "fully counted (kept tokens in fp16, their positions), the attention error over the captured "
        "queries; best attention-output error first. h2o and gvote choose with the attention of all "
        "the captured queries, the ones this error is measured on, so the table favours them; "
        "perplexity on continuation text they never saw is the fairer test ([eval.md](eval.md)). "
        "The same selections as NVIDIA's kvpress where the "
        "algorithms are shared, and the perplexity of each: [peers.md](peers.md).", "",
        *eviction, "",
        f"### MiniCache (cross-layer merging; layers {args.minicache_layers}, merged in adjacent pairs)", "",
        "`kvc compress --method minicache --start 0 --gamma G` ([methods.md](methods.md#minicache)); "
        "`tokens retained` is the share of (token, KV head, tensor) entries left unmerged in the pairs.", "",
        *mc, "",
        "### MLA-style latent of the joint [K before RoPE | V] (`kvc analyze`)", "",
        f"([analyze.md](analyze.md#mla-style-latent)); {total}.", "",
        *latent, "",
        f"### Seed noise: `{SEED_METHOD} --bits {SEED_BITS}` over {args.seeds} seeds (layers {args.layers})", "",
        f"`kvc compress --seeds {args.seeds}` ([methods.md](methods.md#seed-noise)).", "",
        *seeds, "",
        f"### Compression during decoding: `kvc eval --decode-every {args.decode_every}`", "",
        f"Contexts of {args.context} tokens, 2 windows, {args.continuation} scored continuation tokens; "
        "relative perplexity change against the uncompressed cache ([eval.md](eval.md)).", "",
        *decoding, END])


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", default="out/default.safetensors")
    parser.add_argument("--minicache-layers", default="14-21")
    parser.add_argument("--layers", default="0,10,20,29")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--query-stride", type=int, default=8)
    parser.add_argument("--decode-every", type=int, default=16)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--continuation", type=int, default=64)
    args = parser.parse_args()
    os.chdir(ROOT)
    capture = Path(args.capture)
    if not capture.exists():
        print(kvc.capture(out=capture, progress=progress), file=sys.stderr)
    replace_section(Path("docs") / "results.md", BEGIN, END, section(args, capture))
    print("wrote the extensions section of docs/results.md")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(run())
    except kvc.KvcError as err:
        sys.exit(f"scripts/results_extensions.py: error: {err}")
