#!/usr/bin/env python
"""GPU kernel benchmark: the same as ``kvc bench`` (one implementation: kvc/gpu/bench.py).

    python benchmarks/gpu_bench.py                         # synthetic 30 layers x 8k tokens, 2 bits
    python benchmarks/gpu_bench.py capture.safetensors --bits 3 --markdown
    python benchmarks/gpu_bench.py --rotation haar --json out/gpu_bench.json

Prints a table: for each operation the kernel and the torch reference on the same GPU, in one
process, as GB/s, as a fraction of the device's copy bandwidth (cupy memcpy) and as a speedup.
Without a GPU or without cupy: one line saying what is missing, exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kvc.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
