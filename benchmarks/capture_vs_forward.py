"""``kvc capture`` against the bare forward passes of the same windows, side by side in one run.

Usage: python benchmarks/capture_vs_forward.py [--num-seqs 4] [--seq-len 512] [--runs 3] [--threads 1]
One process, one model (the default, SmolLM2-135M-Instruct, float32 on CPU), one thread count; each
round times, in turn, ``kvc.capture`` of N windows (every layer, written to a temporary file), the
model's forward passes of the same token windows one by one (``model(input_ids, use_cache=False)``,
logits included) and those of its base model (no LM head: all that capture has to run). Rounds are
interleaved so that a change of machine load hits all three alike; the table (medians, ratios) goes
to docs/benchmarks/capture_vs_forward.md. Goal (issue 14): capture wall <= 1.3x the forward.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import kvc

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.3


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "capture_vs_forward.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = kvc.load_model(dtype="float32", device="cpu")
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"capture": [], "forward": [], "base": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "capture.safetensors"

        def capture():
            cap = kvc.capture(model, out=out, tokenizer=tokenizer, seq_len=args.seq_len,
                              num_seqs=args.num_seqs, force=True)
            return cap

        windows = capture().input_ids  # warm-up, and the very tokens the forward passes get
        size = out.stat().st_size

        def forward(module):
            with torch.inference_mode():
                for i in range(windows.shape[0]):
                    module(input_ids=windows[i:i + 1], use_cache=False)

        for r in range(args.runs):
            times["capture"].append(timed(capture))
            times["forward"].append(timed(lambda: forward(model)))
            times["base"].append(timed(lambda: forward(model.model)))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: f"{min(v):.2f}-{max(v):.2f}" for k, v in times.items()}
    ratio = med["capture"] / med["forward"]
    lines = [
        "# `kvc capture` vs the bare forward passes",
        "",
        f"Model: SmolLM2-135M-Instruct, float32, CPU; {args.num_seqs} window(s) x {args.seq_len} tokens, one "
        f"window per forward pass, all {model.config.num_hidden_layers} layers captured "
        f"(k_pre, k, v, q_pre, q; {size / 1e6:.0f} MB file).",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, {args.threads} intra-op thread(s) for all three; load average "
        f"{load_before[0]:.1f} before and {load_after[0]:.1f} after (other jobs share these cores).",
        f"One process, {args.runs} interleaved rounds; each cell the median (min-max) in seconds. "
        "capture: `kvc.capture` of the loaded model (tokenizing, hooks, copies, writing the file); "
        "forward: `model(input_ids, use_cache=False)` of the same windows, logits included; "
        "base: the same through the base model (no final norm and LM head, which capture skips).",
        "",
        "| capture (s) | forward (s) | base forward (s) | capture / forward | capture / base | goal <= 1.3x |",
        "|---:|---:|---:|---:|---:|:---:|",
        f"| {med['capture']:.2f} ({spread['capture']}) | {med['forward']:.2f} ({spread['forward']}) | "
        f"{med['base']:.2f} ({spread['base']}) | {ratio:.2f}x | {med['capture'] / med['base']:.2f}x | "
        f"{'yes' if ratio <= GOAL else 'no'} |",
        "",
        f"Reproduce: `python benchmarks/capture_vs_forward.py --num-seqs {args.num_seqs} --seq-len "
        f"{args.seq_len} --runs {args.runs} --threads {args.threads}`.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
