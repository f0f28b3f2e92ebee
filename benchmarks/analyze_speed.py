"""Time ``kvc analyze`` on a 30-layer capture of the default model (4 x 512 tokens); target < 30 s.

Usage: python benchmarks/analyze_speed.py [--capture out/default.safetensors] [--runs 3]
Makes the capture with ``kvc capture`` when it is missing, runs each configuration ``--runs`` times
as a fresh process (start-up included), and writes the table to docs/benchmarks/analyze_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 30.0
CONFIGS = [  # (label, extra analyze arguments, extra environment)
    ("pooled, default threads", [], {}),
    ("pooled, OMP_NUM_THREADS=1", [], {"OMP_NUM_THREADS": "1"}),
    ("--block 128, default threads", ["--block", "128"], {}),
    ("--block 128, OMP_NUM_THREADS=1", ["--block", "128"], {"OMP_NUM_THREADS": "1"}),
]


def kvc(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from kvc.cli import entry; entry()", *args]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)


def time_run(capture: Path, extra: list[str], env: dict) -> tuple[float, float, int]:
    """(wall seconds of the process, seconds inside analyze_capture, records) of one run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        start = time.perf_counter()
        proc = kvc("analyze", str(capture), "--json", str(out), *extra, env=env)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"kvc analyze failed ({proc.returncode}): {proc.stderr.strip()}")
        report = json.loads(out.read_text())
    return wall, report["summary"]["seconds"], len(report["heads"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", type=Path, default=ROOT / "out" / "default.safetensors")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "analyze_speed.md")
    args = parser.parse_args()
    if not args.capture.exists():
        print(f"making {args.capture} with kvc capture (30 layers, 4 x 512 tokens)", file=sys.stderr)
        proc = kvc("capture", "-o", str(args.capture))
        if proc.returncode:
            sys.exit(f"kvc capture failed: {proc.stderr.strip()}")
    load_before = os.getloadavg()
    rows = []
    for label, extra, env in CONFIGS:
        runs = [time_run(args.capture, extra, env) for _ in range(args.runs)]
        wall = statistics.median(r[0] for r in runs)
        inner = statistics.median(r[1] for r in runs)
        rows.append((label, runs[0][2], wall, inner, min(r[0] for r in runs), max(r[0] for r in runs)))
        print(f"{label}: median {wall:.1f} s wall, {inner:.1f} s analysis", file=sys.stderr)
    load_after = os.getloadavg()
    lines = [
        "# `kvc analyze` speed",
        "",
        f"Capture: `{args.capture.relative_to(ROOT) if args.capture.is_relative_to(ROOT) else args.capture}` "
        "(SmolLM2-135M-Instruct, 30 layers x 3 KV heads, head_dim 64, 4 x 512 tokens; k_pre, k, v).",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} intra-op threads by default; load average "
        f"{load_before[0]:.1f} before and {load_after[0]:.1f} after (other jobs share these cores).",
        f"Each row: median of {args.runs} fresh `kvc analyze CAPTURE --json FILE` processes; wall includes "
        "Python start-up and imports, analysis is `summary.seconds` (reading the capture and all numerics).",
        f"Target: < {TARGET_S:.0f} s on 2 CPU cores.",
        "",
        "| configuration | records | wall median (s) | analysis median (s) | wall min-max (s) | < 30 s |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for label, records, wall, inner, lo, hi in rows:
        lines.append(f"| {label} | {records} | {wall:.1f} | {inner:.1f} | {lo:.1f}-{hi:.1f} | "
                     f"{'yes' if wall < TARGET_S else 'no'} |")
    lines += [
        "",
        "The batched LAPACK calls on these small matrices already run on one thread (`kvc.analysis.rmt.small_lapack`); "
        "the other operations use torch's threads. With the cores to itself, analyze gains a little from them; "
        "when other processes share the cores, every parallel region waits for a core and the default threads "
        "can be several times slower than one (`OMP_NUM_THREADS=1` is then the faster setting; compare the rows "
        "with the load average above).",
        "",
        f"Reproduce: `python benchmarks/analyze_speed.py --runs {args.runs}`.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
