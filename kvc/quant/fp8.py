"""FP8 (e4m3 / e5m2) storage with a calibrated scale, through torch's float8 dtypes.

x is divided by a scale s = amax(|x|) / fp8_max over the calibration group (per head: the reduced
dims), cast to float8 (round to nearest even) and stored as its raw uint8 bytes; s is stored in
float16, rounded up so that |x / s| <= fp8_max (no saturation). Formats (Micikevicius et al.,
"FP8 Formats for Deep Learning", arXiv:2209.05433, table 1): e4m3 max 448 (``float8_e4m3fn``),
e5m2 max 57344 (``float8_e5m2``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvc.errors import KvcError

from .uniform import fp16_ceil

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_dtype(fmt: str) -> torch.dtype:
    if fmt not in FORMATS:
        raise KvcError(f"unknown fp8 format {fmt!r}; valid: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def fp8_encode(x: Tensor, fmt: str, reduce_dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(codes uint8 shaped like x, scale float16 with ``reduce_dims`` removed)."""
    dt = fp8_dtype(fmt)
    xf = x.float()
    amax = xf.abs().amax(dim=reduce_dims, keepdim=True)
    # arXiv:2209.05433 sec. 4 (per-tensor scaling): s = amax / max_representable
    scale = fp16_ceil(amax / torch.finfo(dt).max)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (xf / scale.float()).to(dt).view(torch.uint8)
    return codes, scale.squeeze(reduce_dims) if reduce_dims else scale


def fp8_decode(codes: Tensor, scale: Tensor, fmt: str, reduce_dims: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`fp8_encode`."""
    s = scale
    for dim in sorted(d % codes.dim() for d in reduce_dims):
        s = s.unsqueeze(dim)
    return codes.view(fp8_dtype(fmt)).to(dtype) * s.to(dtype)
