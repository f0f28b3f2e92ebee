"""Random-matrix numerics for the spiked model X = S + Z, batched over leading dims.

Every function takes tensors of shape [..., n, d] (tokens x head_dim; leading dims are e.g.
layers/heads) and works in float64 by default. Conventions follow docs/methods.md#notation:
p = min(n, d), N = max(n, d), beta = p / N, eigenvalues lambda_i = y_i^2 of the p x p Gram
matrix in descending order. "p-side" / "N-side" refer to the shorter / longer dimension; the
`Shrinkage` result maps them back to left (token, n) and right (channel, d) sides.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Iterator, Literal, NamedTuple, Sequence

import torch
from torch import Tensor

from kvc.analysis.channels import median
from kvc.errors import KvcError

Loss = Literal["fro", "op", "nuc"]
RankRule = Literal["eoptshrinkq", "matlab"]
Imputation = Literal["eoptshrinkq", "matlab"]

ROW_BLOCK = 256  # rows per block in `residual_diagnostics` (the buffer stays in cache)
SMALL_LAPACK = 512  # matrices up to this size get one intra-op thread in batched CPU LAPACK calls
EDGE_STEP = 2.0 ** (2.0 / 3.0) - 1.0  # lambda_j ~ edge - C j^{2/3}, docs/methods.md#eoptshrinkq-rank-rule
MATLAB_EDGE_FACTOR = 1.1  # safety factor of optimal_shrinkage_color5.m (docs/methods.md#matlab-rank-rule)


# ----------------------------------------------------------------------------- decomposition


@contextmanager
def small_lapack(A: Tensor) -> Iterator[None]:
    """One intra-op thread around a batched CPU LAPACK call on small matrices A [..., m, m].

    torch loops over the batch and MKL opens an OpenMP region per matrix; on matrices this small
    threads gain nothing, and when other processes share the cores each region stalls (measured:
    `kvc analyze --block 128` on 2 busy cores, 158 s with 2 threads, 19 s with this).
    """
    serial = A.device.type == "cpu" and A.shape[-1] <= SMALL_LAPACK
    threads = torch.get_num_threads()
    if serial:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if serial:
            torch.set_num_threads(threads)


@dataclass(frozen=True)
class GramEig:
    """Thin SVD of X [..., n, d] from the eigendecomposition of its p x p Gram matrix.

    eigenvalues: [..., p] descending, lambda_i = y_i^2; vectors: [..., p, p] the matching
    eigenvectors (the p-side singular vectors); matrix: X as the Gram was formed from it.
    transposed: True when n < d, i.e. the p-side is the token (left) side.
    left [..., n, p] and right [..., d, p]: singular vectors in the original orientation, so
    X = left @ diag(y) @ right^T, computed on first use (``sides`` computes only the top r).
    Vectors of (numerically) zero singular values are zero.
    """

    eigenvalues: Tensor
    vectors: Tensor
    matrix: Tensor
    transposed: bool

    @property
    def singular_values(self) -> Tensor:
        return self.eigenvalues.sqrt()

    @property
    def nonzero(self) -> Tensor:
        """[..., p]: singular values above the numerical tolerance (the others have zero vectors)."""
        n, d = self.matrix.shape[-2:]
        return _above_tolerance(self.singular_values, n, d)

    def sides(self, r: int | None = None) -> tuple[Tensor, Tensor]:
        """(left [..., n, r], right [..., d, r]) of the top r singular values (all p when None)."""
        evecs = self.vectors[..., :r]
        y = self.singular_values[..., :r]
        inv_y = torch.where(self.nonzero[..., :r], 1.0 / y.clamp_min(torch.finfo(y.dtype).tiny), torch.zeros_like(y))
        A = self.matrix.to(evecs.dtype)
        other = (A.mT if self.transposed else A) @ evecs * inv_y[..., None, :]  # u = X v / y
        return (evecs, other) if self.transposed else (other, evecs)

    @cached_property
    def _both(self) -> tuple[Tensor, Tensor]:
        return self.sides()

    @property
    def left(self) -> Tensor:
        return self._both[0]

    @property
    def right(self) -> Tensor:
        return self._both[1]


def _above_tolerance(y: Tensor, n: int, d: int) -> Tensor:
    """y > y_1 max(n, d) eps: the numerically nonzero singular values [..., p]."""
    return y > y[..., :1] * max(n, d) * torch.finfo(y.dtype).eps


def _check_matrix(X: Tensor) -> None:
    if X.ndim < 2:
        raise KvcError(f"expected a tensor [..., n, d], got shape {tuple(X.shape)}")


def gram_eigh(X: Tensor, dtype: torch.dtype = torch.float64, gram_dtype: torch.dtype | None = None) -> GramEig:
    """Batched thin SVD via torch.linalg.eigh of the p x p Gram (cheap for head_dim <= 256).

    The Gram product is formed in ``gram_dtype`` (default ``dtype``) and decomposed in ``dtype``:
    float32 data can form it in float32 (4x faster on CPU than float64; its eigenvalues then carry
    a relative error of about 1e-7 lambda_1 / lambda_i, docs/methods.md#analyze-report).
    """
    _check_matrix(X)
    A = X.to(gram_dtype or dtype)
    n, d = A.shape[-2:]
    transposed = n < d
    gram = (A @ A.mT if transposed else A.mT @ A).to(dtype)
    with small_lapack(gram):
        evals, evecs = torch.linalg.eigh(gram)
    return GramEig(evals.flip(-1).clamp_min(0.0), evecs.flip(-1), A, transposed)


# ----------------------------------------------------------------------------- rank rules


class RankSelection(NamedTuple):
    """rank: [...] int64; edge: [...] bulk-edge estimate in eigenvalue units; k: skipped count."""

    rank: Tensor
    edge: Tensor
    k: int


def eoptshrinkq_k(dim: int) -> int:
    """Number of top eigenvalues skipped by the edge extrapolation: floor(dim^c)."""
    if dim < 3:
        raise KvcError(f"the eOptShrinkQ rank rule needs at least 3 eigenvalues, got {dim}")
    c = min(1.0 / 2.01, 1.0 / math.log(math.log(dim)))  # eOptShrinkQ Alg. 2 (docs/methods.md#eoptshrinkq-rank-rule)
    return math.floor(dim**c)


def _edge_from(lam: Tensor, k: int, factor: float) -> Tensor:
    p = lam.shape[-1]
    if 2 * k + 1 > p:
        raise KvcError(f"edge extrapolation needs 2k+1 = {2 * k + 1} eigenvalues, only {p} available")
    hi, lo = lam[..., k], lam[..., 2 * k]  # lambda_{k+1}, lambda_{2k+1} (1-based)
    return hi + factor * (hi - lo) / EDGE_STEP  # ScreeNOT-style edge imputation (docs/methods.md#eoptshrinkq-rank-rule)


def eoptshrinkq_rank(lam: Tensor) -> RankSelection:
    """eOptShrinkQ rank rule (scale-free BBP ratio test) on descending eigenvalues [..., p].

    Its readers state it with d = head_dim, which is p for n >= d; for n < d (transposed) it runs on
    p = n (docs/methods.md#eoptshrinkq-rank-rule).
    """
    p = lam.shape[-1]
    k = eoptshrinkq_k(p)
    edge = _edge_from(lam, k, 1.0)
    margin = p ** (-1.0 / 3.0)
    # r = #{i : lambda_i / edge - 1 > p^{-1/3}}, eOptShrinkQ Alg. 2; edge <= 0 -> r = 0
    above = (lam > (edge * (1.0 + margin))[..., None]) & (edge > 0)[..., None]
    return RankSelection(above.sum(-1), edge, k)


def matlab_k(p: int) -> int:
    """k0 = floor(p^{1/2.01}) top eigenvalues skipped by the MATLAB v5 rule (docs/methods.md#matlab-rank-rule)."""
    return math.floor(p ** (1.0 / 2.01))


def matlab_v5_rank(lam: Tensor) -> RankSelection:
    """eOptShrink MATLAB v5 rank rule (optimal_shrinkage_color5.m, docs/methods.md#matlab-rank-rule) on [..., p]."""
    k0 = matlab_k(lam.shape[-1])
    edge = _edge_from(lam, k0, MATLAB_EDGE_FACTOR)
    return RankSelection((lam > edge[..., None]).sum(-1), edge, k0)


def rank_rule_unfit(rule: RankRule, p: int) -> str | None:
    """Why a rank rule cannot run on p = min(n, d) eigenvalues, or None.

    Both rules read lambda_{k+1} and lambda_{2k+1} with k ~ sqrt(p); 2k+1 <= p holds from p = 3 on.
    """
    if rule not in ("eoptshrinkq", "matlab"):
        raise KvcError(f"unknown rank rule {rule!r} (use 'eoptshrinkq' or 'matlab')")
    if p < 3:
        return f"min(n, d) = {p}: the {rule} rank rule needs at least 3 singular values"
    return None


# ----------------------------------------------------------------------------- noise spectrum


class NoiseSpectrum(NamedTuple):
    """Estimated noise eigenvalues [..., L] with 0/1 weights [..., L] (the mean uses weight 1 entries)."""

    values: Tensor
    weights: Tensor


def _take(x: Tensor, index: Tensor) -> Tensor:
    """x[..., index] with a per-batch index [...], clamped to the last entry."""
    index = index.clamp(max=x.shape[-1] - 1)
    return x.gather(-1, index[..., None]).squeeze(-1)


def impute_noise_spectrum(lam: Tensor, rank: Tensor, method: Imputation = "eoptshrinkq") -> NoiseSpectrum:
    """Noise spectrum with the outliers removed and the eigenvalues they pushed up imputed.

    'eoptshrinkq': k imputed values then lambda_{r+k+1..p} (length p - r, j/k indexing).
    'matlab': createPseudoNoise(s, 2r, 'i') on singular values, all p entries.
    Indices past p are clamped to lambda_p. Formulas: docs/methods.md#noise-imputation.
    """
    p = lam.shape[-1]
    idx = torch.arange(p, device=lam.device)
    if method == "eoptshrinkq":
        k = eoptshrinkq_k(p)
        a = _take(lam, rank + k)  # lambda_{r+k+1}
        b = _take(lam, rank + 2 * k)  # lambda_{r+2k+1}
        j = torch.arange(1, k + 1, device=lam.device, dtype=lam.dtype) / k
        # mu_j = a + (1 - (j/k)^{2/3}) (a - b) / (2^{2/3} - 1), eOptShrinkQ Alg. 3
        imputed = a[..., None] + (1.0 - j ** (2.0 / 3.0)) * ((a - b) / EDGE_STEP)[..., None]
        tail = (idx >= (rank + k)[..., None]).to(lam.dtype)
        values = torch.cat([imputed, lam], dim=-1)
        weights = torch.cat([torch.ones_like(imputed), tail], dim=-1)
        return NoiseSpectrum(values, weights)
    if method == "matlab":
        s = lam.sqrt()
        m = 2 * rank
        top, bottom = _take(s, m), _take(s, 2 * m)  # s_{2r+1}, s_{4r+1}
        frac = idx.to(lam.dtype) / m.clamp_min(1)[..., None].to(lam.dtype)  # (l - 1) / (2r)
        # fZ_l = s_{2r+1} + (1 - ((l-1)/(2r))^{2/3}) / (2^{2/3} - 1) * delta, createPseudoNoise.m
        fz = top[..., None] + (1.0 - frac ** (2.0 / 3.0)) / EDGE_STEP * (top - bottom)[..., None]
        values = torch.where(idx < m[..., None], fz, s) ** 2
        return NoiseSpectrum(values, torch.ones_like(values))
    raise KvcError(f"unknown imputation {method!r} (use 'eoptshrinkq' or 'matlab')")


def imputation_starved(rank: Tensor, p: int, method: Imputation = "eoptshrinkq") -> Tensor:
    """True [...] where the imputation needs an eigenvalue past lambda_p (docs/methods.md#noise-imputation)."""
    if method == "eoptshrinkq":
        return rank + 2 * eoptshrinkq_k(p) + 1 > p  # needs lambda_{r+2k+1}
    return 4 * rank + 1 > p  # createPseudoNoise needs s_{4r+1}


# ----------------------------------------------------------------------------- D-transform


class DTransformEstimate(NamedTuple):
    """Per queried eigenvalue [..., r]: D-transform T, signal strength d_hat, cos^2 a1 (p-side), a2 (N-side).

    usable is False where the guard fails (T <= 0, non-finite, or a1, a2 outside (0, 1]); there
    d_hat, a1, a2 are set to 0.
    """

    T: Tensor
    d_hat: Tensor
    a1: Tensor
    a2: Tensor
    usable: Tensor


def d_transform(lam: Tensor, noise: NoiseSpectrum, beta: float) -> DTransformEstimate:
    """Empirical D-transform estimator at eigenvalues lam [..., r] given a noise spectrum [..., L].

    Formulas and guard: docs/methods.md#d-transform.
    """
    w = noise.weights[..., None, :]
    count = w.sum(-1)
    inv = 1.0 / (noise.values[..., None, :] - lam[..., :, None])  # [..., r, L]
    inv = torch.where(w > 0, inv, torch.zeros_like(inv))  # dropped entries may equal lam
    m1 = (w * inv).sum(-1) / count  # Stieltjes transform of the p x p noise Gram
    dm1 = (w * inv * inv).sum(-1) / count
    m2 = -(1.0 - beta) / lam + beta * m1  # N x N Gram: N - p structural zeros (MATLAB sign)
    dm2 = (1.0 - beta) / lam**2 + beta * dm1
    T = lam * m1 * m2  # T(lambda) = D(sqrt(lambda)), Nadakuditi 2014 D-transform
    dT = m1 * m2 + lam * dm1 * m2 + lam * m1 * dm2
    d_hat = 1.0 / T.clamp_min(torch.finfo(T.dtype).tiny).sqrt()  # theta_hat = 1/sqrt(D), BGN 2012
    a1 = m1 / (d_hat**2 * dT)  # |<u, xi>|^2 estimate, Benaych-Georges & Nadakuditi 2012
    a2 = m2 / (d_hat**2 * dT)  # |<v, zeta>|^2 estimate
    usable = torch.isfinite(T) & torch.isfinite(dT) & (T > 0)
    usable &= (a1 > 0) & (a1 <= 1) & (a2 > 0) & (a2 <= 1)  # guard (kvc)
    zero = torch.zeros_like(T)
    return DTransformEstimate(
        T, torch.where(usable, d_hat, zero), torch.where(usable, a1, zero), torch.where(usable, a2, zero), usable
    )


def shrink_singular_values(d_hat: Tensor, a1: Tensor, a2: Tensor, loss: Loss = "fro") -> Tensor:
    """Optimal shrunk singular value per component for the given loss (docs/methods.md#optimal-shrinkage)."""
    if loss == "fro":
        return d_hat * (a1 * a2).sqrt()  # phi = d sqrt(a1 a2), Frobenius-optimal
    if loss == "op":
        return d_hat.clone()  # operator norm: phi = d
    if loss == "nuc":
        # phi = max(0, d (sqrt(a1 a2) - sqrt((1-a1)(1-a2)))), nuclear norm
        return (d_hat * ((a1 * a2).sqrt() - ((1 - a1) * (1 - a2)).clamp_min(0).sqrt())).clamp_min(0)
    raise KvcError(f"unknown loss {loss!r} (use 'fro', 'op' or 'nuc')")


# ----------------------------------------------------------------------------- eOptShrink


@dataclass(frozen=True)
class Shrinkage:
    """Result of `eoptshrink` on X [..., n, d]; r_max = largest selected rank in the batch.

    rank [...]: selected rank; edge [...]: bulk-edge estimate (eigenvalue units; sqrt for
    singular values); k: eigenvalues skipped by the rank rule; beta = p/N;
    eigenvalues [..., p]; mask [..., r_max]: component index < rank; usable [..., r_max]: mask and
    the D-transform guard passed; d_hat, a1 (p-side cos^2), a2 (N-side cos^2), phi (shrunk
    singular values) [..., r_max], zero where not usable; svd: the decomposition it came from;
    left [..., n, r_max], right [..., d, r_max]: singular vectors in the original orientation
    (computed on first use); starved [...]: the noise imputation ran out of eigenvalues (too few
    left beyond the rank; estimates unreliable).
    """

    rank: Tensor
    edge: Tensor
    k: int
    beta: float
    eigenvalues: Tensor
    mask: Tensor
    usable: Tensor
    d_hat: Tensor
    a1: Tensor
    a2: Tensor
    phi: Tensor
    svd: GramEig
    starved: Tensor

    @property
    def singular_values(self) -> Tensor:
        return self.eigenvalues.sqrt()

    @property
    def transposed(self) -> bool:
        return self.svd.transposed

    @cached_property
    def _sides(self) -> tuple[Tensor, Tensor]:
        return self.svd.sides(self.mask.shape[-1])

    @property
    def left(self) -> Tensor:
        return self._sides[0]

    @property
    def right(self) -> Tensor:
        return self._sides[1]

    @property
    def cos2_left(self) -> Tensor:
        """Estimated cos^2 between the token-side (left) singular vector and the true one."""
        return self.a1 if self.transposed else self.a2

    @property
    def cos2_right(self) -> Tensor:
        """Estimated cos^2 between the channel-side (right) singular vector and the true one."""
        return self.a2 if self.transposed else self.a1

    def _compose(self, weights: Tensor) -> Tensor:
        return (self.left * weights[..., None, :]) @ self.right.mT

    def lowrank(self) -> Tensor:
        """Denoised shared part U diag(phi) V^T [..., n, d] (docs/methods.md#optimal-shrinkage)."""
        return self._compose(self.phi)

    def truncated_svd(self) -> Tensor:
        """Rank-matched unshrunk control: same rank, raw singular values (docs/methods.md#svdq)."""
        y = self.singular_values[..., : self.mask.shape[-1]]
        return self._compose(torch.where(self.mask, y, torch.zeros_like(y)))

    def residual(self, X: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """X - lowrank in ``dtype`` (default: the compute dtype; docs/methods.md#residual-diagnostics).

        Through the p-side vectors E only: lowrank = X E diag(phi/y) E^T (n >= d) or
        E diag(phi/y) E^T X (n < d), so no n x p singular vectors are formed.
        """
        P = self.complement(dtype)
        X = X.to(P.dtype)
        return P @ X if self.transposed else X @ P

    def complement(self, dtype: torch.dtype | None = None) -> Tensor:
        """I - E diag(phi/y) E^T [..., p, p] (E: the p-side vectors) in ``dtype``: the residual is
        X times it (n >= d) or it times X (n < d)."""
        r = self.mask.shape[-1]
        y = self.singular_values[..., :r]
        w = torch.where(y > 0, self.phi / y.clamp_min(torch.finfo(y.dtype).tiny), torch.zeros_like(y))
        E = self.svd.vectors[..., :r]
        eye = torch.eye(E.shape[-2], dtype=E.dtype, device=E.device)
        return (eye - (E * w[..., None, :]) @ E.mT).to(dtype or self.phi.dtype)


def eoptshrink(
    X: Tensor,
    rule: RankRule = "eoptshrinkq",
    loss: Loss = "fro",
    imputation: Imputation = "eoptshrinkq",
    dtype: torch.dtype = torch.float64,
    gram_dtype: torch.dtype | None = None,
) -> Shrinkage:
    """Rank selection + noise-spectrum imputation + optimal shrinkage of X [..., n, d].

    eOptShrink (Su & Wu 2025) with eOptShrinkQ's rank rule by default: docs/methods.md#random-matrix-theory.
    ``dtype`` and ``gram_dtype``: as in `gram_eigh`.
    """
    svd = gram_eigh(X, dtype, gram_dtype)
    lam = svd.eigenvalues
    n, d = X.shape[-2:]
    beta = min(n, d) / max(n, d)
    if rule == "eoptshrinkq":
        sel = eoptshrinkq_rank(lam)
    elif rule == "matlab":
        sel = matlab_v5_rank(lam)
    else:
        raise KvcError(f"unknown rank rule {rule!r} (use 'eoptshrinkq' or 'matlab')")
    r_max = int(sel.rank.max()) if sel.rank.numel() else 0
    mask = torch.arange(r_max, device=lam.device) < sel.rank[..., None]
    est = d_transform(lam[..., :r_max], impute_noise_spectrum(lam, sel.rank, imputation), beta)
    usable = est.usable & mask
    zero = torch.zeros_like(est.T)
    d_hat, a1, a2 = (torch.where(usable, t, zero) for t in (est.d_hat, est.a1, est.a2))
    phi = shrink_singular_values(d_hat, a1, a2, loss)
    return Shrinkage(
        rank=sel.rank,
        edge=sel.edge,
        k=sel.k,
        beta=beta,
        eigenvalues=lam,
        mask=mask,
        usable=usable,
        d_hat=d_hat,
        a1=a1,
        a2=a2,
        phi=phi,
        svd=svd,
        starved=imputation_starved(sel.rank, lam.shape[-1], imputation),
    )


# ----------------------------------------------------------------------------- classical references


MP_CELLS = 1 << 17  # quadrature cells of `mp_median` (relative error below 1e-9)


@lru_cache(maxsize=64)
def mp_median(beta: float) -> float:
    """Median of the Marchenko-Pastur law (ratio beta, unit variance), numerically (Gavish-Donoho 2014).

    With x = c + h cos(theta) (c, h: centre and half-width of the support [a, b]) the CDF is
    int_theta^pi h^2 sin^2 / (2 pi beta x) dtheta', a smooth integrand (no square-root edges): a
    midpoint rule on MP_CELLS cells, normalized by its own total, and linear interpolation in the
    cell where it crosses 1/2.
    """
    if not 0 < beta <= 1:
        raise KvcError(f"beta must lie in (0, 1], got {beta}")
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    c, h = (lo + hi) / 2, (hi - lo) / 2
    step = math.pi / MP_CELLS
    theta = (torch.arange(MP_CELLS, dtype=torch.float64) + 0.5) * step
    # MP density sqrt((b-x)(x-a)) / (2 pi beta x) dx, Marchenko-Pastur 1967, with x = c + h cos(theta)
    mass = (h * theta.sin()) ** 2 / (2 * math.pi * beta * (c + h * theta.cos())) * step
    from_a = mass.flip(0).cumsum(0)  # CDF at the low-x edge of each cell, cells from x = a up
    half = 0.5 * float(from_a[-1])
    j = int(torch.searchsorted(from_a, torch.tensor([half], dtype=torch.float64)))
    below = float(from_a[j - 1]) if j else 0.0
    cell = MP_CELLS - 1 - j  # theta cell [cell, cell + 1] * step, where the CDF reaches 1/2
    theta_half = (cell + 1 - (half - below) / float(mass[cell])) * step
    return c + h * math.cos(theta_half)


def gd_sigma(singular_values: Tensor, n: int, d: int) -> Tensor:
    """Noise level from the median singular value [..., p] -> [...]: y_med / sqrt(N mu_beta).

    Gavish & Donoho 2014, sec. III-E; docs/methods.md#gavish-donoho.
    """
    beta = min(n, d) / max(n, d)
    y_med = median(singular_values.to(torch.float64))
    return y_med / math.sqrt(max(n, d) * mp_median(beta))  # Gavish-Donoho 2014 sec. III-E


def gd_eta(y: Tensor, beta: float, loss: Loss = "fro") -> Tensor:
    """Gavish-Donoho optimal shrinker for normalized white noise (sigma = 1, variance 1/N entries)."""
    y = torch.as_tensor(y, dtype=torch.float64)
    above = y >= 1 + math.sqrt(beta)
    disc = ((y**2 - beta - 1) ** 2 - 4 * beta).clamp_min(0)
    if loss == "fro":
        eta = disc.sqrt() / y  # eta_fro = sqrt((y^2-beta-1)^2 - 4 beta)/y, Gavish-Donoho 2017 eq. (7)
    else:
        x = (0.5 * ((y**2 - beta - 1) + disc.sqrt())).sqrt()  # de-biased x(y), Gavish-Donoho 2017
        if loss == "op":
            eta = x
        elif loss == "nuc":
            # eta_nuc = max(0, (x^4 - sqrt(beta) x y - beta)/(x^2 y)), Gavish-Donoho 2017
            eta = ((x**4 - math.sqrt(beta) * x * y - beta) / (x**2 * y)).clamp_min(0)
        else:
            raise KvcError(f"unknown loss {loss!r} (use 'fro', 'op' or 'nuc')")
    return torch.where(above, eta, torch.zeros_like(eta))


def gd_shrink(singular_values: Tensor, n: int, d: int, sigma: Tensor | None = None, loss: Loss = "fro") -> Tensor:
    """Gavish-Donoho shrinkage of raw singular values [..., p] of an n x d matrix with entry std sigma.

    sigma: [...] or scalar; None estimates it with `gd_sigma` (MP median).
    """
    y = singular_values.to(torch.float64)
    if sigma is None:
        sigma = gd_sigma(y, n, d)
    scale = torch.as_tensor(sigma, dtype=torch.float64, device=y.device)[..., None] * math.sqrt(max(n, d))
    beta = min(n, d) / max(n, d)
    return scale * gd_eta(y / scale, beta, loss)  # eta_sigma(y) = sigma sqrt(N) eta(y / (sigma sqrt(N)))


def optimal_hard_threshold(beta: float) -> float:
    """lambda*(beta): optimal hard threshold for known sigma, in units sqrt(N) sigma (Gavish-Donoho 2014 eq. (11))."""
    return math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta**2 + 14 * beta + 1)))


def omega(beta: float) -> float:
    """omega(beta) = lambda*(beta) / sqrt(mu_beta): hard threshold as a multiple of the median singular value."""
    return optimal_hard_threshold(beta) / math.sqrt(mp_median(beta))  # Gavish-Donoho 2014 sec. III-E


class SpikeLimits(NamedTuple):
    """Large-matrix limits for a spike theta in normalized white noise: y(theta), c^2 (p-side), c~^2 (N-side)."""

    y: Tensor
    cos2_p: Tensor
    cos2_n: Tensor


def white_noise_spike(theta: Tensor | float, beta: float) -> SpikeLimits:
    """Population outlier location and overlaps (docs/methods.md#spiked-model), zero below the BBP threshold."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    above = theta > beta**0.25  # Baik, Ben Arous, Peche 2005; docs/methods.md#bbp-threshold
    y = ((theta + 1 / theta) * (theta + beta / theta)).sqrt()  # Benaych-Georges & Nadakuditi 2012 sec. 3.1
    c2 = (theta**4 - beta) / (theta**4 + beta * theta**2)  # p-side cos^2, BGN 2012 / Gavish-Donoho 2017
    c2_tilde = (theta**4 - beta) / (theta**4 + theta**2)  # N-side cos^2
    zero = torch.zeros_like(theta)
    edge = torch.full_like(theta, 1 + math.sqrt(beta))
    return SpikeLimits(torch.where(above, y, edge), torch.where(above, c2, zero), torch.where(above, c2_tilde, zero))


def bbp_threshold(n: int, d: int, sigma: float = 1.0) -> float:
    """BBP detection threshold for theta with un-normalized noise (entry std sigma): sigma (n d)^{1/4}.

    Baik, Ben Arous, Peche 2005; docs/methods.md#bbp-threshold.
    """
    return sigma * (n * d) ** 0.25  # beta^{1/4} sigma sqrt(N) = sigma (p N)^{1/4}


def mp_bulk_edge(n: int, d: int, sigma: float = 1.0) -> float:
    """Largest noise singular value, un-normalized noise: sigma (sqrt n + sqrt d) (docs/methods.md#marchenko-pastur)."""
    return sigma * (math.sqrt(n) + math.sqrt(d))


# ----------------------------------------------------------------------------- energy / bits


def energy_share(X: Tensor, lowrank: Tensor) -> Tensor:
    """rho = ||lowrank||_F^2 / ||X||_F^2 per matrix [...] (docs/methods.md#energy-share)."""
    X = X.to(torch.float64)
    lowrank = lowrank.to(torch.float64)
    return lowrank.square().sum((-2, -1)) / X.square().sum((-2, -1))


def energy_rank(singular_values: Tensor, shares: Sequence[float]) -> Tensor:
    """r(e) [..., len(shares)]: the fewest leading singular values whose squares hold at least the
    share e of sum_i s_i^2, for each e in ``shares`` (docs/methods.md#latent-rank)."""
    energy = singular_values.to(torch.float64).square()
    cum = energy.cumsum(-1) / energy.sum(-1, keepdim=True)
    e = torch.tensor(list(shares), dtype=torch.float64, device=cum.device)
    below = cum[..., None, :] < e[:, None] * (1 - 1e-12)  # [..., shares, p], relative slack for rounding
    return (below.sum(-1) + 1).clamp_max(cum.shape[-1])


def predicted_bit_saving(rho: Tensor | float, rank: Tensor | int, n: int, d: int, factor_bits: int = 4) -> Tensor:
    """Predicted bits/entry saved vs plain TurboQuant: 1/2 log2(1/(1-rho)) - r (n+d) b_f / (n d).

    kvc derivation, factor error ignored: docs/methods.md#energy-share.
    """
    rho = torch.as_tensor(rho, dtype=torch.float64)
    rank = torch.as_tensor(rank, dtype=torch.float64, device=rho.device)
    return 0.5 * torch.log2(1.0 / (1.0 - rho)) - rank * (n + d) * factor_bits / (n * d)


def rate_optimal_prefix(energy: Tensor, gains: Tensor, costs: Tensor, entries: int, slope: float) -> Tensor:
    """Number m [...] of leading candidate components that minimizes the total bits at equal error,

        J(m) = (entries / slope) log2(energy - sum_{i<=m} gains_i) + sum_{i<=m} costs_i,   m = 0..M,

    from the energy [...] the residual coder sees without components, the energy each candidate
    removes (gains [..., M]) and its bits (costs [..., M]); the smallest m on ties. ``slope``: log2
    of the residual coder's error per bit per entry. Derivation: docs/methods.md#rate-optimal-rank.
    """
    zero = energy.new_zeros(*energy.shape, 1)
    left = energy[..., None] - torch.cat([zero, gains.cumsum(-1)], -1)  # residual energy E(m), [..., M + 1]
    bits = torch.cat([zero, costs.to(energy.dtype).cumsum(-1)], -1)
    tiny = torch.finfo(energy.dtype).tiny
    J = entries / slope * torch.log2(left.clamp_min(tiny)) + bits  # total bits at equal error, up to a constant
    return J.argmin(-1)  # torch.argmin returns the first minimum


# ----------------------------------------------------------------------------- residual diagnostics


def haar_rotation(d: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Haar-distributed d x d orthogonal matrix: QR of a Gaussian with the sign fix (Mezzadri 2007)."""
    device = generator.device if generator is not None else None
    G = torch.randn(d, d, generator=generator, dtype=dtype, device=device)
    with small_lapack(G):
        Q, R = torch.linalg.qr(G)
    signs = torch.sign(torch.diagonal(R))
    return Q * torch.where(signs == 0, torch.ones_like(signs), signs)


class ThinShell(NamedTuple):
    """norm_cv: CV of row norms [...]; energy_ratio: Var||r||^2 / (E||r||^2)^2 [...] (2/d for Gaussian rows)."""

    norm_cv: Tensor
    energy_ratio: Tensor


def thin_shell(R: Tensor) -> ThinShell:
    """Thin-shell statistics of the rows of R [..., n, d] (docs/methods.md#residual-diagnostics).

    Row norms in R's dtype, their statistics in float64.
    """
    return _thin_shell(_row_norms(R))


def _row_norms(R: Tensor) -> Tensor:
    """||r_t|| [..., n] in float64, computed in R's dtype."""
    return torch.linalg.vector_norm(R, dim=-1).to(torch.float64)


def _thin_shell(norms: Tensor) -> ThinShell:
    sq = norms.square()
    # Var(||r||^2) / (E||r||^2)^2 -> 2 tr(A^2) / tr(A)^2 for r = A^{1/2} g
    return ThinShell(norms.std(-1) / norms.mean(-1), sq.var(-1) / sq.mean(-1) ** 2)


class Delocalization(NamedTuple):
    """Max |coordinate| of unit rows relative to reference sqrt(2 ln d / d), per matrix [...].

    ratio_*: mean over rows of the row maximum / reference; worst_*: max over rows / reference.
    *_raw in the stored channel basis (outlier channels show here); *_rotated after one shared Haar
    rotation (what the TurboQuant codebook sees; near 1 for any fixed set of rows). Definition:
    docs/methods.md#residual-diagnostics.
    """

    reference: float
    ratio_raw: Tensor
    worst_raw: Tensor
    ratio_rotated: Tensor
    worst_rotated: Tensor


def delocalization(R: Tensor, generator: torch.Generator | None = None) -> Delocalization:
    """Coordinate delocalization of the rows of R [..., n, d], raw and after a seeded Haar rotation.

    max_j |r_j| / ||r|| per row, the rotation and the maxima in R's dtype (the rotation as one
    matrix product over all rows), the ratios in float64.
    """
    d = R.shape[-1]
    Q = haar_rotation(d, generator).to(R.device, R.dtype)
    return _delocalization(_row_norms(R), _max_abs(R), _max_abs((R.reshape(-1, d) @ Q.mT).reshape(R.shape)), d)


def residual_diagnostics(shrink: Shrinkage, X: Tensor, generator: torch.Generator | None = None
                         ) -> tuple[ThinShell, Delocalization]:
    """`thin_shell` and `delocalization` of the residual X - lowrank, in X's dtype.

    For n >= d, one product per block of ``ROW_BLOCK`` rows gives both the residual rows and
    their rotation, X [C | C Q^T] with C = `Shrinkage.complement` and Q the seeded Haar rotation,
    into one reused buffer: the n x d residual is never held whole (memory and cache traffic).
    """
    n, d = X.shape[-2:]
    Q = haar_rotation(d, generator).to(X.device, X.dtype)
    C = shrink.complement(X.dtype)
    if shrink.transposed:
        R = C @ X
        rotated = R @ Q.mT
        return _thin_shell(_row_norms(R)), _delocalization(_row_norms(R), _max_abs(R), _max_abs(rotated), d)
    W = torch.cat([C, C @ Q.mT], -1)  # [..., d, 2d]
    norms = X.new_empty(X.shape[:-1])
    maxima = X.new_empty(*X.shape[:-1], 2)  # max |r_j|, max |(r Q^T)_j| per row
    buf = X.new_empty(*X.shape[:-2], min(n, ROW_BLOCK), 2 * d)
    for start in range(0, n, ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        x = X[..., rows, :]
        both = torch.matmul(x, W, out=buf[..., : x.shape[-2], :])
        torch.linalg.vector_norm(both[..., :d], dim=-1, out=norms[..., rows])
        halves = both.unflatten(-1, (2, d))
        torch.maximum(halves.amax(-1), halves.amin(-1).neg_(), out=maxima[..., rows, :])
    norms = norms.to(torch.float64)
    return _thin_shell(norms), _delocalization(norms, maxima[..., 0], maxima[..., 1], d)


def _delocalization(norms: Tensor, raw_max: Tensor, rot_max: Tensor, d: int) -> Delocalization:
    """From the row norms, raw and rotated row maxima [..., n]."""
    norms = norms.clamp_min(torch.finfo(norms.dtype).tiny)
    reference = math.sqrt(2 * math.log(d) / d)  # ||Pi r||_inf <~ sqrt(2 ln d / d) ||r||
    raw_max = raw_max.to(torch.float64) / norms
    rot_max = rot_max.to(torch.float64) / norms
    return Delocalization(
        reference,
        raw_max.mean(-1) / reference,
        raw_max.amax(-1) / reference,
        rot_max.mean(-1) / reference,
        rot_max.amax(-1) / reference,
    )


def _max_abs(x: Tensor) -> Tensor:
    """max |x| over the last dim, without a temporary (10x faster than vector_norm(ord=inf) on CPU)."""
    return torch.maximum(x.amax(-1), x.amin(-1).neg_())


class Isotropy(NamedTuple):
    """top_over_mean [...]: top / mean eigenvalue of R^T R / n; white_reference: (1 + sqrt(d/n))^2 for white rows."""

    top_over_mean: Tensor
    white_reference: float


def isotropy(R: Tensor) -> Isotropy:
    """Anisotropy of the (uncentered, as quantized) residual second-moment matrix R^T R / n.

    Definition: docs/methods.md#residual-diagnostics.
    """
    R = R.to(torch.float64)
    n, d = R.shape[-2:]
    gram = R.mT @ R if n >= d else R @ R.mT  # same nonzero spectrum, p x p
    with small_lapack(gram):
        return spectrum_isotropy(torch.linalg.eigvalsh(gram), n, d)


def spectrum_isotropy(eigenvalues: Tensor, n: int, d: int) -> Isotropy:
    """`isotropy` from the nonzero eigenvalues [..., p] of R^T R (any order)."""
    mean = eigenvalues.sum(-1) / d  # trace / d
    return Isotropy(eigenvalues.amax(-1) / mean, (1 + math.sqrt(d / n)) ** 2)  # MP edge of white rows over their mean
