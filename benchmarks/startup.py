"""Start-up time of ``kvc --help``, ``kvc methods`` and ``kvc info`` against ``python -c "import typer, rich"``.

Usage: python benchmarks/startup.py [--runs 7] [--out docs/benchmarks/startup.md]
Each round runs every command once as a fresh process, in turn (so machine load hits all alike);
the table gives the median wall time of each and its ratio to the bare ``import typer, rich``
(the floor of any typer CLI). ``kvc info`` reads a small synthetic capture made with ``kvc synth``.
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


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "startup.md")
    args = parser.parse_args()
    kvc = [sys.executable, "-m", "kvc"]
    with tempfile.TemporaryDirectory() as tmp:
        capture = Path(tmp) / "synth.safetensors"
        wall(kvc + ["synth", "-o", str(capture), "--layers", "2"])
        commands = {
            'python -c "import typer, rich"': [sys.executable, "-c", "import typer, rich"],
            "kvc --help": kvc + ["--help"],
            "kvc compress --help": kvc + ["compress", "--help"],
            "kvc methods": kvc + ["methods"],
            "kvc info CAPTURE": kvc + ["info", str(capture)],
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
        }
        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {label: [] for label in commands}
        for _ in range(args.runs):
            for label, argv in commands.items():
                times[label].append(wall(argv))
        load_after = os.getloadavg()[0]
    base = statistics.median(times['python -c "import typer, rich"'])
    lines = [
        "# Start-up time",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}; "
        f"load average {load_before:.1f} before and {load_after:.1f} after (other jobs share these cores).",
        f"Each row: median wall time of {args.runs} fresh processes, run in turn with the others; the ratio is "
        'to `python -c "import typer, rich"` in the same run. `import torch` is shown for scale: no row '
        "above it imports torch, scipy, transformers or matplotlib (tests/test_startup.py checks that).",
        "",
        "| command | median (s) | min-max (s) | ratio to import typer, rich |",
        "|---|---:|---:|---:|",
    ]
    for label, values in times.items():
        median = statistics.median(values)
        lines.append(f"| `{label}` | {median:.2f} | {min(values):.2f}-{max(values):.2f} | {median / base:.2f} |")
    lines += ["", f"Reproduce: `python benchmarks/startup.py --runs {args.runs}`.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
