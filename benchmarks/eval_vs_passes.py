"""``kvc eval`` against the bare forward passes it needs, side by side in one process; goal <= 2x.

Usage: python benchmarks/eval_vs_passes.py [--methods "turboquant --bits 2" ...] [--contexts 256,512]
       [--repeats 3] [--no-proxies]

One process loads the default model once, then per repetition and method times, back to back:
- eval: ``kvc.eval.evaluate.evaluate`` for the method (what ``kvc eval`` runs after loading the
  model: the prefills, the uncompressed baseline, the method's encode+decode of every layer, the
  scoring through its cache, and the tensor proxies unless ``--no-proxies``);
- passes: the same windows and needle prompts through plain transformers calls: each prefill (one
  forward with a ``DynamicCache``), then, twice (the baseline and the method), the continuation
  scoring forward of every perplexity window and the greedy answer decoding of every needle
  prompt, on a copy of the prefilled cache. No hooks, no compression.
The ratio eval / passes is what eval adds to the model's own work (compressing, cache building,
masks, proxies); median of the repetitions. Writes docs/benchmarks/eval_vs_passes.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import time
from pathlib import Path

import torch

from kvc.compression.options import parse_method_args
from kvc.compression.registry import build, get
from kvc.eval import evaluate as ev
from kvc.model.load import open_model
from kvc.model.text import framing, load_corpus

ROOT = Path(__file__).resolve().parents[1]
GOAL = 2.0
METHODS = ["turboquant --bits 2", "kivi --bits 2"]


def method_of(spec: str):
    """A compressor from a command-line spec, e.g. 'turboquant --bits 2 --rotation hadamard'."""
    name, *tokens = shlex.split(spec)
    options, _ = parse_method_args(get(name), tokens, [])
    return build(name, **options)


def bare_passes(model, tokenizer, corpus, s: ev.Settings, scorings: int = 2) -> None:
    """The forward passes of ``evaluate`` with ``scorings`` scorings per prefill (baseline + methods),
    on the same token windows and prompts (built with evaluate's own helpers)."""
    prefix = framing(tokenizer, s.special_tokens).prefix
    n_ppl = sum(s.windows * (C + s.continuation + 1 - len(prefix)) for C in s.contexts)
    ids = ev.corpus_ids(tokenizer, corpus, n_ppl + (s.trials * max(s.contexts) if s.retrieval else 0))

    def prefill(batch):
        cache = ev.DynamicCache(config=model.config)
        ev._forward(model, batch, cache, logits_to_keep=1)
        return cache

    with torch.inference_mode():
        offset = 0
        for C in s.contexts:
            body = C + s.continuation + 1 - len(prefix)
            windows = torch.tensor([prefix + ids[offset + i * body:offset + (i + 1) * body] for i in range(s.windows)])
            offset += s.windows * body
            cache = prefill(windows[:, :C])
            for _ in range(scorings):
                ev._forward(model, windows[:, C:-1], copy.deepcopy(cache)).float().log_softmax(-1)
        if not s.retrieval:
            return
        prompts = ev.Prompts(tokenizer, ids[n_ppl:])

        def answer(batch, needles):
            cache, question = prefill(batch), prompts.questions(needles)
            for _ in range(scorings):
                c = copy.deepcopy(cache)
                c.batch_repeat_interleave(question.shape[0] // batch.shape[0])
                x = question
                for _ in range(prompts.answer_steps):
                    x = ev._forward(model, x, c, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)

        for L in s.contexts:
            for trial in range(s.trials):
                start = trial * max(s.contexts)
                needles = [prompts.needles(1)[0] for _ in s.depths]
                answer(torch.tensor([prefix + prompts.context(start, L - len(prefix), [(d, n)])
                                     for d, n in zip(s.depths, needles)]), needles)
                if s.needles:
                    needles = prompts.needles(s.needles)
                    depths = [(i + 0.5) / s.needles for i in range(s.needles)]
                    answer(torch.tensor([prefix + prompts.context(start, L - len(prefix), list(zip(depths, needles)))]),
                           needles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--contexts", default="256,512,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-proxies", dest="proxies", action="store_false")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "eval_vs_passes.md")
    args = parser.parse_args()
    s = ev.Settings(contexts=tuple(int(c) for c in args.contexts.split(",")))
    load0, begin = os.getloadavg()[0], time.perf_counter()
    _, model, tok = open_model(None, device="cpu")
    corpus = load_corpus(None)
    rows = {m: {"eval": [], "passes": []} for m in args.methods}
    for rep in range(args.repeats):
        for spec in args.methods:
            comp = method_of(spec)
            start = time.perf_counter()
            ev.evaluate(model, tok, corpus, [comp], s, measure=args.proxies)
            rows[spec]["eval"].append(time.perf_counter() - start)
            start = time.perf_counter()
            bare_passes(model, tok, corpus, s)
            rows[spec]["passes"].append(time.perf_counter() - start)
            print(f"{rep + 1}/{args.repeats} {spec}: eval {rows[spec]['eval'][-1]:.1f} s, passes "
                  f"{rows[spec]['passes'][-1]:.1f} s", flush=True)
    load1, total = os.getloadavg()[0], time.perf_counter() - begin
    lines = [
        "# `kvc eval` against the forward passes it needs",
        "",
        "Generated by `benchmarks/eval_vs_passes.py` (do not edit by hand). One process, the default model "
        "loaded once; per repetition and method, eval and then the bare passes on the same windows and "
        f"prompts (module docstring). Median of {args.repeats} repetitions. Goal: eval / passes <= {GOAL:g}.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s). Load average (1 min) before {load0:.2f}, after {load1:.2f}; "
        f"the whole run took {total:.0f} s.",
        "",
        f"Settings: contexts {list(s.contexts)} tokens; perplexity on {s.windows} windows x {s.continuation} "
        f"scored tokens per context; single needle at depths {list(s.depths)} x {s.trials} trial(s); "
        f"multi-needle with {s.needles} facts; tensor proxies {'measured (as `kvc eval`)' if args.proxies else 'off'}.",
        "",
        "| method | eval s | passes s | ratio | runs (eval / passes s) | goal met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for spec, r in rows.items():
        e, p = statistics.median(r["eval"]), statistics.median(r["passes"])
        runs = ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(r["eval"], r["passes"]))
        lines.append(f"| `{spec}` | {e:.1f} | {p:.1f} | **{e / p:.2f}** | {runs} | {'yes' if e / p <= GOAL else 'NO'} |")
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
