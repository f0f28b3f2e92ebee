"""Uniform integer quantization in groups along the last axis: asymmetric min/max (KIVI) and symmetric.

All functions group the last axis of x [..., L] into L / G groups of G consecutive entries
(``group=None``: one group = the whole axis). Callers put the grouping axis last: KIVI keys are
quantized per channel in groups of G tokens (pass x.transpose(-1, -2)), values per token in groups
of G channels (pass x as is).

Scales and zero points are stored in float16 (that is what the papers count: B + 2*16/G bits per
entry for asymmetric groups). To keep the error bound exact with the rounded parameters, the zero
point is rounded *down* to float16 and the scale *up*, so every entry of a group lies in
[z, z + (2^B - 1) s] and |x - x_hat| <= s/2 holds with the stored s. The group minimum gets code 0
and the maximum code 2^B - 1; they are reproduced up to the float16 rounding of z and s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvc.errors import KvcError, MethodFailure

from .fp16 import FP16_MAX


def _check_bits(bits: int, low: int = 1) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= 8:
        raise KvcError(f"bit width must be an integer in {low}..8, got {bits!r}")


def _fp16_step(v: Tensor, down: bool) -> Tensor:
    """The float16 nearest v, moved one unit in the last place towards -inf (``down``) or +inf
    where it lies on the wrong side of v; MethodFailure beyond the float16 range."""
    if v.numel() and not float(v.abs().max()) <= FP16_MAX:  # (a NaN maximum compares false)
        raise MethodFailure("value is NaN/Inf or outside the float16 range (65504)")
    h = v.to(torch.float16)
    hv = h.to(v.dtype)
    wrong = hv > v if down else hv < v
    # the neighbour by its bit pattern (sign-magnitude, read as int16; works on every device,
    # unlike nextafter for half): the magnitude grows by one unit for a step away from zero, so
    # bits + sgn steps up and bits - sgn down, with sgn = +1 for a clear sign bit and -1 for a set
    # one; a wrong-side h is never +0 (floor) nor -0 (ceil), and -0 - (-1) is -2^-24
    bits = h.view(torch.int16)
    sgn = (bits >> 15) | 1
    return torch.where(wrong, bits - sgn if down else bits + sgn, bits).view(torch.float16)


def fp16_floor(v: Tensor) -> Tensor:
    """The largest float16 <= v (float16); MethodFailure beyond the float16 range."""
    return _fp16_step(v, down=True)


def fp16_ceil(v: Tensor) -> Tensor:
    """The smallest float16 >= v (float16); MethodFailure beyond the float16 range."""
    return _fp16_step(v, down=False)


def _grouped(x: Tensor, group: int | None, axis: int = -1) -> tuple[Tensor, int]:
    """x with ``axis`` (-1 or -2) split into (L / G groups, G); returns it and the group axis (-1 or -2)."""
    if axis not in (-1, -2):
        raise KvcError(f"quantization axis must be -1 or -2, got {axis!r}")
    length = x.shape[axis]
    g = length if group is None else group
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise KvcError(f"group size must be a positive integer, got {group!r}")
    if g > length:
        raise KvcError(f"group size {g} is larger than the quantized axis ({length})")
    if length % g:
        raise KvcError(f"group size {g} does not divide the quantized axis ({length})")
    if axis == -1:
        return x.reshape(*x.shape[:-1], length // g, g), -1
    return x.reshape(*x.shape[:-2], length // g, g, x.shape[-1]), -2


def _uint8(codes: Tensor) -> Tensor:
    """Whole floats in 0..255 as uint8, through int16 (exact; float -> uint8 directly is ~4x slower on CPU)."""
    return codes.to(torch.int16).to(torch.uint8)


def _round_uint8(q: Tensor) -> Tensor:
    """round(q) (half to even, as torch.round) as uint8 for float32/float64 q in [0, 255], in place on q.

    Adding 2^m (m = mantissa bits) rounds q to an integer in the float's own round-to-nearest-even
    (the spacing in [2^m, 2^(m+1)) is 1), and that integer is the low byte of the sum's bit pattern:
    one float pass and one narrowing instead of round + two conversions."""
    wide = torch.int32 if q.dtype == torch.float32 else torch.int64
    return q.add_(1 / torch.finfo(q.dtype).eps).view(wide).to(torch.uint8)


def minmax_quantize(x: Tensor, bits: int, group: int | None = None, axis: int = -1
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric B-bit quantization of x [..., L] in groups of ``group``.

    Returns (codes uint8 [..., L], scale float16 [..., L/G], zero float16 [..., L/G]).
    ``axis=-2``: the groups run along the second-to-last axis of x [..., L, D] (e.g. the tokens of
    K) and the result is exactly that of ``minmax_quantize(x.transpose(-1, -2), ...)`` (codes a
    transposed view [..., D, L], scale and zero [..., D, L/G]), computed without transposing x.
    """
    _check_bits(bits)
    xg, dim = _grouped(x.float() if x.dtype != torch.float64 else x, group, axis)
    levels = (1 << bits) - 1
    # KIVI quant/new_pack.py: z = min, s = (max - min)/(2^B - 1), code = clamp(round((x - z)/s), 0, 2^B - 1)
    zero = fp16_floor(xg.amin(dim=dim))
    z = zero.to(xg.dtype)
    scale = fp16_ceil(xg.amax(dim=dim).sub_(z).div_(levels))
    # s = 0 only when every entry equals z (x - z = 0): any positive divisor gives code 0
    s = scale.to(xg.dtype).clamp_min_(torch.finfo(xg.dtype).tiny).unsqueeze(dim)
    codes = (xg - z.unsqueeze(dim)).div_(s)
    # no clamp: z <= x <= max and s >= (max - z)/(2^B - 1) (z rounded down, s up) give
    # 0 <= (x - z)/s <= 2^B - 1 up to a few float roundings, which rounding maps into 0..2^B - 1
    codes = _round_uint8(codes).reshape(x.shape)
    if axis == -2:
        return codes.transpose(-1, -2), scale.transpose(-1, -2).contiguous(), zero.transpose(-1, -2).contiguous()
    return codes, scale, zero


def minmax_dequantize(codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype = torch.float32,
                      axis: int = -1) -> Tensor:
    """x_hat = code * s + z (KIVI new_pack.py), for codes [..., L] and per-group scale, zero [..., L/G].

    ``axis=-2``: the inverse of ``minmax_quantize(..., axis=-2)``: codes [..., D, L] and scale, zero
    [..., D, L/G] as it returns them; x_hat [..., L, D] (contiguous, no float transpose).
    """
    if axis == -2:
        codes, scale, zero = codes.transpose(-1, -2), scale.transpose(-1, -2), zero.transpose(-1, -2)
    dim = axis if axis == -2 else -1
    groups = scale.shape[dim]
    c = codes.to(dtype, copy=True, memory_format=torch.contiguous_format)
    if axis == -2:
        c = c.reshape(*codes.shape[:-2], groups, codes.shape[-2] // groups, codes.shape[-1])
    else:
        c = c.reshape(*codes.shape[:-1], groups, codes.shape[-1] // groups)
    return c.mul_(scale.to(dtype).unsqueeze(dim)).add_(zero.to(dtype).unsqueeze(dim)).reshape(codes.shape)


def symmetric_quantize(x: Tensor, bits: int, group: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric B-bit quantization (B >= 2) of x [..., L] in groups: levels -(2^(B-1)-1)..2^(B-1)-1.

    Returns (codes uint8 [..., L] = level + 2^(B-1) - 1, scale float16 [..., L/G]); the all-ones
    code is unused (2^B - 1 levels, zero exactly representable).
    """
    _check_bits(bits, low=2)
    xg, _ = _grouped(x.float() if x.dtype != torch.float64 else x, group)
    qmax = (1 << (bits - 1)) - 1
    # symmetric absmax quantization (e.g. LLM.int8, Dettmers et al. 2022, sec. 2): s = max|x| / (2^(B-1) - 1)
    scale = fp16_ceil(xg.abs().amax(dim=-1) / qmax)
    s = scale.to(xg.dtype)[..., None]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    # s = 0 only when the whole group is 0: 0 / 1 gives level 0
    levels = (xg / safe).round_().clamp_(-qmax, qmax).add_(qmax)
    return _uint8(levels.reshape(x.shape)), scale


def symmetric_dequantize(codes: Tensor, scale: Tensor, bits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """x_hat = (code - (2^(B-1) - 1)) * s for codes [..., L] and per-group scale [..., L/G]."""
    groups = scale.shape[-1]
    qmax = (1 << (bits - 1)) - 1
    c = codes.to(dtype, copy=True).reshape(*codes.shape[:-1], groups, codes.shape[-1] // groups).sub_(qmax)
    return c.mul_(scale.to(dtype)[..., None]).reshape(codes.shape)
