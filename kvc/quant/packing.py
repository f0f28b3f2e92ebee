"""Dense bit packing of b-bit unsigned codes and of sign bits into uint8 tensors.

Codes are flattened in C order and written as one little-endian bit stream (bit j of code i is
stream bit i*b + j; stream bit k is bit k % 8 of byte k // 8), so ``n`` codes of ``b`` bits take
exactly ``ceil(n*b/8)`` bytes: only the final byte can hold padding.
"""

from __future__ import annotations

import math

import torch

from kvc.errors import KvcError

_BYTE_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.int32)


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes used by ``n`` codes of ``bits`` bits each."""
    return math.ceil(n * bits / 8)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise KvcError(f"bit width must be an integer in 1..8, got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (any shape) into a 1-D uint8 tensor of ceil(n*bits/8) bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise KvcError(f"codes out of range for {bits}-bit packing")
    shifts = torch.arange(bits, dtype=torch.int32, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    stream = torch.nn.functional.pad(stream, (0, pad)).reshape(-1, 8)
    return (stream * _BYTE_WEIGHTS.to(flat.device)).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int64 codes of the given shape."""
    _check_bits(bits)
    n = math.prod(shape)
    if packed.numel() != packed_nbytes(n, bits):
        raise KvcError(f"packed buffer has {packed.numel()} bytes, expected {packed_nbytes(n, bits)}")
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device)
    stream = ((packed.to(torch.int64)[:, None] >> shifts) & 1).reshape(-1)[: n * bits].reshape(n, bits)
    weights = (1 << torch.arange(bits, dtype=torch.int64, device=packed.device))
    return (stream * weights).sum(dim=1).reshape(tuple(shape))


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack sign(x) as one bit per entry (1 for x >= 0, i.e. sign(0) := +1) into ceil(n/8) bytes."""
    return pack_codes((x >= 0).to(torch.int32), 1)


def unpack_signs(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: a float32 tensor of +-1."""
    return unpack_codes(packed, 1, shape).to(torch.float32) * 2 - 1
