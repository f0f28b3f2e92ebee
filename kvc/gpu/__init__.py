"""CUDA kernels for the hot paths (``kernels/*.cu``, loaded with cupy.RawModule), behind a torch fallback.

Design and numbers: docs/gpu.md. The seam for the compression methods is the set of functions below
(:mod:`kvc.gpu.ops`); each equals a torch reference expression (:mod:`kvc.gpu.kernels`) and falls back
to it whenever the kernel cannot run (no GPU or no cupy, a CPU tensor, an unsupported shape, a
failed self-check)::

    from kvc import gpu
    packed, norms = gpu.tq_mse_encode_packed(x, bits, rotation, codebook)   # TurboQuant-mse + pack
    x_hat = gpu.tq_mse_decode_packed(packed, bits, shape, norms, rotation, codebook)
    logits = gpu.tq_score_packed(q, packed, bits, shape, norms, rotation, codebook)  # q K_hat^T
    out = gpu.tq_value_packed(w, packed, bits, shape, norms, rotation, codebook)     # w V_hat
    packed, scale, zero = gpu.minmax_quantize_packed(x, bits, group)          # KIVI / int + pack
    x_hat = gpu.minmax_dequantize_packed(packed, bits, shape, scale, zero)

``gpu.available()`` says whether the kernels can run; ``gpu.require(device)`` raises the one-line
KvcError of ``--device cuda`` without a GPU or without cupy; ``gpu.kernels_dir()`` is where the
kernel sources are read from (:mod:`kvc.gpu.sources`).

This package face is lazy: ``import kvc.gpu`` imports nothing heavy; a name is imported from its
module on first use (torch for everything but ``kernels_dir``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "available": "runtime", "missing": "runtime", "require": "runtime", "require_device": "runtime",
    "kernels_dir": "sources",
    "tq_mse_encode_packed": "ops", "tq_mse_decode_packed": "ops", "tq_score_packed": "ops",
    "tq_value_packed": "ops", "minmax_quantize_packed": "ops", "minmax_dequantize_packed": "ops",
}
_SUBMODULES = ("bench", "emulator", "kernels", "ops", "runtime", "selfcheck", "sources")

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
