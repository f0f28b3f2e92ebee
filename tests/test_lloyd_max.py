"""Lloyd-Max codebooks against docs/methods.md#beta-codebook (TurboQuant Theorem 1) and numerical integration."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy import integrate, special

from kvc.errors import KvcError
from kvc.quant import lloyd_max
from kvc.quant.lloyd_max import (beta_codebook, distortion, fit_codebook, gaussian_codebook,
                                 nearest_codes)

# positive halves times sqrt(d): GAUSS is Max's Gaussian quantizer (docs/methods.md#beta-codebook, d -> inf);
# BETA128 the Beta(128) digits of an independent, less converged NumPy solution
GAUSS = {1: [0.7979], 2: [0.4528, 1.5104], 3: [0.2451, 0.7560, 1.3439, 2.1519],
         4: [0.1284, 0.3880, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326]}
BETA128 = {1: [0.7995], 2: [0.4525, 1.5052], 3: [0.2444, 0.7532, 1.3364, 2.1313],
           4: [0.1278, 0.3860, 0.6530, 0.9364, 1.2470, 1.6036, 2.0452, 2.6882]}
DMSE128 = {1: 0.3609, 2: 0.1160, 3: 0.03397, 4: 0.00931}  # d * C(f_X, b), docs/methods.md#oracle-turboquant-mse


def _half(cb: torch.Tensor, d: int) -> np.ndarray:
    return (cb[len(cb) // 2:] * math.sqrt(d)).numpy()


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_codebooks_match_reference_table(b):
    assert np.allclose(_half(gaussian_codebook(128, b), 128), GAUSS[b], atol=1.5e-4)
    # BETA128's b = 3, 4 digits sit up to 7e-4 from the exact Lloyd fixed point (checked below by
    # quadrature; those digits have a larger fixed-point residual and a higher distortion).
    assert np.allclose(_half(beta_codebook(128, b), 128), BETA128[b], atol=1e-3)
    cb = beta_codebook(128, b)
    assert torch.equal(cb, -cb.flip(0)) and bool((cb.diff() > 0).all())


@pytest.mark.parametrize("d,b", [(128, 3), (128, 4), (32, 2), (96, 3)])
def test_beta_codebook_is_a_lloyd_fixed_point_by_quadrature(d, b):
    """Independent oracle: every centroid is the conditional mean of its cell under f_X (Lemma 1)."""
    c = beta_codebook(d, b).numpy()
    log_c = special.gammaln(d / 2) - special.gammaln((d - 1) / 2) - 0.5 * math.log(math.pi)

    def pdf(x):
        return math.exp(log_c + (d - 3) / 2 * math.log1p(-x * x))

    t = np.concatenate([[-1.0], (c[:-1] + c[1:]) / 2, [1.0]])
    for i, ci in enumerate(c):
        p = integrate.quad(pdf, t[i], t[i + 1], epsabs=1e-14)[0]
        m = integrate.quad(lambda x: x * pdf(x), t[i], t[i + 1], epsabs=1e-14)[0]
        assert abs(m / p - ci) * math.sqrt(d) < 1e-7


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_distortion_theorem_1(b):
    dm = distortion(beta_codebook(128, b), 128)
    assert dm == pytest.approx(DMSE128[b], rel=1e-3)  # reference digits: 3-4 significant
    assert 4.0 ** -b < dm <= math.sqrt(3) * math.pi / 2 * 4.0 ** -b
    # BETA128's rounded Beta codebook is not better than the exact one
    s = np.array(BETA128[b]) / math.sqrt(128)
    assert dm <= distortion(torch.tensor(np.concatenate([-s[::-1], s])), 128) + 1e-12


def test_gaussian_limit_one_bit():
    assert gaussian_codebook(64, 1)[1].item() == pytest.approx(math.sqrt(2 / math.pi) / 8, rel=1e-9)
    # large d: the Beta codebook converges to the Gaussian one
    assert np.allclose(_half(beta_codebook(4096, 2), 4096), _half(gaussian_codebook(4096, 2), 4096), atol=2e-4)


def test_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVC_CACHE_DIR", str(tmp_path))
    lloyd_max._beta_cached.cache_clear()
    cb = beta_codebook(40, 2)
    files = list((tmp_path / "codebooks").glob("beta_d40_b2_*.npy"))
    assert len(files) == 1 and np.allclose(np.load(files[0]), cb.numpy())
    files[0].write_bytes(b"garbage")  # a corrupt cache entry is recomputed, not trusted
    lloyd_max._beta_cached.cache_clear()
    assert torch.equal(beta_codebook(40, 2), cb)
    lloyd_max._beta_cached.cache_clear()


def test_bad_codebook_requests():
    for d, b, message in [(1, 2, "codebook dimension must be an integer >= 2, got 1"),
                          (128, 0, "codebook bit width must be an integer in 1..8, got 0"),
                          (128, 9, "codebook bit width must be an integer in 1..8, got 9"),
                          (128, 2.0, "codebook bit width must be an integer in 1..8, got 2.0"),
                          (True, 2, "codebook dimension must be an integer >= 2, got True")]:
        with pytest.raises(KvcError, match=f"^{re.escape(message)}$"):
            beta_codebook(d, b)


def test_fit_codebook_recovers_clusters_and_weights():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([-3.0, -1.0, 1.0, 3.0])
    x = centers[torch.randint(0, 4, (4000,), generator=g)] + 0.05 * torch.randn(4000, generator=g)
    cb = fit_codebook(x, 2)
    assert torch.allclose(cb.float(), centers, atol=0.01)
    assert torch.equal(fit_codebook(x, 2), cb)  # deterministic
    # weights: a zero weight on the far cluster drags no centroid there
    w = (x < 2).double()
    cbw = fit_codebook(x, 2, w)
    assert float(cbw.max()) < 2
    # 1-bit Lloyd on a symmetric uniform sample: +-1/2 of the half range
    u = torch.linspace(-1, 1, 10001)
    assert torch.allclose(fit_codebook(u, 1).float(), torch.tensor([-0.5, 0.5]), atol=1e-3)
    bad_input = "^fit_codebook needs non-empty samples and matching non-negative weights with a positive sum$"
    with pytest.raises(KvcError, match=bad_input):
        fit_codebook(torch.tensor([]), 2)
    with pytest.raises(KvcError, match=bad_input):
        fit_codebook(x, 2, -w)
    with pytest.raises(KvcError, match="^fit_codebook samples contain NaN or inf$"):
        fit_codebook(torch.tensor([0.0, float("nan")]), 1)


def test_nearest_codes_ties_go_low():
    cb = torch.tensor([-1.0, 0.0, 1.0])
    x = torch.tensor([-2.0, -0.5, -0.49, 0.5, 0.51, 5.0])
    assert nearest_codes(x, cb).tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("size", [2, 8, 16, 17, 256])
def test_nearest_codes_is_the_argmin_for_small_and_large_codebooks(size):
    """Both paths (compare-count up to 16 centroids, bucketize above) give the nearest centroid,
    ties (x on a midpoint) to the lower one, in the asked dtype."""
    g = torch.Generator().manual_seed(size)
    cb = torch.sort(torch.randn(size, generator=g, dtype=torch.float64)).values
    x = torch.randn(2000, generator=g, dtype=torch.float64) * 2
    want = torch.cat([(x[:, None] - cb).abs().argmin(dim=1), torch.arange(size - 1)])
    x = torch.cat([x, (cb[:-1] + cb[1:]) / 2])  # on the midpoint between centroids i and i + 1: i
    assert torch.equal(nearest_codes(x, cb), want)
    got = nearest_codes(x.reshape(-1, 1, 1), cb, torch.uint8)
    assert got.dtype == torch.uint8 and got.shape == (x.numel(), 1, 1) and torch.equal(got.reshape(-1).long(), want)
