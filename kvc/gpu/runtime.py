"""Loading and launching the CUDA kernels (sources: :mod:`kvc.gpu.sources`); availability and ``--device cuda``.

Kernels are launched through a *backend*:

- :class:`CupyBackend` (the real one): each source file is compiled once per device with
  ``cupy.RawModule`` (NVRTC, ``--fmad=false``) and launched on torch's current CUDA stream, so that
  kernels and torch operations are ordered without synchronisation. Arguments are passed by value
  (pointers as 64-bit integers), so no array-interface conversion or implicit stream sync happens.
- ``kvc.gpu.emulator.EmulatorBackend`` (tests only): the same kernel sources compiled for the CPU
  with g++ and run thread by thread; it takes CPU tensors. It is active only inside
  :func:`use_backend`, never by default.

Nothing here imports cupy at module import time; ``import kvc.gpu`` is cheap and works without it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import KvcError
from ..model.load import resolve_device
from .sources import ENV_KERNELS_DIR, KERNEL_FILES, KERNEL_OPTIONS, kernel_source, kernels_dir

ENV_DISABLE = "KVC_GPU_KERNELS"  # "0": never use the kernels (torch path everywhere)


# ----------------------------------------------------------------------------- availability


@functools.lru_cache(maxsize=1)
def _cupy_import_error() -> str | None:
    try:
        import cupy  # noqa: F401
    except Exception as err:  # ImportError, or a broken CUDA runtime behind it
        return f"{type(err).__name__}: {err}"
    return None


def missing(device: str | torch.device | None = None) -> list[str]:
    """What is missing for the GPU kernels on ``device`` (empty list: nothing)."""
    items = []
    if not torch.cuda.is_available():
        items.append("no CUDA GPU is visible to torch")
    elif device is not None:
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            items.append(f"GPU {index} does not exist ({torch.cuda.device_count()} visible)")
    error = _cupy_import_error()
    if error is not None:
        detail = "" if error.startswith("ModuleNotFoundError") else f" ({error})"
        items.append(f"cupy is not installed{detail} (pip install 'kvc[gpu]', i.e. cupy-cuda12x)")
    if not kernels_dir().is_dir():
        items.append(f"the kernel sources are not found at {kernels_dir()} (set {ENV_KERNELS_DIR})")
    return items


def available() -> bool:
    """True when the CUDA kernels can run: a GPU, cupy, the sources, and KVC_GPU_KERNELS != 0."""
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return False
    return not missing()


def require(device: str | torch.device) -> None:
    """KvcError (one line, exit 2) when ``device`` is a CUDA device and the GPU or cupy is missing.

    Commands call this right after parsing ``--device`` (``auto`` resolves to cpu without a GPU and
    passes; ``cuda`` without cupy does not: the user asked for the GPU path)."""
    text = str(device)
    if not text.startswith("cuda"):
        return
    items = missing(text)
    if items:
        raise KvcError(f"--device {text} needs a CUDA GPU and cupy: {' and '.join(items)}")


# ----------------------------------------------------------------------------- backends


class Arg:
    """A kernel argument by value: kind 'ptr' (tensor or None), 'i64', 'i32' or 'f32'."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value):
        self.kind, self.value = kind, value


def ptr(t: torch.Tensor | None) -> Arg:
    return Arg("ptr", 0 if t is None else int(t.data_ptr()))


def i64(v: int) -> Arg:
    return Arg("i64", int(v))


def i32(v: int) -> Arg:
    return Arg("i32", int(v))


def f32(v: float) -> Arg:
    return Arg("f32", float(v))


class Backend:
    """Launches kernels by name; ``accepts`` says which tensors (devices) it works on."""

    name = "none"
    block_threads = 256

    def accepts(self, device: torch.device) -> bool:
        raise NotImplementedError

    def launch(self, kernel: str, grid: Sequence[int], block: int, args: Sequence[Arg],
               device: torch.device) -> None:
        raise NotImplementedError

    def synchronize(self, device: torch.device) -> None:
        pass


class CupyBackend(Backend):
    """cupy.RawModule per (source file, device), launched on torch's current stream."""

    name = "cupy"

    def __init__(self):
        self._modules: dict[tuple[str, int], object] = {}
        self._functions: dict[tuple[str, int], object] = {}
        self._streams: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()

    def accepts(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def _function(self, kernel: str, index: int):
        key = (kernel, index)
        fn = self._functions.get(key)
        if fn is None:
            import cupy

            with self._lock, cupy.cuda.Device(index):
                mkey = (KERNEL_FILES[kernel], index)
                module = self._modules.get(mkey)
                if module is None:  # compiled (NVRTC) on first use; cupy caches the binary on disk
                    module = self._modules[mkey] = cupy.RawModule(code=kernel_source(mkey[0]),
                                                                  options=KERNEL_OPTIONS)
                fn = self._functions[key] = module.get_function(kernel)
        return fn

    def launch(self, kernel, grid, block, args, device):
        import cupy

        index = device.index if device.index is not None else torch.cuda.current_device()
        fn = self._function(kernel, index)
        conv = {"ptr": np.uint64, "i64": np.int64, "i32": np.int32, "f32": np.float32}
        values = tuple(conv[a.kind](a.value) for a in args)
        grid3 = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        with cupy.cuda.Device(index), self._stream(index):
            fn(grid3, (int(block), 1, 1), values)

    def _stream(self, index: int):
        """torch's current stream on device ``index`` as a cupy stream (cached per stream)."""
        import cupy

        ts = torch.cuda.current_stream(index)
        key = (index, ts.cuda_stream)
        stream = self._streams.get(key)
        if stream is None:
            if hasattr(cupy.cuda.Stream, "from_external") and hasattr(ts, "__cuda_stream__"):
                stream = cupy.cuda.Stream.from_external(ts)  # cupy >= 14
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    stream = cupy.cuda.ExternalStream(ts.cuda_stream, index)
            self._streams[key] = stream
        return stream

    def synchronize(self, device):
        torch.cuda.synchronize(device)


_CUPY: CupyBackend | None = None
_OVERRIDE: list[Backend] = []


def active_backend() -> Backend | None:
    """The backend kernels go to: a :func:`use_backend` override, else cupy when :func:`available`."""
    global _CUPY
    if _OVERRIDE:
        return _OVERRIDE[-1]
    if not available():
        return None
    if _CUPY is None:
        _CUPY = CupyBackend()
    return _CUPY


def backend_for(t: torch.Tensor) -> Backend | None:
    """The backend that takes tensors on ``t``'s device, or None (then the torch path runs)."""
    be = active_backend()
    return be if be is not None and be.accepts(t.device) else None


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[Backend]:
    """Route kernels to ``backend`` inside the block (tests: the CPU emulator)."""
    _OVERRIDE.append(backend)
    try:
        yield backend
    finally:
        _OVERRIDE.remove(backend)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def require_device(device: str) -> torch.device:
    """``--device`` resolved (kvc.model.load.resolve_device), with cupy required for a CUDA device."""
    resolved = resolve_device(device)
    require(resolved)
    return resolved


__all__ = ["ENV_DISABLE", "available", "missing", "require", "require_device", "active_backend", "backend_for",
           "use_backend", "Backend", "CupyBackend", "Arg", "ptr", "i64", "i32", "f32", "cdiv", "is_pow2"]
