"""Run the long profile of the fuzz suite (tests/test_fuzz.py) and print how many cases ran.

    python scripts/fuzz_long.py                      # KVC_FUZZ=long: 40 x the CI examples of each test
    python scripts/fuzz_long.py --scale 10 --keep-going   # survey: log every violation, keep generating
    python scripts/fuzz_long.py -- -k command_lines  # arguments after -- go to pytest

Without --keep-going a test stops at its first violation and Hypothesis shrinks it to a minimal
example (printed with a @reproduce_failure line). With --keep-going every violation is logged and
listed at the end, grouped by kind, command and message, with one command line each. Prints the
cases run per test and per exit code. Exit code: pytest's (1 when a violation was found).
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summarize(log: Path, seconds: float) -> None:
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    cases = [e for e in entries if "code" in e and e["test"].endswith("(call)")]
    per_test = collections.Counter(e["test"].split("::")[-1].split(" ")[0] for e in cases)
    codes = collections.Counter("escaped" if e["code"] is None else str(e["code"]) for e in cases)
    print(f"\nkvc fuzz, long profile, {datetime.date.today()}: {len(cases)} cases in {seconds / 60:.1f} min")
    for test, n in per_test.most_common():
        print(f"  {n:6d}  {test}")
    print("  exit codes: " + ", ".join(f"{code}: {n}" for code, n in sorted(codes.items())))
    classes: dict[str, list[dict]] = collections.defaultdict(list)
    for e in entries:
        if "violation" in e:
            classes[violation_class(e)].append(e)
    if classes:
        print(f"\n{sum(map(len, classes.values()))} violations in {len(classes)} classes:")
        for key, members in sorted(classes.items(), key=lambda kv: -len(kv[1])):
            print(f"  {len(members):5d}  {key}\n         e.g. kvc {' '.join(map(repr, members[0]['argv']))}"[:600])


def violation_class(entry: dict) -> str:
    """Kind of violation | command | its first stderr line with paths, numbers and quoted values blanked."""
    text = entry["violation"]
    kind = text.split(": kvc ")[0]
    command = next((a for a in entry["argv"] if a != "--debug"), "")
    stderr = ""
    if "; stderr: " in text:
        with contextlib.suppress(ValueError, SyntaxError):
            lines = [line for line in ast.literal_eval(text.split("; stderr: ", 1)[1]).splitlines() if line.strip()]
            stderr = lines[0] if lines else ""
    stderr = re.sub(r"\S+\.(safetensors|kvcz|json|toml|md|xml)\b|'[^']*'|\"[^\"]*\"|-?\d+(\.\d+)?(e-?\d+)?", "#", stderr)
    return f"{kind} | {command} | {stderr[:160]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=40, help="examples = SCALE x the CI profile's (default 40)")
    parser.add_argument("--keep-going", action="store_true", help="log violations instead of stopping at the first")
    parser.add_argument("--log", type=Path, help="keep the per-case JSON-lines log at this path")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    log = args.log or Path(tempfile.mkdtemp(prefix="kvc-fuzz-")) / "cases.jsonl"
    log.unlink(missing_ok=True)
    env = {**os.environ, "KVC_FUZZ": "long", "KVC_FUZZ_SCALE": str(args.scale), "KVC_FUZZ_LOG": str(log)}
    env.setdefault("OMP_NUM_THREADS", "1")
    if args.keep_going:
        env["KVC_FUZZ_KEEP_GOING"] = "1"
    start = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py",
                            *args.pytest_args], cwd=ROOT, env=env)
    summarize(log, time.perf_counter() - start)
    print(f"log: {log}")
    return code


if __name__ == "__main__":
    sys.exit(main())
