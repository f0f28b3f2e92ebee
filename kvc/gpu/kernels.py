"""The kernel side of each :mod:`kvc.gpu.ops` function: launchers, plans and torch references.

For each operation: ``reference_*`` (the torch expression, built from kvc.quant, that the kernel
must equal), ``*_plan`` (whether the kernel handles a configuration) and ``*_kernel`` (the launch,
with no fallback and no self-check; :mod:`kvc.gpu.ops` adds those, :mod:`kvc.gpu.selfcheck` and the
tests call the launchers directly).

Bit-for-bit: codes, packed bytes, scales and zero points are the reference's bits wherever the
computation is deterministic. The one exception is the per-row norm of TurboQuant, a float32
reduction whose summation order differs from torch's (torch's own CPU and CUDA results differ
too): an entry whose rotated value lies within a few ulp of a decision boundary can get the
neighbouring code. Given the same norms (``norm_in``), the codes are bit-identical. Decoded values
follow the same float operations as torch and agree to float tolerance (in practice exactly).

Output poisoning: with ``KVC_GPU_POISON=1`` (tests, self-checks) outputs are filled with NaN / 0xA5
before each launch, so an entry a kernel forgets to write cannot pass as a right answer.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
from torch import Tensor

from ..errors import MethodFailure
from ..quant.fp16 import row_norms_fp16
from ..quant.packing import pack_codes, packed_nbytes, unpack_codes
from ..quant.rotation import Rotation
from ..quant.turboquant import tq_mse_decode, tq_mse_encode
from ..quant.uniform import minmax_dequantize, minmax_quantize
from .runtime import Backend, cdiv, f32, i32, i64, is_pow2, ptr

ENV_POISON = "KVC_GPU_POISON"
FUSED_MAX_D = 256  # in-kernel Hadamard: a row stays in one warp (D / 8 lanes)
ROTATED_MAX_D = 2048  # quantize/pack of pre-rotated rows: D / 8 <= 256 threads
SCORE_KT, SCORE_QC, VALUE_QV = 64, 16, 4  # must match tq_attention.cu
FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # input dtypes the kernels read (as float32)


# ----------------------------------------------------------------------------- helpers


def poison_enabled() -> bool:
    return os.environ.get(ENV_POISON, "0") not in ("", "0")


def _empty(shape, dtype: torch.dtype, device, poison: bool) -> Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if poison:
        if dtype.is_floating_point:
            t.fill_(float("nan"))
        else:
            t.fill_(0xA5 if dtype == torch.uint8 else -0x5A5A)
    return t


@functools.lru_cache(maxsize=None)
def _div_semantics_cached(device: str, scalar: float | int) -> tuple[float, int] | None:
    gen = torch.Generator().manual_seed(1234)
    x = torch.cat([torch.randn(8192, generator=gen), torch.rand(8192, generator=gen) * 3 - 1.5,
                   torch.arange(-64, 65, dtype=torch.float32) / 7])
    got = (x.to(device) / scalar).cpu().numpy()
    xn = x.numpy()
    s32 = np.float32(scalar)
    candidates = ((float(s32), 1, xn / s32),  # true division by the float32 scalar
                  (float(np.float32(1.0) / s32), 0, xn * (np.float32(1.0) / s32)),  # float reciprocal
                  (float(np.float32(1.0 / float(scalar))), 0, xn * np.float32(1.0 / float(scalar))))  # double
    for value, mode, want in candidates:
        if np.array_equal(want, got):
            return value, mode
    return None


def scalar_div(device: torch.device, scalar: float | int) -> tuple[float, int] | None:
    """How torch computes ``float32_tensor / scalar`` on ``device``: (s, 1) = true division by s,
    (r, 0) = multiplication by the reciprocal r (torch's CUDA kernels do this for CPU scalars; how
    r is rounded changed between torch versions). None when neither matches (kernel not used)."""
    return _div_semantics_cached(str(device), scalar)


def _rows(t: Tensor, d: int, vector_align: bool) -> Tensor:
    """t [..., d] as a 2-D [n, d] view with unit column stride (copy only when impossible);
    with ``vector_align`` the rows also allow float4 access (16-byte aligned)."""
    try:
        rows = t.view(-1, d)
    except RuntimeError:
        rows = t.contiguous().view(-1, d)
    if rows.stride(1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < d):
        rows = rows.contiguous()
    if vector_align and (rows.data_ptr() % 16 or (rows.shape[0] > 1 and rows.stride(0) % 4)):
        rows = rows.contiguous() if not rows.is_contiguous() else rows.clone()
    return rows


def _ld(rows: Tensor) -> int:
    return rows.stride(0) if rows.shape[0] > 1 else rows.shape[1]


def _aligned_bytes(packed: Tensor, bits: int) -> Tensor:
    """The packed buffer, copied if its start is not aligned for `bits`-byte loads."""
    return packed.clone() if packed.data_ptr() % 4 else packed


def midpoints(codebook: Tensor, device, dtype=torch.float32) -> Tensor:
    """Decision midpoints exactly as kvc.quant.lloyd_max.nearest_codes forms them."""
    cb = codebook.to(device=device, dtype=dtype)
    return ((cb[:-1] + cb[1:]) / 2).contiguous()


# ----------------------------------------------------------------------------- references


def reference_tq_mse_encode_packed(x: Tensor, bits: int, rotation: Rotation, codebook: Tensor | None = None
                                   ) -> tuple[Tensor, Tensor]:
    """pack_codes(codes, bits), norms for (codes, norms) = tq_mse_encode(x, bits, rotation, codebook)."""
    codes, norms = tq_mse_encode(x, bits, rotation, codebook)
    return pack_codes(codes, bits), norms


def reference_tq_mse_decode_packed(packed: Tensor, bits: int, shape, norms: Tensor, rotation: Rotation,
                                   codebook: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """tq_mse_decode(unpack_codes(packed, bits, shape), norms, rotation, codebook, dtype)."""
    return tq_mse_decode(unpack_codes(packed, bits, shape), norms, rotation, codebook, dtype)


def reference_tq_score_packed(q: Tensor, packed: Tensor, bits: int, shape, norms: Tensor,
                              rotation: Rotation, codebook: Tensor) -> Tensor:
    """q K_hat^T [S, H_q, Tq, T] (float32) with K_hat decoded from the packed keys [S, H_kv, T, D];
    query head h * G + g reads KV head h (kvc.metrics.fidelity.grouped)."""
    S, H, T, D = shape
    k_hat = reference_tq_mse_decode_packed(packed, bits, shape, norms, rotation, codebook)
    qg = q.to(torch.float32).reshape(S, H, -1, q.shape[-2], D)
    return (qg @ k_hat[:, :, None].mT).reshape(S, q.shape[1], q.shape[2], T)


def reference_tq_value_packed(w: Tensor, packed: Tensor, bits: int, shape, norms: Tensor,
                              rotation: Rotation, codebook: Tensor) -> Tensor:
    """w V_hat [S, H_q, Tq, D] for attention weights w [S, H_q, Tq, T] and packed values [S, H_kv, T, D]."""
    S, H, T, D = shape
    v_hat = reference_tq_mse_decode_packed(packed, bits, shape, norms, rotation, codebook)
    wg = w.to(torch.float32).reshape(S, H, -1, w.shape[-2], T)
    return (wg @ v_hat[:, :, None]).reshape(S, w.shape[1], w.shape[2], D)


def reference_minmax_quantize_packed(x: Tensor, bits: int, group: int | None = None
                                     ) -> tuple[Tensor, Tensor, Tensor]:
    """pack_codes(codes, bits), scale, zero for (codes, scale, zero) = minmax_quantize(x, bits, group)."""
    codes, scale, zero = minmax_quantize(x, bits, group)
    return pack_codes(codes, bits), scale, zero


def reference_minmax_dequantize_packed(packed: Tensor, bits: int, shape, scale: Tensor, zero: Tensor,
                                       dtype: torch.dtype = torch.float32) -> Tensor:
    """minmax_dequantize(unpack_codes(packed, bits, shape), scale, zero, dtype)."""
    return minmax_dequantize(unpack_codes(packed, bits, shape), scale, zero, dtype)


# ----------------------------------------------------------------------------- TurboQuant encode / decode


def tq_plan(d: int, bits: int, rotation: Rotation) -> str | None:
    """'fused' (randomized Hadamard in the kernel), 'rotated' (torch rotates, the kernel quantizes and
    packs) or None (torch only)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 4 or rotation.d != d:
        return None
    if rotation.kind == "hadamard" and rotation.mix is None and is_pow2(d) and 8 <= d <= FUSED_MAX_D:
        return "fused"
    if d % 8 == 0 and 8 <= d <= ROTATED_MAX_D:
        return "rotated"
    return None


def _hadamard_scale(device, d: int) -> tuple[float, int] | None:
    return scalar_div(device, math.sqrt(d))  # kvc.quant.rotation.fwht: x / math.sqrt(p)


def tq_encode_kernel(be: Backend, x: Tensor, bits: int, rotation: Rotation, codebook: Tensor, mode: str,
                     norm_in: Tensor | None = None, poison: bool = False) -> tuple[Tensor, Tensor]:
    """The kernel path of :func:`kvc.gpu.ops.tq_mse_encode_packed`."""
    device, d = x.device, x.shape[-1]
    lead = x.shape[:-1]
    n = math.prod(lead)
    mids = midpoints(codebook, device)
    if mode == "fused":
        scale = _hadamard_scale(device, d)
        if scale is None:
            raise MethodFailure(f"cannot reproduce torch's division by sqrt({d}) on {device}")
        rows = _rows(x.to(torch.float32), d, vector_align=True)
        signs = rotation.to(device, torch.float32).signs.contiguous()
        norms16 = _empty(n, torch.float16, device, poison)
    else:  # the reference's own steps up to the rotation (tq_mse_encode), then quantize + pack
        scale, signs = (1.0, 0), None
        xw = x.to(torch.float32)
        norms16 = row_norms_fp16(xw).reshape(-1)
        norms = torch.linalg.vector_norm(xw, dim=-1, keepdim=True)
        unit = xw / torch.where(norms > 0, norms, torch.ones_like(norms))
        rows = _rows(rotation.to(device, torch.float32).apply(unit), d, vector_align=True)
    if norm_in is not None:
        norm_in = norm_in.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    packed = _empty(packed_nbytes(n * d, bits), torch.uint8, device, poison)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    tpr = d // 8
    per_block = max(1, be.block_threads // tpr)
    be.launch("tq_encode", (cdiv(n, per_block),), per_block * tpr,
              [ptr(rows), i64(_ld(rows)), i64(n), i32(d), i32(bits), i32(mode == "fused"), ptr(signs),
               f32(scale[0]), i32(scale[1]), ptr(mids), ptr(norm_in), ptr(packed), ptr(norms16), ptr(flag)],
              device)
    if mode == "fused" and int(flag.item()):
        raise MethodFailure("row norm is NaN/Inf or exceeds the float16 range (65504)")
    return packed, norms16.reshape(lead)


def tq_decode_kernel(be: Backend, packed: Tensor, bits: int, shape, norms: Tensor, rotation: Rotation,
                     codebook: Tensor, mode: str, poison: bool = False) -> Tensor:
    """The kernel path of :func:`kvc.gpu.ops.tq_mse_decode_packed`."""
    device = packed.device
    d = shape[-1]
    n = math.prod(shape[:-1])
    cb = codebook.to(device=device, dtype=torch.float32).contiguous()
    norms16 = norms.reshape(-1).contiguous()
    out = _empty((n, d), torch.float32, device, poison)
    fused = mode == "fused"
    scale = _hadamard_scale(device, d) if fused else (1.0, 0)
    if scale is None:
        raise MethodFailure(f"cannot reproduce torch's division by sqrt({d}) on {device}")
    signs = rotation.to(device, torch.float32).signs.contiguous() if fused else None
    tpr = d // 8
    per_block = max(1, be.block_threads // tpr)
    be.launch("tq_decode", (cdiv(n, per_block),), per_block * tpr,
              [ptr(_aligned_bytes(packed, bits)), i64(n), i32(d), i32(bits), ptr(cb), i32(fused), ptr(signs),
               f32(scale[0]), i32(scale[1]), ptr(norms16 if fused else None), ptr(out), i64(d)], device)
    out = out.reshape(tuple(shape))
    if fused:
        return out
    # the reference's remaining steps (tq_mse_decode): Pi^T y, times the float16 norm
    return rotation.to(device, torch.float32).invert(out) * norms.to(torch.float32)[..., None]


def packed_ok(packed: Tensor, bits: int, shape, norms: Tensor) -> bool:
    """Packed codes (flat contiguous uint8) and float16 row norms of a non-empty ``shape``, on one device."""
    n = math.prod(shape)
    return (packed.dtype == torch.uint8 and packed.dim() == 1 and packed.is_contiguous()
            and packed.numel() == packed_nbytes(n, bits) and norms.dtype == torch.float16
            and norms.numel() == n // shape[-1] and norms.device == packed.device and n > 0)


# ----------------------------------------------------------------------------- scoring from packed codes


def attention_plan(kind: str, shape, bits: int, rotation: Rotation) -> bool:
    S, H, T, D = shape
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 4 or rotation.d != D:
        return False
    if D % 8 or D > 256 or S * H > 65535:
        return False
    return is_pow2(D) if kind == "score" else True  # score reduces with warp shuffles (D/8 lanes | 32)


def tq_score_kernel(be: Backend, q: Tensor, packed: Tensor, bits: int, shape, norms: Tensor,
                    rotation: Rotation, codebook: Tensor, poison: bool = False) -> Tensor:
    S, H, T, D = shape
    device = packed.device
    Hq, Tq = q.shape[1], q.shape[2]
    nq = (Hq // H) * Tq
    q_rot = rotation.to(device, torch.float32).apply(q.to(torch.float32).reshape(S, H, nq, D)).contiguous()
    cb = codebook.to(device=device, dtype=torch.float32).contiguous()
    out = _empty((S * H, nq, T), torch.float32, device, poison)
    tpr = D // 8
    be.launch("tq_score", (cdiv(T, SCORE_KT), S * H, cdiv(nq, SCORE_QC)), (be.block_threads // tpr) * tpr,
              [ptr(q_rot), i32(nq), ptr(_aligned_bytes(packed, bits)), ptr(norms.reshape(-1).contiguous()),
               ptr(cb), i32(D), i32(bits), i64(T), ptr(out)], device)
    return out.reshape(S, Hq, Tq, T)


def tq_value_kernel(be: Backend, w: Tensor, packed: Tensor, bits: int, shape, norms: Tensor,
                    rotation: Rotation, codebook: Tensor, poison: bool = False) -> Tensor:
    S, H, T, D = shape
    device = packed.device
    Hq, Tq = w.shape[1], w.shape[2]
    nq = (Hq // H) * Tq
    wg = w.to(torch.float32).reshape(S * H, nq, T).contiguous()
    cb = codebook.to(device=device, dtype=torch.float32).contiguous()
    zblocks = S * H * cdiv(nq, VALUE_QV)
    chunks = max(1, min(cdiv(T, 64), cdiv(1024, zblocks)))
    keys_per_chunk = cdiv(T, chunks)
    chunks = cdiv(T, keys_per_chunk)
    partial = _empty((S * H, chunks, nq, D), torch.float32, device, poison)
    tpr = D // 8
    be.launch("tq_value", (chunks, S * H, cdiv(nq, VALUE_QV)), (min(be.block_threads, 256) // tpr) * tpr,
              [ptr(wg), i32(nq), ptr(_aligned_bytes(packed, bits)), ptr(norms.reshape(-1).contiguous()),
               ptr(cb), i32(D), i32(bits), i64(T), i32(keys_per_chunk), ptr(partial)], device)
    acc = partial.sum(dim=1).reshape(S, H, nq, D)
    return rotation.to(device, torch.float32).invert(acc).reshape(S, Hq, Tq, D)


# ----------------------------------------------------------------------------- min/max groups (KIVI, int)


def minmax_plan(x: Tensor, bits: int, group: int | None) -> tuple[Tensor, int, int] | None:
    """(x as a float32 [B, R, L] view, G, word_mode) or None when the kernel does not take it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        return None
    if x.dtype not in FLOATS or x.dim() < 1 or x.numel() == 0:
        return None
    L = x.shape[-1]
    g = L if group is None else group
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or g > L or L % g or (g * bits) % 8:
        return None
    xf = x.to(torch.float32)
    xf = xf.reshape(1, 1, L) if xf.dim() == 1 else xf
    try:
        xv = xf.view(-1, xf.shape[-2], L)
    except RuntimeError:
        xv = xf.contiguous().view(-1, xf.shape[-2], L)
    return xv, g, int((g * bits) % 32 == 0)


def minmax_quantize_kernel(be: Backend, x: Tensor, bits: int, group: int | None, poison: bool = False
                           ) -> tuple[Tensor, Tensor, Tensor]:
    plan = minmax_plan(x, bits, group)
    if plan is None:
        raise ValueError("minmax_quantize_kernel: configuration not supported by the kernel")
    xv, g, word_mode = plan
    device = x.device
    levels = (1 << bits) - 1
    div = scalar_div(device, levels)  # kvc.quant.uniform.minmax_quantize: (max - zero) / levels
    if div is None:
        raise MethodFailure(f"cannot reproduce torch's division by {levels} on {device}")
    B, R, L = xv.shape
    sb, sr, sl = xv.stride()
    ng = L // g
    out_shape = (*x.shape[:-1], ng)
    packed = _empty(packed_nbytes(B * R * L, bits), torch.uint8, device, poison)
    scale = _empty(out_shape, torch.float16, device, poison)
    zero = _empty(out_shape, torch.float16, device, poison)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    total = B * R * ng
    be.launch("minmax_quantize", (cdiv(total, be.block_threads),), be.block_threads,
              [ptr(xv), i64(B), i64(R), i64(L), i64(sb), i64(sr), i64(sl), i32(g), i32(bits),
               i32(sr == 1 and sl != 1), f32(div[0]), i32(div[1]), i32(word_mode), ptr(packed), ptr(scale),
               ptr(zero), ptr(flag)], device)
    if int(flag.item()):
        raise MethodFailure("value is NaN/Inf or outside the float16 range (65504)")
    return packed, scale, zero


def minmax_dequantize_kernel(be: Backend, packed: Tensor, bits: int, shape, scale: Tensor, zero: Tensor,
                             poison: bool = False) -> Tensor:
    device = packed.device
    n = math.prod(shape)
    g = shape[-1] // scale.shape[-1]
    out = _empty(tuple(shape), torch.float32, device, poison)
    blocks = min(cdiv(n, be.block_threads), 65535 * 4)
    be.launch("minmax_dequantize", (blocks,), be.block_threads,
              [ptr(packed), i64(n), i32(g), i32(bits), ptr(scale.contiguous()), ptr(zero.contiguous()), ptr(out)],
              device)
    return out
