"""Rank and shrinkage of the low-rank codecs: Eckart-Young against eOptShrink's shrinkage
(docs/methods.md#eckart-young), the error decomposition (docs/methods.md#error-decomposition) and the
rate-optimal rank rule (docs/methods.md#rate-optimal-rank, docs/methods.md#oracle-rate-optimal-rank)."""

from __future__ import annotations

import math
import re

import pytest
import torch

import kvc
from kvc.analysis.rmt import eoptshrink, gram_eigh, rate_optimal_prefix
from kvc.compression.lowrank import factor_distortion, residual_distortion, residual_slope
from kvc.compression.protocol import LayerKV
from kvc.compression.registry import build
from kvc.errors import KvcError
from kvc.model.synth import SpikedSpec, spiked_block
from kvc.quant.lloyd_max import beta_codebook, distortion, nearest_codes

F64 = torch.float64



def spiked(heads: int, n: int, d: int, strengths, seed: int = 0, noise: str = "white") -> torch.Tensor:
    """[1, heads, n, d] float64 from the spiked model (strengths in units of the BBP threshold's scale)."""
    spec = SpikedSpec(num_kv_heads=heads, head_dim=d, seq_len=n, strengths=list(strengths), noise=noise)
    return spiked_block(spec, torch.Generator().manual_seed(seed))


def layer_of(k: torch.Tensor, v: torch.Tensor) -> LayerKV:
    q = torch.zeros(k.shape[0], k.shape[1], 1, k.shape[-1])
    return LayerKV(0, k.float(), v.float(), q, torch.tensor([k.shape[2] - 1]))


def frob2(x: torch.Tensor) -> torch.Tensor:
    return x.square().sum((-2, -1))


# --------------------------------------------------------------------------- Eckart-Young


SETTINGS = [  # (n, d, strengths, noise); strengths from below the BBP threshold to far above
    (128, 64, [], "white"), (128, 64, [0.5, 0.3], "white"), (128, 128, [1.3, 1.2, 1.1], "white"),
    (512, 128, [1.3, 1.2, 1.1], "white"), (128, 64, [6.0, 4.0, 3.0], "white"), (64, 128, [3.0, 2.0], "white"),
    (128, 64, [6.0, 4.0, 3.0], "colored"), (256, 64, [2.0, 1.5, 1.2, 1.0, 0.8], "colored"),
]


@pytest.mark.parametrize("n,d,strengths,noise", SETTINGS)
@pytest.mark.parametrize("rule", ["eoptshrinkq", "matlab"])
def test_truncation_residual_is_never_above_shrinkage(n, d, strengths, noise, rule):
    """Eckart-Young (Mirsky): among rank-r matrices the truncated SVD minimizes ||X - L||_F, so at the
    same rank with exact factors eoptshrink's shrunk part leaves at least as large a residual."""
    X = torch.cat([spiked(8, n, d, strengths, seed=s, noise=noise)[0] for s in range(3)])  # 24 matrices
    s = eoptshrink(X, rule=rule, imputation=rule)
    truncated, shrunk = frob2(X - s.truncated_svd()), frob2(X - s.lowrank())
    assert bool((truncated <= shrunk * (1 + 1e-12)).all())
    lam, y = s.eigenvalues, s.singular_values
    r_max = s.mask.shape[-1]
    # the residual norms in closed form: sum_{i>r} y_i^2, and + sum_{i<=r} (y_i - phi_i)^2 for shrinkage
    tail = (lam * (torch.arange(lam.shape[-1]) >= s.rank[:, None])).sum(-1)
    assert torch.allclose(truncated, tail, rtol=1e-9, atol=1e-9 * float(lam.sum(-1).max()))
    excess = ((y[:, :r_max] - s.phi).square() * s.mask).sum(-1)
    assert torch.allclose(shrunk, tail + excess, rtol=1e-9, atol=1e-9 * float(lam.sum(-1).max()))
    shrinks = (s.phi < y[:, :r_max] * (1 - 1e-9)) & s.mask
    assert bool((truncated[shrinks.any(-1)] < shrunk[shrinks.any(-1)]).all())  # strict wherever it shrinks
    if any(t > 2 for t in strengths):
        assert int(shrinks.any(-1).sum()) >= 12  # most matrices have shrunk components: not vacuous


def test_truncation_beats_every_rank_r_matrix_on_random_matrices():
    """Random (Gaussian, heavy-tailed) matrices, r = 1..8: no rank-r matrix built from the top singular
    vectors with other weights (eoptshrink-style shrinkage, Gavish-Donoho, random) nor from random
    factors gets below sum_{i>r} y_i^2."""
    gen = torch.Generator().manual_seed(5)
    X = torch.cat([torch.randn(16, 96, 64, generator=gen, dtype=F64),
                   torch.distributions.StudentT(3.0).sample((16, 96, 64)).to(F64)])
    svd = gram_eigh(X)
    y = svd.singular_values
    for r in range(1, 9):
        best = frob2(X) - y[:, :r].square().sum(-1)
        weights = [y[:, :r] * torch.rand(32, r, generator=gen, dtype=F64),  # any shrinkage in [0, y]
                   y[:, :r] * (1 + torch.rand(32, r, generator=gen, dtype=F64))]  # or expansion
        for w in weights:
            L = (svd.left[..., :r] * w[:, None, :]) @ svd.right[..., :r].mT
            assert bool((frob2(X - L) > best).all())
        A = torch.randn(32, 96, r, generator=gen, dtype=F64)
        B = torch.linalg.lstsq(A, X).solution  # the best rank-r fit with column space A
        assert bool((frob2(X - A @ B) >= best * (1 - 1e-12)).all())


# --------------------------------------------------------------------------- error decomposition


def test_factor_distortion_matches_quantized_random_unit_vectors():
    """c_f = 1 - (1 - delta_n)(1 - delta_d): the squared error of w u v^T with Lloyd-Max coded u, v."""
    n, d, bits = 128, 64, 3
    gen = torch.Generator().manual_seed(2)
    u = torch.nn.functional.normalize(torch.randn(4000, n, generator=gen, dtype=F64), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(4000, d, generator=gen, dtype=F64), dim=-1)
    cb_n, cb_d = beta_codebook(n, bits) * math.sqrt(n), beta_codebook(d, bits) * math.sqrt(d)
    u_hat = cb_n[nearest_codes(u * math.sqrt(n), cb_n)] / math.sqrt(n)
    v_hat = cb_d[nearest_codes(v * math.sqrt(d), cb_d)] / math.sqrt(d)
    err = frob2(u_hat[:, :, None] * v_hat[:, None, :] - u[:, :, None] * v[:, None, :]).mean()
    assert float(err) == pytest.approx(factor_distortion(n, d, bits), rel=0.02)
    assert 0.06 < factor_distortion(n, d, bits) < 0.07  # ~ 2 x 0.0345 (Gaussian 3-bit Lloyd-Max)
    assert factor_distortion(1, 64, bits) == distortion(beta_codebook(64, bits), 64)  # R^1: u = +-1, exact


def test_predicted_error_matches_the_codec():
    """docs/methods.md#error-decomposition: E||X - X_hat||^2 = D_b (||X||^2 - (1 - c_f) sum_{i<=r} (2 y_i w_i
    - w_i^2)), for both methods, within a few percent on spiked blocks; and eoptshrinkq - svdq =
    D_b (1 - c_f) sum (y_i - phi_i)^2 > 0."""
    n, d = 128, 64
    x = torch.cat([spiked(4, n, d, [8.0, 5.0, 3.0], seed=s) for s in range(4)], dim=1)  # [1, 16, n, d]
    measured = {}
    for method in ("eoptshrinkq", "svdq"):
        comp = build(method, keys="post", bits=2)
        enc = comp.encode(layer_of(x, x))
        x_hat = comp.decode(enc, layer_of(x, x)).v.double()
        c = comp.components(x.float())
        keep = comp.select(c, n, d)
        y, w = c.singular_values[..., : keep.shape[-1]], c.weights
        cf = factor_distortion(n, d, 4)
        R2 = frob2(x) - (1 - cf) * (keep * (2 * y * w - w * w)).sum(-1)
        predicted = residual_distortion(d, 2) * R2.sum()
        measured[method] = float(frob2(x_hat - x).sum())
        assert measured[method] == pytest.approx(float(predicted), rel=0.04)
        p = comp.predict(x.float())  # the public prediction: the same numbers, split in its parts
        assert p.ranks.equal(keep.sum(-1)) and float(p.error.sum()) == pytest.approx(float(predicted), rel=1e-9)
        assert torch.allclose(p.energy, frob2(x)) and float(p.distortion) == residual_distortion(d, 2)
        assert (method == "svdq") == bool((p.excess == 0).all())
    s = eoptshrink(x[0].float())
    excess = residual_distortion(d, 2) * (1 - cf) * ((s.singular_values[:, :3] - s.phi).square() * s.usable).sum()
    assert measured["eoptshrinkq"] - measured["svdq"] == pytest.approx(float(excess), rel=0.3)


# --------------------------------------------------------------------------- rate-optimal rank


def test_rate_optimal_prefix_closed_form():
    """docs/methods.md#oracle-rate-optimal-rank: a component pays iff it cuts the residual energy by more
    than the factor 2^(-gamma c / N) its bits buy."""
    N, c, gamma = 8192, 784.0, 1.75
    keep_ratio = 2.0 ** (-gamma * c / N)  # E(m) / E(m-1) below this: the component pays
    # four components that each halve the residual, then 60 equal ones that together remove half the rest
    energy = torch.tensor([1.0], dtype=F64)
    head = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=F64)
    gains = torch.cat([head, torch.full((60,), 0.0625 / 120, dtype=F64)])[None]
    costs = torch.full_like(gains, c)
    # closed form: each halving component pays; log2 E(m) is concave along the equal tail, so J's minimum
    # there is at an end, and all 60 (J(64) - J(4) = -N/gamma + 60 c > 0) do not pay
    assert 0.5 < keep_ratio < 1 - 1 / 120 and -N / gamma + 60 * c > 0
    assert int(rate_optimal_prefix(energy, gains, costs, N, gamma)) == 4
    # at the break-even gain g* = E (1 - 2^(-gamma c / N)) the tie goes to the smaller rank
    g_star = 1 - keep_ratio
    for g, expected in [(g_star * (1 - 1e-6), 0), (g_star * (1 + 1e-6), 1)]:
        gain = torch.tensor([[g]], dtype=F64)
        assert int(rate_optimal_prefix(energy, gain, torch.full_like(gain, c), N, gamma)) == expected
    # a weak component that opens the way to a strong one: the prefix {1, 2} pays as a whole
    gains = torch.tensor([[0.01, 0.9]], dtype=F64)
    J = [N / gamma * math.log2(e) + k * c for k, e in enumerate([1.0, 0.99, 0.09])]
    assert J.index(min(J)) == 2
    assert int(rate_optimal_prefix(energy, gains, torch.full_like(gains, c), N, gamma)) == 2
    # free components (cost 0) are kept as long as they remove energy; an all-zero block keeps none
    assert int(rate_optimal_prefix(energy, gains, torch.zeros_like(gains), N, gamma)) == 2
    assert int(rate_optimal_prefix(torch.zeros(1, dtype=F64), torch.zeros(1, 3, dtype=F64),
                                   torch.full((1, 3), c), N, gamma)) == 0


def test_residual_slope_and_distortion():
    """gamma_b from TurboQuant-mse's exact distortions (docs/methods.md#oracle-turboquant-mse)."""
    D = [residual_distortion(128, b) for b in range(0, 5)]
    assert D[0] == 1.0 and [round(x, 4) for x in D[1:]] == [0.3609, 0.116, 0.034, 0.0093]
    assert residual_slope(128, 2) == pytest.approx(0.5 * math.log2(D[1] / D[3]))
    assert residual_slope(64, 8) == pytest.approx(2.0, abs=0.02)  # high-resolution limit 4^-b
    assert residual_distortion(64, 9) == pytest.approx(residual_distortion(64, 8) / 4)


def designed_blocks(n: int, d: int, blocks: int, seed: int = 0) -> torch.Tensor:
    """[1, blocks, n, d]: exact singular values with four components that each halve the residual energy,
    then d - 4 equal ones (random singular vectors)."""
    gen = torch.Generator().manual_seed(seed)
    s2 = torch.cat([torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=F64),
                    torch.full((d - 4,), 0.0625 / (d - 4), dtype=F64)])
    U, _ = torch.linalg.qr(torch.randn(blocks, n, d, generator=gen, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(blocks, d, d, generator=gen, dtype=F64))
    return ((U * (s2.sqrt() * math.sqrt(n * d))) @ V.mT)[None]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_rd_rank_on_a_designed_spectrum(bits):
    """The codec's rd rule on blocks whose optimal rank is 4 in closed form, at any residual bit width:
    the halving components cut the energy by 1/2 (pays below 2^(-gamma c/N) ~ 0.9), the others by at most
    1/60 x (1 - c_f)."""
    n, d = 128, 64
    x = designed_blocks(n, d, 6)
    gamma, c, cf = residual_slope(d, bits), 4 * (n + d) + 16, factor_distortion(n, d, 4)
    keep_ratio = 2.0 ** (-gamma * c / (n * d))
    R = [1.0]  # residual energy R(r) / ||X||^2 along the four halving components
    for s2 in (0.5, 0.25, 0.125, 0.0625):
        R.append(R[-1] - (1 - cf) * s2)
    assert max(R[i + 1] / R[i] for i in range(4)) < 0.58 < keep_ratio  # each halving component pays
    tail = (1 - cf) * 0.0625 / (d - 4)  # then log2 R is concave along the equal ones: check both ends
    assert (R[4] - tail) / R[4] > 0.98 > keep_ratio
    assert n * d / gamma * math.log2(cf / R[4]) + (d - 4) * c > 0  # R(d) = c_f: the whole tail does not pay
    layer = layer_of(x, x)
    enc = build("svdq", keys="post", rank_rule="rd", bits=bits).encode(layer)
    assert enc.arrays["k.ranks"].tolist() == [[[4]] * 6] and enc.arrays["v.ranks"].tolist() == [[[4]] * 6]
    fixed = build("svdq", keys="post", rank=7, bits=bits).encode(layer)
    assert fixed.arrays["k.ranks"].tolist() == [[[7]] * 6]
    assert fixed.nbits("k.") - enc.nbits("k.") == 6 * 3 * (4 * (n + d) + 16)  # 3 more components per block


def test_eoptshrinkq_rd_keeps_a_prefix_of_its_detected_components():
    n, d = 128, 64
    x = torch.cat([spiked(4, n, d, s, seed=i) for i, s in enumerate([[8.0, 5.0, 3.0], [1.6, 1.5], [], [20.0]])], 1)
    layer = layer_of(x, x)
    detected = build("eoptshrinkq", keys="post").encode(layer).arrays["k.ranks"]
    rd = build("eoptshrinkq", keys="post", rank_rule="rd").encode(layer).arrays["k.ranks"]
    assert bool((rd <= detected).all()) and int(detected.sum()) > 0
    capped = build("eoptshrinkq", keys="post", rank=1).encode(layer).arrays["k.ranks"]
    assert capped.equal(detected.clamp(max=1))
    svd_rd = build("svdq", keys="post", rank_rule="rd").encode(layer).arrays["k.ranks"]
    assert int(svd_rd[0, 12:].min()) >= 1  # rank 20 spike: far above what its bits cost


@pytest.mark.parametrize("d,block,T,noise", [(64, 128, 300, "white"), (128, 512, 1024, "colored"),
                                             (256, 256, 700, "white"), (64, 64, 64, "colored")])
@pytest.mark.parametrize("method", ["svdq", "eoptshrinkq"])
def test_rd_ranks_are_valid_on_real_shapes(method, d, block, T, noise):
    x = spiked(3, T, d, [6.0, 3.0, 1.5, 1.0], seed=d, noise=noise).float()
    x[..., 3] *= 8  # an outlier channel, as real keys have
    layer = layer_of(x, x.flip(2))
    comp = build(method, keys="post", rank_rule="rd", block=block)
    comp.validate(layer)
    enc = comp.encode(layer)
    nb, p = T // block, min(block, d)
    for kind in ("k", "v"):
        ranks = enc.arrays[f"{kind}.ranks"]
        assert ranks.shape == (1, 3, nb) and int(ranks.max()) <= p and int(ranks.max()) >= 1
        assert enc.arrays[f"{kind}.weights"].numel() == int(ranks.sum())
    dec = build(method, keys="post", rank_rule="rd", block=block).decode(enc, layer)
    assert dec.k.shape == x.shape and bool(torch.isfinite(dec.k).all())
    assert float(frob2(dec.k - x).sum() / frob2(x).sum()) < 0.15


def test_rank_options_validate():
    x = spiked(1, 128, 64, [])
    layer = layer_of(x, x)
    with pytest.raises(KvcError, match="^" + re.escape("svdq: --rank must be in [0, 255], got 256")):
        build("svdq", rank=256)
    message = "eoptshrinkq: --rank-rule must be one of eoptshrinkq, matlab, rd, got 'bbp'"
    with pytest.raises(KvcError, match="^" + re.escape(message)):
        build("eoptshrinkq", rank_rule="bbp")
    build("svdq", keys="post", block=2, rank_rule="rd").validate(layer)  # rd needs no detection
    with pytest.raises(KvcError, match="^" + re.escape("eoptshrinkq: --block 2 at head_dim 64: min(n, d) = 2")):
        build("eoptshrinkq", keys="post", block=2, rank_rule="rd").validate(layer)
    nominal = type(build("svdq")).nominal_bits
    base, fixed = nominal(build("svdq").options, 64, 64), nominal(build("svdq", rank=5).options, 64, 64)
    assert fixed.k_bits - base.k_bits == pytest.approx(2 * (128 + 64) * 4 / (128 * 64) + 2 * 16 / (128 * 64))


@pytest.mark.model
def test_rd_on_the_default_model(default_capture):
    """The real default model (head_dim 64, blocks of 128): valid rd ranks, and the codec runs end to end."""
    cap = kvc.load(default_capture[0])
    for method in ("svdq", "eoptshrinkq"):
        comp = kvc.method(method, rank_rule="rd")
        detected = kvc.method(method)
        for layer in (0, 29):
            for tensor in ("k_pre", "v"):
                blocks = cap.tensor(layer, tensor).reshape(2, 3, 1, 128, 64)  # one block per sequence
                ranks = comp.select(comp.components(blocks), 128, 64).sum(-1)
                assert int(ranks.min()) >= 0 and int(ranks.max()) <= 64
                if method == "eoptshrinkq":  # a prefix of the detected components
                    assert bool((ranks <= detected.select(detected.components(blocks), 128, 64).sum(-1)).all())
        result = kvc.compress(cap, comp, layers=[0, 29], device="cpu")
        plain = kvc.compress(cap, "turboquant", bits=2, layers=[0, 29], device="cpu")
        assert 2.0 < result.bits_per_entry < 3.0
        assert result.summary["k"]["mse_rel"] < plain.summary["k"]["mse_rel"]
