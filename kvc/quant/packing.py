"""Dense bit packing of b-bit unsigned codes and of sign bits into uint8 tensors.

Codes are flattened in C order and written as one little-endian bit stream (bit j of code i is
stream bit i*b + j; stream bit k is bit k % 8 of byte k // 8), so ``n`` codes of ``b`` bits take
exactly ``ceil(n*b/8)`` bytes: only the final byte can hold padding (zero bits).

Implementation: codes are moved as uint8 lanes of wider integer words, shifted by Python scalars
(one vectorised pass per code position; little-endian byte order, as on every platform torch
supports); no per-bit tensors. For b in {1, 2, 4} the 8/b codes of one packed byte are the bytes of
one word; otherwise four codes (an int32) become 4b bits and two of those the 8b bits of eight
codes, whose b low bytes are the output.
"""

from __future__ import annotations

import math

import torch

from ..errors import KvcError, MethodFailure


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes used by ``n`` codes of ``bits`` bits each."""
    return math.ceil(n * bits / 8)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise KvcError(f"bit width must be an integer in 1..8, got {bits!r}")


_LANES = {1: torch.int64, 2: torch.int32, 4: torch.int16}  # b dividing 8: a word of 8/b bytes per packed byte


def _words(bits: int) -> torch.dtype:
    """Integer type holding the 8 * bits bits of eight codes."""
    return torch.int32 if bits <= 4 else torch.int64


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (any shape) into a 1-D uint8 tensor of ceil(n*bits/8) bytes."""
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex():
        raise KvcError("pack_codes needs an integer tensor")
    n = codes.numel()
    if n and codes.dtype != torch.bool:  # (min and max apart: aminmax is slower on CPU)
        if (codes.dtype != torch.uint8 and int(codes.min()) < 0) or int(codes.max()) >= 1 << bits:
            raise KvcError(f"codes out of range for {bits}-bit packing")
    if (8 % bits == 0 and bits < 8 and codes.dim() >= 2 and not codes.is_contiguous()
            and codes.transpose(-1, -2).is_contiguous() and codes.shape[-1] % (8 // bits) == 0):
        return _pack_transposed(codes.transpose(-1, -2), bits)
    flat = codes.reshape(-1).to(torch.uint8, copy=bits == 8)  # 8 bits: the codes themselves, never a view of them
    if bits == 8:
        return flat
    flat = torch.nn.functional.pad(flat, (0, (-n) % 8))
    if 8 % bits == 0:  # 8/b codes, one per byte of a word, into its low byte (the rest is shifted out or cut)
        lanes = flat.view(_LANES[bits])
        acc = lanes.clone()
        for j in range(1, 8 // bits):
            acc |= lanes >> (j * (8 - bits))
        return acc.to(torch.uint8)[: packed_nbytes(n, bits)]
    # four codes (one per byte of an int32) -> 4b bits: code j moves from bit 8j down to bit jb
    quads = flat.view(torch.int32)
    mask = (1 << bits) - 1
    acc = quads & mask
    for j in range(1, 4):
        acc |= (quads >> (j * (8 - bits))) & (mask << (j * bits))
    # two such halves -> the 8b bits of eight codes, whose b low bytes are the stream
    pairs = acc.view(-1, 2).to(_words(bits))
    words = pairs[:, 0] | (pairs[:, 1] << (4 * bits))
    out = words.view(torch.uint8).reshape(words.numel(), words.element_size())[:, :bits]
    return out.reshape(-1)[: packed_nbytes(n, bits)].contiguous()  # (b = 1: [:, :1] reshapes to a strided view)


def _pack_transposed(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_codes of rows.transpose(-1, -2) for contiguous rows [..., L, D] (L a multiple of 8/b, b | 8).

    The 8/b codes of one byte are 8/b consecutive rows: they are OR-ed row-wise (contiguous D-wide
    passes) and only the 8/b times smaller bytes are transposed, never the codes."""
    per = 8 // bits
    r = rows.to(torch.uint8).reshape(*rows.shape[:-2], rows.shape[-2] // per, per, rows.shape[-1])
    acc = r[..., 0, :].clone()
    for j in range(1, per):
        acc |= r[..., j, :] << (j * bits)
    return acc.transpose(-1, -2).reshape(-1)


def _unpack_transposed(packed: torch.Tensor, bits: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`_pack_transposed`: codes [..., D, L] as the transposed view of contiguous [..., L, D]."""
    per, mask = 8 // bits, (1 << bits) - 1
    *lead, d, length = shape
    b = packed.view(*lead, d, length // per).transpose(-1, -2).contiguous()
    out = torch.empty(*lead, length // per, per, d, dtype=torch.uint8, device=packed.device)
    out[..., 0, :] = b & mask
    for j in range(1, per):
        torch.bitwise_and(b >> (j * bits), mask, out=out[..., j, :])
    return out.reshape(*lead, length, d).to(dtype).transpose(-1, -2)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size,
                 dtype: torch.dtype = torch.int64, transposed: bool = False) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: codes of the given shape, int64 (index-ready) or ``dtype``.

    ``transposed=True``: the same values, laid out where possible as the transposed view of a
    contiguous [..., L, D] tensor (for codes [..., D, L] of per-channel quantizers; cheaper to
    dequantize into [..., L, D])."""
    _check_bits(bits)
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_nbytes(n, bits):
        raise KvcError(f"packed buffer must be 1-D uint8 of {packed_nbytes(n, bits)} bytes, got "
                       f"{tuple(packed.shape)} {packed.dtype}")
    if transposed and 8 % bits == 0 and bits < 8 and len(shape) >= 2 and shape[-1] % (8 // bits) == 0:
        return _unpack_transposed(packed, bits, tuple(shape), dtype)
    if bits == 8:
        return packed.to(dtype).reshape(tuple(shape))
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # each byte spread over the bytes of a word: code j back to bit 8j
        lanes = packed.to(_LANES[bits])
        acc = lanes.clone()
        for j in range(1, 8 // bits):
            acc |= lanes << (j * (8 - bits))
        acc &= sum(mask << (8 * j) for j in range(8 // bits))
        return acc.view(torch.uint8)[:n].to(dtype).reshape(tuple(shape))
    groups = math.ceil(n / 8)
    wide = _words(bits)
    buf = torch.zeros(groups, wide.itemsize, dtype=torch.uint8, device=packed.device)
    buf[:, :bits] = torch.nn.functional.pad(packed, (0, groups * bits - packed.numel())).view(groups, bits)
    words = buf.view(wide).reshape(-1)
    half = (1 << (4 * bits)) - 1
    quads = torch.stack((words & half, words >> (4 * bits)), dim=1).reshape(-1).to(torch.int32)
    out = quads & mask
    for j in range(1, 4):
        out |= (quads << (j * (8 - bits))) & (mask << (8 * j))
    return out.view(torch.uint8)[:n].to(dtype).reshape(tuple(shape))


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack sign(x) as one bit per entry (1 for x >= 0, i.e. sign(0) := +1) into ceil(n/8) bytes.

    A bool tensor is taken as the bits themselves (True -> +1)."""
    bits = x if x.dtype == torch.bool else x >= 0
    return pack_codes(bits.to(torch.int64), 1)


def unpack_signs(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: a float32 tensor of +-1."""
    return unpack_codes(packed, 1, shape).to(torch.float32) * 2 - 1


def index_dtype(n: int) -> torch.dtype:
    """Smallest stored integer dtype for indices in [0, n): uint8, int16, int32 or int64."""
    if n <= 1 << 8:
        return torch.uint8
    if n <= 1 << 15:
        return torch.int16
    if n <= 1 << 31:
        return torch.int32
    return torch.int64


def seed_array(*seeds: int) -> torch.Tensor:
    """Seeds as a stored int64 array (a 0-d scalar for one seed), so they count in the bit total."""
    t = torch.tensor([int(s) for s in seeds], dtype=torch.int64)
    return t[0] if len(seeds) == 1 else t


def check_code_bits(name: str, packed: list[torch.Tensor], entries: int, bits: float) -> None:
    """MethodFailure unless the packed code arrays hold ``bits`` per entry (up to byte padding)."""
    have = sum(p.numel() * p.element_size() * 8 for p in packed)
    want = bits * entries
    if not want - 1e-6 <= have < want + 8 * max(len(packed), 1):
        raise MethodFailure(f"{name}: codes take {have / max(entries, 1):.4f} bits per entry, "
                            f"asked for {bits:g}")
