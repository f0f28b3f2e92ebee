"""Regenerate ci/baseline.json: run ci/policy.toml (capture + compression on the default model)
and save the kvc check report that CI compares against. Run after an intended change of figures:

    python scripts/make_ci_baseline.py

Exit code as kvc check's: 1 when the new figures break the policy's limits (the file is written
anyway, so the change can be inspected).
"""

import os
import sys
from pathlib import Path

from kvc.cli import main

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    os.chdir(ROOT)  # the report records the policy path; keep it relative
    sys.exit(main(["check", "--policy", "ci/policy.toml", "--json", "ci/baseline.json", "--force"]))
