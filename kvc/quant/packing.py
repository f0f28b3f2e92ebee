"""Dense bit packing of b-bit unsigned codes and of sign bits into uint8 tensors.

Codes are flattened in C order and written as one little-endian bit stream (bit j of code i is
stream bit i*b + j; stream bit k is bit k % 8 of byte k // 8), so ``n`` codes of ``b`` bits take
exactly ``ceil(n*b/8)`` bytes: only the final byte can hold padding (zero bits).

Implementation: eight codes of b bits fill exactly b bytes, so codes are packed eight at a time
into one int64 word (8*b <= 64 bits) whose b low bytes are the output; no per-bit tensors.
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


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (any shape) into a 1-D uint8 tensor of ceil(n*bits/8) bytes."""
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex():
        raise KvcError("pack_codes needs an integer tensor")
    flat = codes.reshape(-1).to(torch.int64)
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise KvcError(f"codes out of range for {bits}-bit packing")
    if bits == 8:  # one code per byte (also keeps the int64 words below clear of the sign bit)
        return flat.to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-n) % 8)).reshape(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=flat.device) * bits
    words = (flat << shifts).sum(dim=1)  # disjoint bit fields: sum == bitwise or
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=flat.device) * 8
    out = ((words[:, None] >> byte_shifts) & 0xFF).reshape(-1)
    return out[: packed_nbytes(n, bits)].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int64 codes of the given shape."""
    _check_bits(bits)
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_nbytes(n, bits):
        raise KvcError(f"packed buffer must be 1-D uint8 of {packed_nbytes(n, bits)} bytes, got "
                       f"{tuple(packed.shape)} {packed.dtype}")
    if bits == 8:
        return packed.to(torch.int64).reshape(tuple(shape))
    groups = math.ceil(n / 8)
    buf = torch.nn.functional.pad(packed.to(torch.int64), (0, groups * bits - packed.numel()))
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    words = (buf.reshape(groups, bits) << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = ((words[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)
    return codes[:n].reshape(tuple(shape))


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
