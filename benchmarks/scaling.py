"""Peak memory and time of capture, analyze, compress and eval against the token count (issue 14).

Usage: python benchmarks/scaling.py [--tokens 1024,2048,4096,8192] [--eval-tokens 1024,2048,4096,8192] [--runs 1]
For each length T: one sequence of T tokens, all 30 layers of the default model, on the CPU. Each
step runs as a fresh ``kvc`` process; its peak RSS is the child's own ``ru_maxrss`` (``os.wait4``)
and its wall time includes start-up and imports. Steps: ``kvc capture --seq-len T --num-seqs 1``
(queries at every position), ``kvc analyze`` of that capture, ``kvc compress -m turboquant --bits 3
--query-stride T/1024`` of it (the method sees every token; the fidelity metrics, attention chunked
over queries, use 1024 of the queries, so their work stays linear in T), and ``kvc eval -m
turboquant --bits 3 --contexts T-65 --query-stride T/1024`` (one perplexity window, the needle at
depth 0.5, the proxies from 1024 queries like compress's; its longest sequence, the context and 65
tokens, is then T tokens, within the default model's 8192 positions) for the lengths in --eval-tokens
only. OMP_NUM_THREADS defaults to 1 (a shared machine). Writes
docs/benchmarks/scaling.md with the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MB = 1536  # issue 14: the 1 x 8192 capture stays under 1.5 GB peak RSS
METHOD = ["-m", "turboquant", "--bits", "3"]
EVAL_TAIL = 65  # tokens kvc eval adds to a context: 64 continuation + 1 scored (evaluate.longest_sequence)
MEASURED_QUERIES = 1024  # compress and eval measure with every (T / 1024)-th query: metric work linear in T


def run(args: list[str]) -> tuple[float, float]:
    """(wall s, peak RSS MB) of one ``kvc`` process; stops the script on failure."""
    cmd = [sys.executable, "-c", "from kvc.cli import entry; entry()", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux: kilobytes


def steps(tokens: int, work: Path, with_eval: bool) -> dict[str, list[str]]:
    capture = str(work / f"scale{tokens}.safetensors")
    stride = str(max(1, tokens // MEASURED_QUERIES))
    out = {
        "capture": ["capture", "-o", capture, "--seq-len", str(tokens), "--num-seqs", "1", "--device", "cpu"],
        "analyze": ["analyze", capture, "--json", str(work / "analyze.json"), "--force", "--device", "cpu"],
        "compress": ["compress", capture, *METHOD, "--json", str(work / "compress.json"), "--force", "--device", "cpu",
                     "--query-stride", stride],
    }
    if with_eval:
        out["eval"] = ["eval", "--method", *METHOD[1:], "--contexts", str(tokens - EVAL_TAIL), "--windows", "1",
                       "--depths", "0.5", "--needles", "0", "--query-stride", stride, "--device", "cpu", "--json", str(work / "eval.json"),
                       "--force"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1024,2048,4096,8192")
    parser.add_argument("--eval-tokens", default="1024,2048,4096,8192")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "scaling.md")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    lengths = [int(t) for t in args.tokens.split(",")]
    eval_lengths = {int(t) for t in args.eval_tokens.split(",") if t}
    loads, rows = [os.getloadavg()[0]], {}
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in lengths:
            for name, cmd in steps(tokens, Path(tmp), tokens in eval_lengths).items():
                runs = [run(cmd) for _ in range(args.runs)]
                rows[(tokens, name)] = (statistics.median(w for w, _ in runs), max(m for _, m in runs))
                loads.append(os.getloadavg()[0])
                print(f"{tokens} {name}: {rows[(tokens, name)][0]:.1f} s, {rows[(tokens, name)][1]:.0f} MB",
                      file=sys.stderr)
                write(args, lengths, eval_lengths, loads, rows)  # after every step: a partial table survives
            (Path(tmp) / f"scale{tokens}.safetensors").unlink()


def write(args: argparse.Namespace, lengths: list[int], eval_lengths: set[int], loads: list[float],
          rows: dict[tuple[int, str], tuple[float, float]]) -> None:
    """The doc table of the steps measured so far (rows by T, '-' where not measured)."""
    names = ["capture", "analyze", "compress", "eval"]
    lines = [
        "# Peak memory and time against the token count",
        "",
        "Default model (SmolLM2-135M-Instruct, float32, 30 layers, 3 KV heads, head_dim 64), one sequence of "
        "T tokens, all 30 layers, CPU. Each cell: wall seconds / peak RSS in MB of one fresh `kvc` process "
        f"(start-up, imports and the model load included; median wall of {args.runs} run(s), max RSS).",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; load average {min(loads):.1f}-{max(loads):.1f} during "
        "the runs (other jobs share these cores: wall times are inflated by that load, memory is not).",
        "Steps: `kvc capture --seq-len T --num-seqs 1` (keys, values and queries at every position); "
        "`kvc analyze`; `kvc compress -m turboquant --bits 3 --query-stride T/1024` (the method compresses every "
        "token; the fidelity metrics attend from 1024 of the captured queries to all T keys); "
        f"`kvc eval -m turboquant --bits 3 --contexts T-{EVAL_TAIL} --windows 1 --depths 0.5 --needles 0 "
        "--query-stride T/1024` (two prefills of the context, perplexity and needle, each holding every layer's K, V, "
        f"K before RoPE and queries; with the {EVAL_TAIL} tokens scored after it the longest sequence is T tokens, "
        "within the model's 8192 positions; the proxies attend from 1024 of the queries)"
        + (f" (only at T = {', '.join(map(str, sorted(eval_lengths)))}: too slow on this shared machine for the "
           "other lengths)" if set(lengths) - eval_lengths else "") + ".",
        "",
        "| T | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for tokens in sorted(lengths):
        cells = [f"{rows[(tokens, n)][0]:.1f} s / {rows[(tokens, n)][1]:.0f} MB" if (tokens, n) in rows else "-"
                 for n in names]
        lines.append(f"| {tokens} | " + " | ".join(cells) + " |")
    if (8192, "capture") in rows:
        peak = rows[(8192, "capture")][1]
        lines += ["", f"1 x 8192-token capture of all 30 layers: {peak:.0f} MB peak RSS, "
                  f"{'under' if peak < LIMIT_MB else 'OVER'} the {LIMIT_MB} MB (1.5 GB) goal."]
    first, last = min(lengths), max(lengths)
    growth = [f"{n} x{rows[(last, n)][1] / rows[(first, n)][1]:.2f}" for n in names
              if (first, n) in rows and (last, n) in rows]
    if growth:
        lines += ["", f"Peak RSS growth from T = {first} to T = {last} (x{last / first:g} tokens): "
                  + ", ".join(growth) + " (the imports, and for capture and eval the model's ~540 MB of weights, are a "
                  "constant part)."]
    steps_mb = [f"{n} " + " / ".join(f"{1024 * (rows[(b, n)][1] - rows[(a, n)][1]) / (b - a):.0f}"
                                     for a, b in zip(sorted(lengths), sorted(lengths)[1:]))
                for n in names if all((t, n) in rows for t in lengths)]
    if len(lengths) > 2 and steps_mb:
        pairs = ", ".join(f"{a}-{b}" for a, b in zip(sorted(lengths), sorted(lengths)[1:]))
        lines += ["", f"Peak RSS added per 1024 tokens between successive T ({pairs}), MB: " + "; ".join(steps_mb)
                  + " (linear growth keeps these about constant; T x T attention would double them at each step). "
                  "Peak RSS also counts memory that glibc's allocator keeps after the metrics' chunked temporaries "
                  "are freed, so single runs of compress and eval can differ by a few hundred MB."]
    lines += ["", f"Reproduce: `python benchmarks/scaling.py --tokens {args.tokens} --eval-tokens {args.eval_tokens} "
              f"--runs {args.runs}`.", ""]
    args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
