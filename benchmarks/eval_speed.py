"""Time ``kvc eval`` at its default settings on the default model on CPU; target < 5 minutes per method.

Usage: python benchmarks/eval_speed.py [--methods "turboquant --bits 2" "kivi --bits 2" ...]
Each method runs as a fresh process (start-up and model load included), with torch's default
threads and with ``OMP_NUM_THREADS=1``. The machine's load average is recorded beside each run: on
a shared machine, wall time grows with it. Writes docs/benchmarks/eval_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 300.0
METHODS = ["turboquant --bits 2", "snapkv --budget 0.25"]
THREADS = [("default", {}), ("1", {"OMP_NUM_THREADS": "1"})]


def time_run(method: str, threads: str, env: dict) -> dict:
    """Wall and CPU seconds of one ``kvc eval`` process, with the load average around it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        cmd = [sys.executable, "-c", "from kvc.cli import entry; entry()", "eval", "--method",
               *shlex.split(method), "--device", "cpu", "--json", str(out)]
        load_before = os.getloadavg()[0]
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
        wall = time.perf_counter() - start
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            sys.exit(f"kvc eval --method {method} failed ({proc.returncode}): {proc.stderr.strip()}")
        result = json.loads(out.read_text())
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"method": method, "threads": threads, "wall": wall, "cpu": cpu,
            "load": (load_before + os.getloadavg()[0]) / 2,
            "inside": result["seconds"], "bits": result["bits_per_entry"],
            "delta_rel": result["perplexity"]["delta_rel"],
            "needle": (result["retrieval"]["single"]["overall_base"], result["retrieval"]["single"]["overall"]),
            "multi": (result["retrieval"]["multi"]["overall_base"], result["retrieval"]["multi"]["overall"]),
            "settings": result["settings"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "eval_speed.md")
    args = parser.parse_args()
    rows = [time_run(m, threads, env) for m in args.methods for threads, env in THREADS]
    s = rows[0]["settings"]
    lines = [
        "# `kvc eval` wall time at default settings (default model, CPU)",
        "",
        f"Made by `python benchmarks/eval_speed.py` on {time.strftime('%Y-%m-%d')}: {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, one fresh process per "
        "method (start-up and model load included). Target: under "
        f"{TARGET_S / 60:.0f} minutes per method.",
        "",
        f"Default settings: contexts {s['contexts']} tokens; perplexity on {s['windows']} windows x "
        f"{s['continuation']} scored tokens per context; single needle at depths {s['depths']} x "
        f"{s['trials']} trial(s); multi-needle with {s['needles']} facts; tensor proxies measured.",
        "",
        "| method | threads | wall s | CPU s | load avg | method's own s | bits/entry | ppl delta | needle base -> method | multi-needle base -> method | under target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['method']}` | {r['threads']} | {r['wall']:.0f} | {r['cpu']:.0f} | {r['load']:.1f} | {r['inside']:.0f} | "
                     f"{r['bits']:.3f} | {100 * r['delta_rel']:+.2f}% | {r['needle'][0]:.0%} -> {r['needle'][1]:.0%} | "
                     f"{r['multi'][0]:.0%} -> {r['multi'][1]:.0%} | {'yes' if r['wall'] < TARGET_S else 'NO'} |")
    lines += ["", "Wall time is what a user waits; CPU time is the work (summed over threads). \"Load avg\" is the "
              "1-minute load average around the run: above the core count, other processes shared the CPUs and "
              "the wall time is inflated accordingly; with torch's default threads OpenMP's barrier waits then "
              "multiply the CPU time too, which `OMP_NUM_THREADS=1` avoids. \"Method's own s\" is the time "
              "spent compressing and "
              "scoring with the method's cache (the prefills and the uncompressed baseline are shared and not "
              "in it).", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
