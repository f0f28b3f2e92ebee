"""Bit packing: exact byte counts, the documented bit layout, round trips, loud failures."""

from __future__ import annotations

import math
import re

import pytest
import torch

from kvc.errors import KvcError, MethodFailure
from kvc.quant.packing import (check_code_bits, index_dtype, pack_codes, pack_signs, packed_nbytes,
                               seed_array, unpack_codes, unpack_signs)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 1000])
def test_round_trip_and_exact_size(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    assert torch.equal(unpack_codes(packed, bits, (n,)), codes)


def test_shape_preserved_and_padding_is_zero():
    codes = torch.full((3, 5, 7), 7)
    packed = pack_codes(codes, 3)  # 105 codes * 3 bits = 315 bits -> 40 bytes, 5 padding bits
    assert packed.numel() == 40
    assert int(packed[-1]) >> 3 == 0  # padding bits after stream bit 315 are zero
    assert torch.equal(unpack_codes(packed, 3, codes.shape), codes)


def test_little_endian_bit_stream_layout():
    # bit j of code i is stream bit i*b + j; stream bit k is bit k % 8 of byte k // 8
    assert pack_codes(torch.tensor([1, 2, 3]), 2).tolist() == [0b111001]
    assert pack_codes(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 0b1]
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [1, 1]
    assert pack_codes(torch.tensor([0xAB, 0x01]), 8).tolist() == [0xAB, 0x01]


def test_signs():
    x = torch.tensor([[-1.0, 0.0, 2.0], [3.0, -0.5, -2.0]])
    packed = pack_signs(x)
    assert packed.numel() == 1
    assert torch.equal(unpack_signs(packed, x.shape), torch.tensor([[-1.0, 1, 1], [1, -1, -1]]))
    assert torch.equal(pack_signs(x >= 0), packed)


def test_bad_input_fails_loudly():
    with pytest.raises(KvcError, match="^codes out of range for 2-bit packing$"):
        pack_codes(torch.tensor([4]), 2)
    with pytest.raises(KvcError, match="^codes out of range for 2-bit packing$"):
        pack_codes(torch.tensor([-1]), 2)
    for bits in (0, 9, 2.0, True):
        with pytest.raises(KvcError, match=rf"^bit width must be an integer in 1\.\.8, got {re.escape(str(bits))}$"):
            pack_codes(torch.tensor([0]), bits)
    with pytest.raises(KvcError, match="^pack_codes needs an integer tensor$"):
        pack_codes(torch.tensor([0.5]), 2)
    with pytest.raises(KvcError, match=re.escape("packed buffer must be 1-D uint8 of 4 bytes, got (3,) torch.uint8")):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 2, (16,))  # 16 codes * 2 bits = 4 bytes


def test_index_dtype_and_seed_array():
    assert index_dtype(256) == torch.uint8 and index_dtype(257) == torch.int16
    assert index_dtype(32768) == torch.int16 and index_dtype(32769) == torch.int32
    s = seed_array(2**62 - 1)
    assert s.dtype == torch.int64 and s.dim() == 0 and int(s) == 2**62 - 1
    assert seed_array(1, 2).tolist() == [1, 2]


def test_check_code_bits():
    codes = pack_codes(torch.zeros(100, dtype=torch.long), 3)
    check_code_bits("x", [codes], 100, 3)
    with pytest.raises(MethodFailure, match=r"^x: codes take 3\.0400 bits per entry, asked for 2$"):
        check_code_bits("x", [codes], 100, 2)
    with pytest.raises(MethodFailure, match=r"^x: codes take 3\.0400 bits per entry, asked for 4$"):
        check_code_bits("x", [codes], 100, 4)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_bytes_are_contiguous_and_match_the_bit_stream(bits):
    """The fast packer (uint8 lanes of int32 words) against the documented stream, bit by bit; the
    buffer is contiguous (kernels read it by pointer) and unpacks to any asked dtype."""
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (2, 3, 37), generator=g)
    packed = pack_codes(codes.to(torch.uint8), bits)
    stream = [(int(c) >> j) & 1 for c in codes.reshape(-1) for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    want = [sum(stream[8 * k + i] << i for i in range(8)) for k in range(len(stream) // 8)]
    assert packed.is_contiguous() and packed.tolist() == want
    assert torch.equal(pack_codes(codes, bits), packed)
    out = unpack_codes(packed, bits, codes.shape, torch.uint8)
    assert out.dtype == torch.uint8 and torch.equal(out.long(), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("length", [16, 24, 13])
def test_transposed_codes_pack_as_their_copy(bits, length):
    """Codes given as the transpose of contiguous [..., L, D] rows (per-channel quantizers) pack to
    the bytes of their contiguous copy, checked against the documented bit stream; unpacking with
    ``transposed=True`` gives the same values (as a transposed view where the fast path applies)."""
    g = torch.Generator().manual_seed(bits * 7 + length)
    rows = torch.randint(0, 1 << bits, (2, 3, length, 5), generator=g, dtype=torch.uint8)
    codes = rows.transpose(-1, -2)  # [2, 3, 5, L], not contiguous
    packed = pack_codes(codes, bits)
    stream = [(int(c) >> j) & 1 for c in codes.reshape(-1) for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    want = [sum(stream[8 * k + i] << i for i in range(8)) for k in range(len(stream) // 8)]
    assert packed.is_contiguous() and packed.tolist() == want
    out = unpack_codes(packed, bits, codes.shape, torch.uint8, transposed=True)
    assert out.shape == codes.shape and torch.equal(out, codes)
    if 8 % bits == 0 and bits < 8 and length % (8 // bits) == 0:
        assert out.transpose(-1, -2).is_contiguous()
    assert torch.equal(unpack_codes(packed, bits, codes.shape, transposed=True), codes.long())
