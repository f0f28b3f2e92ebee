"""TurboQuant numerics (kvc.quant.turboquant, kvc.quant.rotation) against the oracles
docs/methods.md#oracle-turboquant-mse, docs/methods.md#oracle-turboquant-bias, docs/methods.md#oracle-turboquant-prod
and the channel split of docs/methods.md#turboquant-fractional-bits."""

from __future__ import annotations

import math
import re

import pytest
import scipy.linalg
import torch

from kvc.errors import KvcError, MethodFailure
from kvc.quant.lloyd_max import beta_codebook, distortion
from kvc.quant.rotation import draw_seed, fwht, make_rotation
from kvc.quant.qjl import qjl_sketch
from kvc.quant.turboquant import (channel_permutation, outlier_channels, split_bits,
                                  tq_codebook, tq_mse_decode, tq_mse_encode, tq_prod_decode,
                                  tq_prod_encode)

D = 128
THEORY = {1: 0.3609, 2: 0.1160, 3: 0.03397, 4: 0.00931}  # docs/methods.md#oracle-turboquant-mse


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def mse_runs():
    """b -> (x, x_hat) for 20 000 random unit vectors at d = 128 (Haar rotation, exact Beta codebook)."""
    x = _unit(20000, D, 1)
    out = {}
    for b in range(1, 5):
        rot = make_rotation("haar", D, 100 + b)
        codes, norms = tq_mse_encode(x, b, rot, tq_codebook(D, b))
        assert codes.dtype == torch.uint8 and norms.dtype == torch.float16 and int(codes.max()) < 2**b
        out[b] = (x, tq_mse_decode(codes, norms, rot, tq_codebook(D, b), torch.float64))
    return out


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_dmse_oracle_8_6(mse_runs, b):
    x, xh = mse_runs[b]
    dmse = float(((x - xh) ** 2).sum(-1).mean())
    assert dmse == pytest.approx(THEORY[b], rel=0.01)
    assert 4.0 ** -b <= dmse <= math.sqrt(3) * math.pi / 2 * 4.0 ** -b


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_mse_slope_oracle_8_7(mse_runs, b):
    """Slope of <y, x_hat> on <y, x> is 1 - D_mse (E[x_hat x^T] = (1 - D_mse) I / d)."""
    x, xh = mse_runs[b]
    y = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    a, c = (y * x).sum(-1), (y * xh).sum(-1)
    slope = float((a * c).sum() / (a * a).sum())
    dm = distortion(beta_codebook(D, b), D)
    se = math.sqrt(dm * (1 - dm) / len(a))
    assert abs(slope - (1 - dm)) < 5 * se + 1e-4
    if b == 1:
        assert abs(slope - 1) > 0.3  # the biased 1-bit quantizer (2/pi as d -> inf) is really biased


def test_hadamard_rotation_gives_the_same_distortion():
    x = _unit(8000, D, 2)
    rot = make_rotation("hadamard", D, 5)
    codes, norms = tq_mse_encode(x, 2, rot)
    dmse = float(((x - tq_mse_decode(codes, norms, rot, tq_codebook(D, 2), torch.float64)) ** 2).sum(-1).mean())
    assert dmse == pytest.approx(THEORY[2], rel=0.02)


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_prod_oracle_8_8(b):
    """TQ-prod is unbiased (slope 1) and D_prod d / ||y||^2 = pi/2 D_mse(b-1) (1 - 2/(pi d))."""
    d, draws, n = 64, 12, 1500
    errs, a_all, c_all = [], [], []
    for r in range(draws):  # fresh rotation and sketch per draw: the expectation is over them
        x = _unit(n, d, 1000 + r)
        y = torch.randn(n, d, generator=torch.Generator().manual_seed(2000 + r), dtype=torch.float64)
        rot = make_rotation("haar", d, 3000 + r)
        s = qjl_sketch(d, d, 4000 + r, dtype=torch.float64)
        cb = tq_codebook(d, b - 1) if b > 1 else None
        parts = tq_prod_encode(x, b, rot, s, cb)
        assert parts["signs"].shape == x.shape and ("codes" in parts) == (b > 1)
        xh = tq_prod_decode(parts, b, rot, s, cb, torch.float64)
        a, c = (y * x).sum(-1), (y * xh).sum(-1)
        errs.append((c - a) ** 2 * d / (y * y).sum(-1))
        a_all.append(a), c_all.append(c)
    a, c, err = torch.cat(a_all), torch.cat(c_all), torch.cat(errs)
    dm_prev = 1.0 if b == 1 else distortion(beta_codebook(d, b - 1), d)
    theory = math.pi / 2 * dm_prev * (1 - 2 / (math.pi * d))
    assert float(err.mean()) == pytest.approx(theory, rel=0.05)
    slope = float((a * c).sum() / (a * a).sum())
    assert abs(slope - 1) < 5 * math.sqrt(theory / len(a)) + 1e-3
    assert abs(float((c - a).mean())) < 5 * math.sqrt(theory / len(a))


def test_prod_reference_values():
    """docs/methods.md#oracle-turboquant-prod at d = 128: 1.56, 0.56, 0.18, 0.054 (formula, not a rounding)."""
    vals = [math.pi / 2 * (1.0 if b == 1 else distortion(beta_codebook(128, b - 1), 128))
            * (1 - 2 / (math.pi * 128)) for b in range(1, 5)]
    assert vals == pytest.approx([1.56, 0.56, 0.18, 0.054], rel=0.03)


def test_zero_rows_and_norm_overflow():
    x = torch.zeros(2, 3, 16)
    rot = make_rotation("haar", 16, 0)
    codes, norms = tq_mse_encode(x, 2, rot)
    assert torch.equal(tq_mse_decode(codes, norms, rot, tq_codebook(16, 2)), x)
    with pytest.raises(MethodFailure, match=re.escape("row norm is NaN/Inf or exceeds the float16 range")):
        tq_mse_encode(torch.full((1, 16), 1e5), 2, rot)
    with pytest.raises(KvcError, match=re.escape("codebook has 8 entries, expected 2**2")):
        tq_mse_encode(torch.randn(1, 16), 2, rot, tq_codebook(16, 3))


def test_deterministic_under_seed():
    x = torch.randn(4, 50, 32, generator=torch.Generator().manual_seed(0))
    c1 = tq_mse_encode(x, 3, make_rotation("haar", 32, 11))[0]
    assert torch.equal(c1, tq_mse_encode(x, 3, make_rotation("haar", 32, 11))[0])
    assert not torch.equal(c1, tq_mse_encode(x, 3, make_rotation("haar", 32, 12))[0])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert draw_seed(g1) == draw_seed(g2)


@pytest.mark.parametrize("kind", ["haar", "hadamard"])
@pytest.mark.parametrize("d", [128, 96, 64, 7, 1])
def test_rotations_are_orthogonal_and_batched(kind, d):
    rot = make_rotation(kind, d, 3, dtype=torch.float64)
    p = rot.dense()
    assert torch.allclose(p @ p.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    x = torch.randn(2, 3, 5, d, dtype=torch.float64)
    assert torch.allclose(rot.apply(x), x @ p.T, atol=1e-12)
    assert torch.allclose(rot.invert(rot.apply(x)), x, atol=1e-12)
    assert not torch.equal(p, make_rotation(kind, d, 4, dtype=torch.float64).dense()) or d == 1


def test_fwht_matches_sylvester_hadamard():
    h = torch.tensor(scipy.linalg.hadamard(32), dtype=torch.float64) / math.sqrt(32)
    x = torch.randn(3, 32, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ h, atol=1e-12)
    p = make_rotation("hadamard", 32, 1, dtype=torch.float64).dense()
    assert torch.allclose(p.abs(), torch.full((32, 32), 1 / math.sqrt(32), dtype=torch.float64))
    with pytest.raises(KvcError, match="needs a power-of-two length, got 12"):
        fwht(torch.randn(3, 12))
    with pytest.raises(KvcError, match="unknown rotation 'dct'; valid: haar, hadamard"):
        make_rotation("dct", 8, 0)


def test_haar_rotation_is_unbiased_in_distribution():
    """Sign fix: E[Pi] = 0 for Haar (without it the QR diagonal of R is biased positive)."""
    mean = sum(make_rotation("haar", 8, s, dtype=torch.float64).dense() for s in range(400)) / 400
    assert float(mean.abs().max()) < 0.2
    assert abs(float(torch.diagonal(mean).mean())) < 0.06


def test_fractional_split_rule():
    assert split_bits(3, 128) == [(128, 3)]
    assert split_bits(2.5, 128) == [(64, 3), (64, 2)]
    assert split_bits(3.5, 128) == [(64, 4), (64, 3)]
    # the paper's "2.5-bit" example (32 channels at 3 bits + 96 at 2) really spends 2.25 bits
    assert split_bits(2.25, 128) == [(32, 3), (96, 2)]
    for b, d in [(2.5, 128), (3.5, 64), (1.25, 128), (2.75, 96)]:
        split = split_bits(b, d)
        assert sum(c for c, _ in split) == d and sum(c * k for c, k in split) / d == b
    with pytest.raises(KvcError, match="2.3"):
        split_bits(2.3, 128)  # 38.4 channels


def test_outlier_channels_and_permutation():
    x = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(0))
    x[0, 1, :, 5] *= 10
    x[0, 1, :, 11] *= 20
    mask = outlier_channels(x, 2)
    assert mask.shape == (2, 3, 16) and bool((mask.sum(-1) == 2).all())
    assert mask[0, 1].nonzero().flatten().tolist() == [5, 11]
    perm = channel_permutation(mask)
    assert perm[0, 1, :2].tolist() == [5, 11] and sorted(perm[0, 1].tolist()) == list(range(16))
