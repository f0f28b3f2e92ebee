"""Where the kernel sources are and how they are compiled (torch-free: no torch, no numpy).

The sources live in the repository's top-level ``kernels/``; the wheel carries them as the data
package ``kvc.gpu.cuda`` (pyproject.toml maps it to ``kernels/``), so an installed kvc finds them
next to this module. :func:`kernels_dir` resolves, in order:

1. ``$KVC_KERNELS_DIR``;
2. ``kvc/gpu/cuda/`` next to this module, if it exists (a wheel install);
3. the repository's ``kernels/`` (a checkout, or ``pip install -e .``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import KvcError

KERNEL_OPTIONS = ("--fmad=false",)
"""NVRTC/nvcc options of every kernel (the compile test uses the same): no FMA contraction, so that
the float operations written in the kernels are exactly the ones the torch reference performs."""

KERNEL_FILES = {
    "tq_encode": "turboquant", "tq_decode": "turboquant",
    "tq_score": "tq_attention", "tq_value": "tq_attention",
    "minmax_quantize": "minmax", "minmax_dequantize": "minmax",
}
"""Kernel entry point -> source file stem (``kernels/{stem}.cu``)."""

COMMON_HEADER = "kvc_common.cuh"
ENV_KERNELS_DIR = "KVC_KERNELS_DIR"
PACKAGED_DIR = Path(__file__).resolve().parent / "cuda"  # the data package kvc.gpu.cuda of a wheel
REPOSITORY_DIR = Path(__file__).resolve().parents[2] / "kernels"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"' + re.escape(COMMON_HEADER) + r'"\s*$', re.M)


def kernels_dir() -> Path:
    """The directory holding the kernel sources: ``$KVC_KERNELS_DIR``, else the installed package
    data ``kvc/gpu/cuda/``, else the repository's ``kernels/``."""
    env = os.environ.get(ENV_KERNELS_DIR)
    if env:
        return Path(env)
    return PACKAGED_DIR if PACKAGED_DIR.is_dir() else REPOSITORY_DIR


def kernel_source(name: str) -> str:
    """Source of ``{name}.cu`` with the common header inlined (so that a compile cache keyed on the
    source text sees header changes too)."""
    directory = kernels_dir()
    path = directory / f"{name}.cu"
    if not path.is_file():
        raise KvcError(f"kernel source {path} is missing (set {ENV_KERNELS_DIR} to the kernels/ directory)")
    header = (directory / COMMON_HEADER).read_text()
    return _INCLUDE.sub(lambda _: header, path.read_text())


__all__ = ["KERNEL_OPTIONS", "KERNEL_FILES", "COMMON_HEADER", "ENV_KERNELS_DIR", "kernels_dir", "kernel_source"]
