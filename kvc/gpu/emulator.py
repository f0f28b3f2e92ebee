"""CPU emulation backend: the kernel sources of ``kernels/*.cu`` built with g++ and run on CPU tensors.

For tests and for machines without a GPU: it runs the *same* kernel code (blocks one after another,
one OS thread per CUDA thread, barriers for ``__syncthreads`` and warp shuffles; see
``kernels/emulation/kvc_emu.hpp``), so the indexing, bit layout, butterfly order and float
operations of the kernels, and every wrapper in :mod:`kvc.gpu.ops`, can be checked against the torch
reference without a GPU. It is slow (thousands of threads per launch) and only active inside
``kvc.gpu.runtime.use_backend(EmulatorBackend())``::

    with use_backend(EmulatorBackend()):
        packed, norms = ops.tq_mse_encode_packed(x_cpu, 2, rotation)

The shared library is cached under ``$KVC_CACHE_DIR/gpu-emulator`` (default ``~/.cache/kvc``), keyed
by a hash of the sources.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ..errors import KvcError
from .runtime import Backend
from .sources import KERNEL_FILES, kernels_dir

EMULATOR_FLAGS = ("-std=c++20", "-O1", "-ffp-contract=off", "-fno-fast-math", "-Wno-unknown-pragmas",
                  "-shared", "-fPIC")
_LOCK = threading.Lock()


def _cache_dir() -> Path:
    root = os.environ.get("KVC_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "kvc") / "gpu-emulator"


def emulator_sources() -> list[Path]:
    d = kernels_dir()
    names = sorted(set(KERNEL_FILES.values()))
    return ([d / "emulation" / "kvc_emu.cpp", d / "emulation" / "kvc_emu.hpp", d / "kvc_common.cuh"]
            + [d / f"{n}.cu" for n in names])


def build_emulator(compiler: str | None = None) -> Path:
    """Compile (or reuse) the emulator shared library; KvcError when no C++20 compiler is found."""
    cxx = compiler or os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        raise KvcError("the kernel emulator needs g++ (C++20); none found")
    digest = hashlib.sha256()
    for path in emulator_sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join(EMULATOR_FLAGS).encode())
    out = _cache_dir() / f"kvc_emu_{digest.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [cxx, *EMULATOR_FLAGS, str(kernels_dir() / "emulation" / "kvc_emu.cpp"), "-o", str(tmp_out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KvcError(f"building the kernel emulator failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp_out, out)
    return out


class EmulatorBackend(Backend):
    """Runs the kernels on the CPU (CPU tensors only); see the module docstring."""

    name = "emulator"

    def __init__(self, block_threads: int = 256, library: Path | None = None):
        self.block_threads = block_threads
        with _LOCK:
            self._lib = ctypes.CDLL(str(library or build_emulator()))
        self._lib.kvc_emu_launch.restype = ctypes.c_int
        self._lib.kvc_emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                             ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
        self.launches: list[tuple[str, tuple[int, ...], int]] = []

    def accepts(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def launch(self, kernel, grid, block, args, device):
        ctype = {"ptr": ctypes.c_void_p, "i64": ctypes.c_longlong, "i32": ctypes.c_int, "f32": ctypes.c_float}
        values = [ctype[a.kind](a.value) for a in args]
        argv = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        grid3 = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        self.launches.append((kernel, grid3, int(block)))
        rc = self._lib.kvc_emu_launch(kernel.encode(), *grid3, int(block), argv)
        if rc != 0:
            raise KvcError(f"emulated launch of {kernel} failed (code {rc})")
