"""Uniform group quantization (KIVI min/max, symmetric int) against docs/methods.md#oracle-kivi, and FP8 storage."""

from __future__ import annotations

import re

import pytest
import torch

from kvc.errors import KvcError, MethodFailure
from kvc.quant.fp8 import fp8_decode, fp8_encode
from kvc.quant.uniform import (_round_uint8, fp16_ceil, fp16_floor, minmax_dequantize, minmax_quantize,
                               symmetric_dequantize, symmetric_quantize)


def _x(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale + torch.randn(*shape[:-1], 1, generator=g) * 3


@pytest.mark.parametrize("bits,group", [(2, 32), (4, 32), (3, 16), (1, 8), (8, 64)])
def test_kivi_error_bound_and_extremes_oracle_8_10(bits, group):
    x = _x(4, 6, 64, seed=bits, scale=5.0)
    codes, scale, zero = minmax_quantize(x, bits, group)
    assert codes.dtype == torch.uint8 and scale.dtype == zero.dtype == torch.float16
    assert scale.shape == zero.shape == (4, 6, 64 // group)
    xh = minmax_dequantize(codes, scale, zero)
    xg, xhg, cg = (t.reshape(4, 6, 64 // group, group) for t in (x, xh, codes))
    s = scale.float()[..., None]
    # per group |X - X_hat| <= s/2 with the stored fp16 s, which is the real s rounded up by < 2^-10
    assert bool(((xg - xhg).abs() <= s / 2 * (1 + 1e-6) + 1e-6).all())
    s_true = (xg.amax(-1) - xg.amin(-1)) / (2**bits - 1)
    assert bool((scale.float() >= s_true * (1 - 1e-6)).all()) and bool((scale.float() <= s_true * 1.002 + 1e-6).all())
    # group min -> code 0 and max -> code 2^B - 1, reproduced up to the fp16 rounding of z and s
    imin, imax = xg.argmin(-1, keepdim=True), xg.argmax(-1, keepdim=True)
    assert bool((cg.gather(-1, imin) == 0).all()) and bool((cg.gather(-1, imax) == 2**bits - 1).all())
    tol = 2e-3 * xg.abs().amax(-1, keepdim=True)
    assert bool(((xg.gather(-1, imin) - xhg.gather(-1, imin)).abs() <= tol).all())
    assert bool(((xg.gather(-1, imax) - xhg.gather(-1, imax)).abs() <= tol).all())


def test_extremes_exact_when_representable():
    """Groups whose min and range are fp16-exact multiples reproduce min and max exactly."""
    x = torch.tensor([[-1.5, 0.0, 3.0, 1.5, 0.75, -0.75, 2.25, -1.5]])
    codes, scale, zero = minmax_quantize(x, 2, 8)
    xh = minmax_dequantize(codes, scale, zero)
    assert xh[0, 0] == -1.5 and xh[0, 2] == 3.0 and torch.equal(xh[0, :4], x[0, :4])


def test_constant_groups_and_degenerate_input():
    x = torch.full((2, 32), 0.5)  # fp16-exact constant: zero range, zero scale, exact
    codes, scale, zero = minmax_quantize(x, 2, 16)
    assert bool((scale == 0).all()) and bool((codes == 0).all())
    assert torch.equal(minmax_dequantize(codes, scale, zero), x)
    x = torch.full((2, 32), 0.3)  # not fp16-exact: z rounds down, s covers the gap
    codes, scale, zero = minmax_quantize(x, 2, 16)
    assert bool((scale.float() < 1e-4).all())
    assert torch.allclose(minmax_dequantize(codes, scale, zero), x, atol=1e-4)
    out_of_range = re.escape("value is NaN/Inf or outside the float16 range (65504)")
    with pytest.raises(MethodFailure, match=out_of_range):
        minmax_quantize(torch.tensor([[1e6, 0.0]]), 2)
    with pytest.raises(MethodFailure, match=out_of_range):
        minmax_quantize(torch.tensor([[float("nan"), 0.0]]), 2)


def test_group_errors():
    x = torch.randn(3, 64)
    with pytest.raises(KvcError, match="larger"):
        minmax_quantize(x, 2, 128)
    with pytest.raises(KvcError, match="divide"):
        minmax_quantize(x, 2, 48)
    for bits in (0, 9, 2.5):
        with pytest.raises(KvcError, match=rf"^bit width must be an integer in 1\.\.8, got {re.escape(str(bits))}$"):
            minmax_quantize(x, bits, 32)
    with pytest.raises(KvcError, match=r"^bit width must be an integer in 2\.\.8, got 1$"):
        symmetric_quantize(x, 1, 32)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric(bits):
    x = _x(5, 64, seed=bits)
    codes, scale = symmetric_quantize(x, bits, 32)
    xh = symmetric_dequantize(codes, scale, bits)
    s = scale.float().repeat_interleave(32, -1)
    assert bool(((x - xh).abs() <= s / 2 * (1 + 1e-6) + 1e-7).all())
    assert int(codes.max()) <= 2**bits - 2  # 2^B - 1 levels, symmetric around zero
    z = torch.zeros(1, 32)
    assert torch.equal(symmetric_dequantize(*symmetric_quantize(z, bits), bits), z)
    xg = x.reshape(5, 2, 32)
    amax_at = xg.abs().argmax(-1, keepdim=True)
    assert bool(((xg.gather(-1, amax_at) - xh.reshape(5, 2, 32).gather(-1, amax_at)).abs()
                 <= 2e-3 * xg.abs().amax(-1, keepdim=True)).all())


def test_fp16_directed_rounding():
    v = torch.randn(10000, dtype=torch.float64) * 10
    lo, hi = fp16_floor(v), fp16_ceil(v)
    assert lo.dtype == hi.dtype == torch.float16
    assert bool((lo.double() <= v).all()) and bool((hi.double() >= v).all())
    assert bool(((hi.double() - lo.double()) <= v.abs() * 2**-9 + 1e-7).all())
    exact = torch.tensor([0.5, -2.0, 0.0])
    assert torch.equal(fp16_floor(exact).float(), exact) and torch.equal(fp16_ceil(exact).float(), exact)


def test_fp16_directed_rounding_on_every_float16_against_numpy():
    """Every finite float16, its float32 neighbours, zeros of both signs and tiny values against
    numpy's float16 nextafter (an independent implementation), bit for bit (signed zeros included)."""
    import numpy as np

    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    every = every[torch.isfinite(every)].float()
    v = torch.cat([every, every.nextafter(torch.tensor(np.inf)), every.nextafter(torch.tensor(-np.inf)),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30])]).clamp(-65504, 65504)
    a, h = v.numpy(), v.numpy().astype(np.float16)
    with np.errstate(over="ignore"):  # (the unused neighbours of +-65504)
        want_lo = np.where(h.astype(np.float32) > a, np.nextafter(h, np.float16(-np.inf)), h)
        want_hi = np.where(h.astype(np.float32) < a, np.nextafter(h, np.float16(np.inf)), h)
    assert np.array_equal(fp16_floor(v).view(torch.int16).numpy(), want_lo.view(np.int16))
    assert np.array_equal(fp16_ceil(v).view(torch.int16).numpy(), want_hi.view(np.int16))


@pytest.mark.parametrize("fmt,mant", [("e4m3", 3), ("e5m2", 2)])
def test_fp8_round_trip(fmt, mant):
    x = _x(2, 3, 20, 16, seed=1) * torch.tensor([1.0, 100.0, 0.01])[None, :, None, None]
    codes, scale = fp8_encode(x, fmt, (-2, -1))
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and scale.shape == (2, 3)
    xh = fp8_decode(codes, scale, fmt, (-2, -1))
    # relative error <= 2^-(mant+1) for entries in the normal range (per-head scale keeps all heads alike)
    big = x.abs() > x.abs().amax(dim=(-2, -1), keepdim=True) * 2**-5
    assert bool(((x - xh).abs() <= x.abs() * 2 ** -(mant + 1) * 1.001)[big].all())
    amax = x.abs().amax(dim=(-2, -1))
    assert bool((xh.abs().amax(dim=(-2, -1)) <= amax * (1 + 2 ** -(mant + 1))).all())
    with pytest.raises(KvcError, match=r"^unknown fp8 format 'e3m4'; valid: e4m3, e5m2$"):
        fp8_encode(x, "e3m4", (-1,))


@pytest.mark.parametrize("group", [None, 4, 16])
def test_minmax_along_the_second_to_last_axis_is_the_transposed_quantization(group):
    """axis=-2 (KIVI keys, int per channel) = quantizing x^T along its last axis, bit for bit,
    without the float transpose; dequantizing gives x_hat in x's layout."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 8, generator=g) * torch.rand(8, generator=g) * 5
    codes, scale, zero = minmax_quantize(x, 3, group, axis=-2)
    want = minmax_quantize(x.transpose(-1, -2), 3, group)
    assert codes.shape == (2, 3, 8, 16) and all(torch.equal(a, b) for a, b in zip((codes, scale, zero), want))
    x_hat = minmax_dequantize(codes.contiguous(), scale, zero, axis=-2)
    assert x_hat.shape == x.shape and x_hat.is_contiguous()
    assert torch.equal(x_hat, minmax_dequantize(*want).transpose(-1, -2))
    with pytest.raises(KvcError, match=r"^quantization axis must be -1 or -2, got 0$"):
        minmax_quantize(x, 3, axis=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_uint8_is_torch_round_half_to_even(dtype):
    """The add-2^m rounding to uint8 against torch.round on ties, near-ties and the ends of 0..255."""
    ties = torch.arange(0, 255, dtype=dtype) + 0.5
    q = torch.cat([torch.tensor([0.0, 255.0, 254.5, 0.49999997, 1e-30], dtype=dtype), ties,
                   ties.nextafter(torch.zeros_like(ties)), torch.rand(1000, dtype=dtype) * 255])
    want = torch.round(q).to(torch.int16).to(torch.uint8)
    assert want[:3].tolist() == [0, 255, 254] and want[5:8].tolist() == [0, 2, 2]
    assert torch.equal(_round_uint8(q.clone()), want)
