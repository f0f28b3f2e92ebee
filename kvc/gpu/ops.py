"""The public seam of the GPU kernels: each function equals a torch reference expression.

Every function has the arguments of its reference (``kvc.gpu.kernels.reference_*`` of the same name,
built from kvc.quant) and returns the same arrays. It runs the kernel when

1. a backend takes the tensor's device (``x.is_cuda and kvc.gpu.available()``; or the CPU emulator
   inside ``use_backend``), and
2. the configuration is one the kernel handles (see each ``*_plan`` in :mod:`kvc.gpu.kernels`), and
3. the kernel passed its self-check against the reference on that device (:mod:`kvc.gpu.selfcheck`,
   run once per device and configuration; on disagreement it warns once and the reference is used);

otherwise it runs the reference itself. So a method may call these unconditionally: on the CPU
path it gets exactly what it got before (the reference expressions are the ones the methods use).
How close the kernels' outputs are to the reference's: :mod:`kvc.gpu.kernels`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..quant.packing import packed_nbytes
from ..quant.rotation import Rotation
from ..quant.turboquant import tq_codebook
from .kernels import (FLOATS, SCORE_QC, VALUE_QV, attention_plan, minmax_dequantize_kernel, minmax_plan,
                      minmax_quantize_kernel, packed_ok, poison_enabled, reference_minmax_dequantize_packed,
                      reference_minmax_quantize_packed, reference_tq_mse_decode_packed,
                      reference_tq_mse_encode_packed, reference_tq_score_packed, reference_tq_value_packed,
                      tq_decode_kernel, tq_encode_kernel, tq_plan, tq_score_kernel, tq_value_kernel)
from .runtime import backend_for, cdiv
from .selfcheck import verified


# ----------------------------------------------------------------------------- TurboQuant encode / decode


def tq_mse_encode_packed(x: Tensor, bits: int, rotation: Rotation, codebook: Tensor | None = None
                         ) -> tuple[Tensor, Tensor]:
    """= :func:`kvc.gpu.kernels.reference_tq_mse_encode_packed`: (packed codes uint8, norms float16 [...])."""
    be = backend_for(x)
    if be is not None and x.dtype in FLOATS and x.numel() and x.dim() >= 1:
        d = x.shape[-1]
        cb = tq_codebook(d, bits) if codebook is None else codebook
        mode = tq_plan(d, bits, rotation)
        if mode is not None and cb.numel() == 1 << bits and verified(be, x.device, "tq_encode", (d, bits, mode)):
            return tq_encode_kernel(be, x, bits, rotation, cb, mode, poison=poison_enabled())
    return reference_tq_mse_encode_packed(x, bits, rotation, codebook)


def tq_mse_decode_packed(packed: Tensor, bits: int, shape, norms: Tensor, rotation: Rotation,
                         codebook: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """= :func:`kvc.gpu.kernels.reference_tq_mse_decode_packed`: x_hat [shape] in ``dtype``."""
    shape = tuple(shape)
    be = backend_for(packed)
    if be is not None and dtype == torch.float32 and len(shape) >= 1 and packed_ok(packed, bits, shape, norms):
        mode = tq_plan(shape[-1], bits, rotation)
        if (mode is not None and codebook.numel() == 1 << bits
                and verified(be, packed.device, "tq_decode", (shape[-1], bits, mode))):
            return tq_decode_kernel(be, packed, bits, shape, norms, rotation, codebook, mode, poison_enabled())
    return reference_tq_mse_decode_packed(packed, bits, shape, norms, rotation, codebook, dtype)


# ----------------------------------------------------------------------------- scoring from packed codes


def tq_score_packed(q: Tensor, packed: Tensor, bits: int, shape, norms: Tensor, rotation: Rotation,
                    codebook: Tensor) -> Tensor:
    """= :func:`kvc.gpu.kernels.reference_tq_score_packed`: logits <q, k_hat> [S, H_q, Tq, T] without
    forming K_hat (queries rotated once; the kernel reads the packed codes and norms only)."""
    shape = tuple(shape)
    be = backend_for(packed)
    if (be is not None and len(shape) == 4 and q.dim() == 4 and q.dtype in FLOATS and q.device == packed.device
            and q.shape[0] == shape[0] and q.shape[-1] == shape[-1] and q.shape[1] % shape[1] == 0
            and q.shape[2] > 0 and cdiv(q.shape[1] // shape[1] * q.shape[2], SCORE_QC) <= 65535
            and packed_ok(packed, bits, shape, norms) and codebook.numel() == 1 << bits
            and attention_plan("score", shape, bits, rotation)
            and verified(be, packed.device, "tq_score", (shape[-1], bits))):
        return tq_score_kernel(be, q, packed, bits, shape, norms, rotation, codebook, poison_enabled())
    return reference_tq_score_packed(q, packed, bits, shape, norms, rotation, codebook)


def tq_value_packed(w: Tensor, packed: Tensor, bits: int, shape, norms: Tensor, rotation: Rotation,
                    codebook: Tensor) -> Tensor:
    """= :func:`kvc.gpu.kernels.reference_tq_value_packed`: w V_hat [S, H_q, Tq, D], accumulated in
    the rotated domain from the packed values; Pi^T applied once per query row."""
    shape = tuple(shape)
    be = backend_for(packed)
    if (be is not None and len(shape) == 4 and w.dim() == 4 and w.dtype in FLOATS and w.device == packed.device
            and w.shape[0] == shape[0] and w.shape[-1] == shape[2] and w.shape[1] % shape[1] == 0
            and w.shape[2] > 0 and cdiv(w.shape[1] // shape[1] * w.shape[2], VALUE_QV) <= 65535
            and packed_ok(packed, bits, shape, norms) and codebook.numel() == 1 << bits
            and attention_plan("value", shape, bits, rotation)
            and verified(be, packed.device, "tq_value", (shape[-1], bits))):
        return tq_value_kernel(be, w, packed, bits, shape, norms, rotation, codebook, poison_enabled())
    return reference_tq_value_packed(w, packed, bits, shape, norms, rotation, codebook)


# ----------------------------------------------------------------------------- min/max groups (KIVI, int)


def minmax_quantize_packed(x: Tensor, bits: int, group: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """= :func:`kvc.gpu.kernels.reference_minmax_quantize_packed`: (packed codes, scale float16, zero
    float16)."""
    be = backend_for(x)
    if be is not None:
        plan = minmax_plan(x, bits, group)
        if plan is not None:
            xv, g, word_mode = plan
            layout = "cols" if xv.stride(1) == 1 and xv.stride(2) != 1 else "rows"
            if verified(be, x.device, "minmax_quantize", (bits, g, word_mode, layout)):
                return minmax_quantize_kernel(be, x, bits, group, poison_enabled())
    return reference_minmax_quantize_packed(x, bits, group)


def minmax_dequantize_packed(packed: Tensor, bits: int, shape, scale: Tensor, zero: Tensor,
                             dtype: torch.dtype = torch.float32) -> Tensor:
    """= :func:`kvc.gpu.kernels.reference_minmax_dequantize_packed`: x_hat [shape] in ``dtype``."""
    shape = tuple(shape)
    be = backend_for(packed)
    if (be is not None and dtype == torch.float32 and len(shape) >= 1 and 1 <= bits <= 8
            and packed.dtype == torch.uint8 and packed.dim() == 1 and packed.is_contiguous()
            and packed.numel() == packed_nbytes(math.prod(shape), bits) and math.prod(shape) > 0
            and scale.dtype == torch.float16 and zero.dtype == torch.float16
            and scale.shape == zero.shape and scale.shape[:-1] == shape[:-1] and scale.shape[-1] > 0
            and shape[-1] % scale.shape[-1] == 0 and scale.device == packed.device == zero.device
            and verified(be, packed.device, "minmax_dequantize", (bits,))):
        return minmax_dequantize_kernel(be, packed, bits, shape, scale, zero, poison_enabled())
    return reference_minmax_dequantize_packed(packed, bits, shape, scale, zero, dtype)


__all__ = ["tq_mse_encode_packed", "tq_mse_decode_packed", "tq_score_packed", "tq_value_packed",
           "minmax_quantize_packed", "minmax_dequantize_packed"]
