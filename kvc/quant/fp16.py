"""Float16 side data (row norms, scales): the range check every quantizer shares."""

from __future__ import annotations

import torch
from torch import Tensor

from kvc.errors import MethodFailure

FP16_MAX = 65504.0


def work_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def row_norms_fp16(x: Tensor) -> Tensor:
    """||x|| over the last axis as float16; MethodFailure if a norm is not finite in float16."""
    return norms_fp16(torch.linalg.vector_norm(x.to(work_dtype(x)), dim=-1))


def norms_fp16(norms: Tensor) -> Tensor:
    """Norms as float16; MethodFailure if one is not finite in float16."""
    if not bool(torch.isfinite(norms).all()) or bool((norms > FP16_MAX).any()):
        raise MethodFailure("row norm is NaN/Inf or exceeds the float16 range (65504)")
    return norms.to(torch.float16)
