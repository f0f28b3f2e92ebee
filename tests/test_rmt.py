"""Oracle tests for kvc.analysis.rmt (docs/methods.md#test-oracles). Fixed seeds, batched draws."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import optimize

from kvc.analysis import rmt

F64 = torch.float64



def _orthonormal(batch: int, m: int, r: int, gen: torch.Generator) -> torch.Tensor:
    q, rr = torch.linalg.qr(torch.randn(batch, m, r, generator=gen, dtype=F64))
    return q * torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1))[:, None, :]


def spiked(batch: int, n: int, d: int, thetas, gen: torch.Generator, noise: torch.Tensor | None = None):
    """(X, S): batch x n x d, S = sum theta_i u_i v_i^T, N(0, 1/N) noise entries (docs/methods.md#notation)."""
    N = max(n, d)
    Z = torch.randn(batch, n, d, generator=gen, dtype=F64) / math.sqrt(N) if noise is None else noise
    if not len(thetas):
        return Z, torch.zeros_like(Z)
    u, v = _orthonormal(batch, n, len(thetas), gen), _orthonormal(batch, d, len(thetas), gen)
    S = (u * torch.tensor(thetas, dtype=F64)) @ v.mT
    return S + Z, S


# --------------------------------------------------------------------------- closed forms


def test_rule_skip_counts():
    # docs/methods.md#eoptshrinkq-rank-rule: k(64) = 7, k(128) = 11, k(256) = 15; MATLAB k0 = floor(p^{1/2.01})
    assert [rmt.eoptshrinkq_k(d) for d in (64, 128, 256)] == [7, 11, 15]
    assert [rmt.matlab_k(p) for p in (64, 128, 256)] == [7, 11, 15]


def test_white_noise_spike_table():
    # docs/methods.md#oracle-spike-limits
    theta = torch.tensor([3.0, 2.0, 1.5], dtype=F64)
    for beta, y, c2, c2t in [
        (1.0, [3.333, 2.500, 2.167], [0.889, 0.750, 0.556], [0.889, 0.750, 0.556]),
        (0.25, [3.206, 2.305, 1.900], [0.970, 0.927, 0.856], [0.897, 0.788, 0.658]),
        (0.5, [3.249, 2.372, 1.993], [0.942, 0.861, 0.737], [0.894, 0.775, 0.624]),
    ]:
        lim = rmt.white_noise_spike(theta, beta)
        assert torch.allclose(lim.y, torch.tensor(y, dtype=F64), atol=1e-3)
        assert torch.allclose(lim.cos2_p, torch.tensor(c2, dtype=F64), atol=1e-3)
        assert torch.allclose(lim.cos2_n, torch.tensor(c2t, dtype=F64), atol=1e-3)
    below = rmt.white_noise_spike(0.5, 0.25)  # theta <= beta^{1/4}: sticks to the edge, no overlap
    assert below.y.item() == pytest.approx(1.5) and below.cos2_p.item() == 0 and below.cos2_n.item() == 0


def test_gavish_donoho_constants():
    # docs/methods.md#gavish-donoho: MP medians, lambda*(1) = 4/sqrt(3), omega(beta)
    assert rmt.mp_median(1.0) == pytest.approx(0.6528, abs=1e-4)
    assert rmt.mp_median(0.5) == pytest.approx(0.8305, abs=1e-4)
    assert rmt.mp_median(0.25) == pytest.approx(0.9160, abs=1e-4)
    assert rmt.optimal_hard_threshold(1.0) == pytest.approx(4 / math.sqrt(3), rel=1e-12)
    assert [round(rmt.omega(b), 3) for b in (1.0, 0.5, 0.25)] == [2.858, 2.171, 1.837]
    # population eta_fro at beta = .25 for theta = 1, 1.5, 2, 3 (docs/methods.md#oracle-shrinkage)
    y = rmt.white_noise_spike(torch.tensor([1.0, 1.5, 2.0, 3.0], dtype=F64), 0.25).y
    assert torch.allclose(rmt.gd_eta(y, 0.25), torch.tensor([0.474, 1.126, 1.708, 2.799], dtype=F64), atol=1e-3)


def test_thresholds_unnormalized():
    # docs/methods.md#oracle-spike-limits: 128 x 128, N(0, sigma^2) entries: BBP 11.3 sigma, edge 22.6 sigma
    assert rmt.bbp_threshold(128, 128, 2.0) == pytest.approx(2 * 11.31, abs=0.01)
    assert rmt.mp_bulk_edge(128, 128, 2.0) == pytest.approx(2 * 22.63, abs=0.01)


def test_bit_accounting():
    # docs/methods.md#energy-share: rho = .75 saves one bit; factor overhead 0.1875 at r = 3, n = d = 128
    assert rmt.predicted_bit_saving(0.75, 0, 128, 128).item() == pytest.approx(1.0)
    assert rmt.predicted_bit_saving(0.5, 3, 128, 128).item() == pytest.approx(0.5 - 0.1875)


# --------------------------------------------------------------------------- decomposition


@pytest.mark.parametrize("n,d", [(96, 32), (32, 96)])
def test_gram_eigh_is_a_thin_svd(n, d):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(3, n, d, generator=gen, dtype=F64)
    svd = rmt.gram_eigh(X)
    assert svd.transposed == (n < d)
    assert torch.allclose(svd.singular_values, torch.linalg.svdvals(X), rtol=1e-9)
    rebuilt = (svd.left * svd.singular_values[:, None, :]) @ svd.right.mT
    assert torch.allclose(rebuilt, X, atol=1e-9)


def test_transpose_gives_the_same_answer():
    gen = torch.Generator().manual_seed(2)
    X, _ = spiked(4, 256, 64, [3.0, 2.0], gen)
    a, b = rmt.eoptshrink(X), rmt.eoptshrink(X.mT)
    assert torch.equal(a.rank, b.rank)
    assert torch.allclose(a.phi, b.phi, rtol=1e-9)
    assert torch.allclose(a.lowrank(), b.lowrank().mT, atol=1e-9)
    assert torch.allclose(a.cos2_left, b.cos2_right) and torch.allclose(a.cos2_right, b.cos2_left)


# --------------------------------------------------------------------------- rank rules
# oracle: docs/methods.md#oracle-rank-rule


@pytest.mark.parametrize("n,d", [(128, 128), (128, 512), (512, 128)])
def test_rank_recovered_for_theta_at_least_2(n, d):
    gen = torch.Generator().manual_seed(3)
    X, _ = spiked(50, n, d, [4.0, 3.0, 2.0], gen)
    assert rmt.eoptshrink(X).rank.tolist() == [3] * 50
    # the MATLAB v5 rule finds every spike too, plus its known false positives
    assert (rmt.eoptshrink(X, rule="matlab", imputation="matlab").rank >= 3).all()


def test_theta_1p5_square_is_mostly_missed():
    # docs/methods.md#oracle-rank-rule: the p^{-1/3} margin detects from ~1.54 sigma at 128 x 128; 1.5 missed 14/20
    gen = torch.Generator().manual_seed(4)
    X, _ = spiked(60, 128, 128, [1.5], gen)
    missed = (rmt.eoptshrink(X).rank == 0).float().mean().item()
    assert 0.4 <= missed <= 0.95


@pytest.mark.parametrize("n,d", [(128, 128), (128, 512), (64, 128), (64, 64)])
def test_pure_noise_has_no_spike(n, d):
    gen = torch.Generator().manual_seed(5)
    X, _ = spiked(200, n, d, [], gen)
    assert (rmt.eoptshrink(X).rank == 0).sum().item() >= 199


def test_matlab_rule_false_positives_on_noise():
    # docs/methods.md#oracle-rank-rule: the 1.1-factor v5 rule flags pure noise in ~42 % of 128 x 128 draws
    gen = torch.Generator().manual_seed(6)
    X, _ = spiked(200, 128, 128, [], gen)
    flagged = (rmt.eoptshrink(X, rule="matlab", imputation="matlab").rank > 0).float().mean().item()
    assert 0.2 <= flagged <= 0.65


@pytest.mark.parametrize("n,d", [(512, 128), (128, 512), (2048, 64)])
def test_bulk_edge_and_sigma(n, d):
    gen = torch.Generator().manual_seed(7)
    sigma = 0.7
    X = sigma * torch.randn(100, n, d, generator=gen, dtype=F64)
    s = rmt.eoptshrink(X)
    edge = s.edge.sqrt() / rmt.mp_bulk_edge(n, d, sigma)
    assert abs(edge.mean().item() - 1) < 0.02  # sigma (sqrt n + sqrt d), docs/methods.md#marchenko-pastur
    assert (edge - 1).abs().max().item() < 0.06
    sig = rmt.gd_sigma(s.singular_values, n, d) / sigma  # MP-median estimate, docs/methods.md#gavish-donoho
    assert abs(sig.mean().item() - 1) < 0.005 and (sig - 1).abs().max().item() < 0.02


def test_rule_fit_and_starvation():
    assert rmt.rank_rule_unfit("eoptshrinkq", 64) is None
    assert rmt.rank_rule_unfit("matlab", 3) is None
    assert "at least 3" in rmt.rank_rule_unfit("eoptshrinkq", 2)
    assert "at least 3" in rmt.rank_rule_unfit("matlab", 2)
    starved = rmt.imputation_starved(torch.tensor([0, 49, 50]), 64)  # k(64) = 7: needs r + 15 <= 64
    assert starved.tolist() == [False, False, True]


# --------------------------------------------------------------------------- shrinkage
# oracles: docs/methods.md#oracle-shrinkage, docs/methods.md#oracle-amse


def test_shrinker_matches_gavish_donoho_eta_fro():
    # docs/methods.md#oracle-shrinkage: one 400 x 1600 draw (beta = .25); within 1 % for theta >= 1.5
    gen = torch.Generator().manual_seed(8)
    thetas = [3.0, 2.0, 1.5]
    X, _ = spiked(1, 1600, 400, thetas, gen)
    s = rmt.eoptshrink(X)
    assert s.rank.item() == 3
    phi, d_hat = s.phi[0], s.d_hat[0]
    y = s.singular_values[0, :3]
    population = rmt.gd_eta(rmt.white_noise_spike(torch.tensor(thetas, dtype=F64), 0.25).y, 0.25)
    assert torch.allclose(phi, rmt.gd_eta(y, 0.25), rtol=0.01)  # same singular values, known sigma
    # against the population values the draw's own fluctuation of y adds up to ~7 % at theta = 1.5
    assert torch.allclose(phi[:2], population[:2], rtol=0.01)
    assert torch.allclose(d_hat[:2], torch.tensor(thetas[:2], dtype=F64), rtol=0.01)
    assert torch.allclose(rmt.gd_shrink(y, 1600, 400, sigma=1 / math.sqrt(1600)), rmt.gd_eta(y, 0.25))


def test_d_transform_identity():
    # docs/methods.md#oracle-shrinkage: D(y(theta)) = 1 / theta^2 (noise: one 400 x 1600 white draw)
    gen = torch.Generator().manual_seed(9)
    Z, _ = spiked(1, 1600, 400, [], gen)
    lam = rmt.gram_eigh(Z).eigenvalues
    theta = torch.tensor([[1.5, 2.0, 3.0]], dtype=F64)
    y = rmt.white_noise_spike(theta, 0.25).y
    est = rmt.d_transform(y**2, rmt.NoiseSpectrum(lam, torch.ones_like(lam)), 0.25)
    assert torch.allclose(est.T, 1 / theta**2, rtol=0.015)


def test_phi_is_optshrink_weight():
    # docs/methods.md#optimal-shrinkage: phi = d sqrt(a1 a2) equals Nadakuditi's -2 D(y) / D'(y) (D' by autograd)
    gen = torch.Generator().manual_seed(10)
    mu = torch.rand(40, generator=gen, dtype=F64) + 0.2
    beta = 0.4
    y = torch.tensor([2.0, 3.5], dtype=F64, requires_grad=True)
    phi_z = (y[:, None] / (y[:, None] ** 2 - mu)).mean(-1)  # Nadakuditi 2014 eq. (7)
    D = phi_z * (beta * phi_z + (1 - beta) / y)
    (dD,) = torch.autograd.grad(D.sum(), y)
    weight = (-2 * D / dD).detach()
    est = rmt.d_transform(y.detach() ** 2, rmt.NoiseSpectrum(mu, torch.ones_like(mu)), beta)
    assert torch.allclose(est.T, D.detach(), rtol=1e-12)
    assert torch.allclose(rmt.shrink_singular_values(est.d_hat, est.a1, est.a2), weight, rtol=1e-10)


def test_guard_zeroes_unusable_components():
    # docs/methods.md#d-transform guard: T <= 0 (an "outlier" below the noise) -> not usable, phi = 0
    noise = rmt.NoiseSpectrum(torch.tensor([1.0, 2.0, 3.0], dtype=F64), torch.ones(3, dtype=F64))
    est = rmt.d_transform(torch.tensor([0.5, 9.0], dtype=F64), noise, 0.25)
    assert est.usable.tolist() == [False, True]
    assert est.d_hat[0].item() == 0 and est.T[0].item() < 0
    assert rmt.shrink_singular_values(est.d_hat, est.a1, est.a2)[0].item() == 0


@pytest.mark.parametrize("rule", ["eoptshrinkq", "matlab"])
def test_amse_oracle_and_truncated_svd_is_worse(rule):
    # docs/methods.md#oracle-amse: beta = .25, 128 x 512, theta = (3, 2, 1.5) + 0.5 beta^{1/4}: AMSE 3.357
    gen = torch.Generator().manual_seed(11)
    beta = 0.25
    thetas = [3.0, 2.0, 1.5, 0.5 * beta**0.25]
    X, S = spiked(40, 128, 512, thetas, gen)
    s = rmt.eoptshrink(X, rule=rule, imputation=rule)
    lim = rmt.white_noise_spike(torch.tensor(thetas[:3], dtype=F64), beta)
    th = torch.tensor(thetas[:3], dtype=F64)
    amse = (th**2 * (1 - lim.cos2_p * lim.cos2_n)).sum().item() + thetas[3] ** 2
    assert amse == pytest.approx(3.357, abs=1e-3)
    err = (s.lowrank() - S).square().sum((-2, -1))
    assert err.mean().item() == pytest.approx(amse, rel=0.06)
    tsvd = (s.truncated_svd() - S).square().sum((-2, -1))
    # per spike: theta^2 + y^2 - 2 theta y c c~ > theta^2 (1 - c^2 c~^2) (docs/methods.md#spiked-model)
    tsvd_limit = (th**2 + lim.y**2 - 2 * th * lim.y * (lim.cos2_p * lim.cos2_n).sqrt()).sum().item() + thetas[3] ** 2
    assert tsvd.mean().item() == pytest.approx(tsvd_limit, rel=0.06)
    assert (tsvd > err).float().mean().item() >= 0.95 and tsvd.mean() > 1.3 * err.mean()


# --------------------------------------------------------------------------- colored noise
# oracle: docs/methods.md#oracle-colored-noise


def _separable_noise(batch: int, n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Z = B^{1/2} G A^{1/2} / sqrt(N): channel variances uniform on [1, 10], token variances {0.5, 2}."""
    a = torch.linspace(1, 10, d, dtype=F64)
    b = torch.where(torch.arange(n) % 2 == 0, 0.5, 2.0).to(F64)
    G = torch.randn(batch, n, d, generator=gen, dtype=F64)
    return G * a.sqrt() * b.sqrt()[:, None] / math.sqrt(max(n, d))


def test_colored_noise_shrinker_tracks_the_oracle():
    gen = torch.Generator().manual_seed(12)
    thetas = [12.0, 8.0, 6.0]
    # oracle: population D-transform of the known noise law, from a 8x larger draw (n -> large)
    big = _separable_noise(1, 4096, 1024, gen)[0]
    lam_big = torch.linalg.eigvalsh(big.mT @ big).flip(-1)
    law = rmt.NoiseSpectrum(lam_big, torch.ones_like(lam_big))

    def at(lam: float) -> rmt.DTransformEstimate:
        return rmt.d_transform(torch.tensor([lam], dtype=F64), law, 0.25)

    oracle = []
    for theta in thetas:  # D(y^2) = 1/theta^2 locates the outlier; phi* = theta sqrt(c^2 c~^2) there
        lam = optimize.brentq(lambda x: at(x).T.item() - theta**-2, lam_big[0].item() * 1.0001, 1e4)
        est = at(lam)
        oracle.append((est.d_hat * (est.a1 * est.a2).sqrt()).item())
    oracle = torch.tensor(oracle, dtype=F64)

    X, _ = spiked(40, 512, 128, thetas, gen, noise=_separable_noise(40, 512, 128, gen))
    s = rmt.eoptshrink(X)
    assert s.rank.tolist() == [3] * 40
    assert torch.allclose(s.phi.mean(0), oracle, rtol=0.02)
    assert torch.allclose(s.d_hat.mean(0), torch.tensor(thetas, dtype=F64), rtol=0.02)
    # Gavish-Donoho with the MP-median sigma assumes white noise: biased on the weakest spike
    gd = rmt.gd_shrink(s.singular_values, 512, 128)[:, :3].mean(0)
    assert (gd[2] / oracle[2] - 1).abs().item() > 0.04


# --------------------------------------------------------------------------- residual diagnostics


def test_residual_diagnostics_on_white_rows():
    gen = torch.Generator().manual_seed(13)
    n, d = 4096, 64
    R = torch.randn(2, n, d, generator=gen, dtype=F64)
    shell = rmt.thin_shell(R)
    assert torch.allclose(shell.energy_ratio, torch.full((2,), 2 / d, dtype=F64), rtol=0.1)  # 2 tr(A^2)/tr(A)^2
    assert torch.allclose(shell.norm_cv, torch.full((2,), 1 / math.sqrt(2 * d), dtype=F64), rtol=0.1)
    iso = rmt.isotropy(R)
    assert torch.allclose(iso.top_over_mean, torch.full((2,), iso.white_reference, dtype=F64), rtol=0.05)
    deloc = rmt.delocalization(R, torch.Generator().manual_seed(0))
    assert (deloc.ratio_rotated < 1).all() and (deloc.ratio_raw < 1).all()


def test_residual_diagnostics_see_structure():
    gen = torch.Generator().manual_seed(14)
    n, d = 2048, 64
    R = torch.randn(n, d, generator=gen, dtype=F64)
    R[:, 5] *= 20  # one outlier channel: localized and anisotropic, but a rotation delocalizes it
    deloc = rmt.delocalization(R, torch.Generator().manual_seed(0))
    assert deloc.ratio_raw.item() > 1.8 and deloc.ratio_rotated.item() < 1.2
    assert rmt.isotropy(R).top_over_mean.item() > 20
    scaled = torch.randn(n, d, generator=gen, dtype=F64) * torch.rand(n, 1, generator=gen, dtype=F64) * 3
    assert rmt.thin_shell(scaled).energy_ratio.item() > 10 * 2 / d  # row scales break the thin shell


def test_energy_share_of_exact_lowrank():
    gen = torch.Generator().manual_seed(15)
    X, S = spiked(2, 256, 64, [5.0], gen)
    assert torch.allclose(rmt.energy_share(X, X), torch.ones(2, dtype=F64))
    expected = S.square().sum((-2, -1)) / X.square().sum((-2, -1))
    assert torch.allclose(rmt.energy_share(X, S), expected)


@pytest.mark.parametrize("n,d", [(600, 64), (40, 64)])
def test_residual_diagnostics_match_the_formed_residual(n, d):
    """The blocked X [C | C Q^T] products (one buffer, float32) and the closed-form residual spectrum
    give what the n x d residual X - lowrank, formed and measured whole in float64, gives."""
    gen = torch.Generator().manual_seed(16)
    X, _ = spiked(3, n, d, [6.0, 4.0], gen)
    X[..., 5] *= 8  # an outlier channel: the raw maxima differ from the rotated ones
    s = rmt.eoptshrink(X)
    R = X - s.lowrank()
    assert torch.allclose(s.residual(X), R, atol=1e-10)
    shell, deloc = rmt.residual_diagnostics(s, X, torch.Generator().manual_seed(3))
    ref_shell, ref_deloc = rmt.thin_shell(R), rmt.delocalization(R, torch.Generator().manual_seed(3))
    for got, ref in zip([*shell, *deloc[1:]], [*ref_shell, *ref_deloc[1:]]):
        assert torch.allclose(got, ref, rtol=1e-10)
    s32 = rmt.eoptshrink(X.float(), gram_dtype=torch.float32)  # the float32 path of kvc analyze
    assert torch.equal(s32.rank, s.rank)
    shell32, deloc32 = rmt.residual_diagnostics(s32, X.float(), torch.Generator().manual_seed(3))
    for got, ref in zip([*shell32, *deloc32[1:]], [*ref_shell, *ref_deloc[1:]]):
        assert torch.allclose(got, ref, rtol=1e-4)
    # R^T R has the eigenvalues (y_i - phi_i)^2 on the shrunk components, lambda_i elsewhere
    r = s.phi.shape[-1]
    spectrum = torch.cat([(s.singular_values[..., :r] - s.phi).square(), s.eigenvalues[..., r:]], -1)
    assert torch.allclose(rmt.spectrum_isotropy(spectrum, n, d).top_over_mean, rmt.isotropy(R).top_over_mean,
                          rtol=1e-9)


@pytest.mark.parametrize("beta", [1.0, 0.9, 0.5, 0.25, 0.03125, 1e-3])
def test_mp_median_matches_adaptive_quadrature(beta):
    """The midpoint rule in theta against scipy's adaptive quadrature of the MP density and brentq."""
    from scipy import integrate

    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2

    def density(x):  # Marchenko-Pastur 1967
        return math.sqrt(max((hi - x) * (x - lo), 0.0)) / (2 * math.pi * beta * x)

    want = optimize.brentq(lambda t: integrate.quad(density, lo, t, limit=200)[0] - 0.5, lo + 1e-12, hi, xtol=1e-13)
    assert rmt.mp_median(beta) == pytest.approx(want, rel=1e-9)
