"""Lloyd-Max scalar codebooks: exact sphere-coordinate (Beta) marginal, Gaussian limit, data-fitted.

Every codebook is a sorted float64 tensor of ``2**bits`` centroids. Nearest-centroid assignment is
:func:`nearest_codes` (ties go to the lower centroid).
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import special, stats

from kvc.errors import KvcError

_CACHE_VERSION = 1
_MAX_ITER = 500


def codebook_cache_dir() -> Path:
    """``$KVC_CACHE_DIR/codebooks`` if KVC_CACHE_DIR is set, else ``~/.cache/kvc/codebooks``."""
    root = os.environ.get("KVC_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "kvc") / "codebooks"


def _check(d: int, bits: int) -> None:
    if isinstance(d, bool) or not isinstance(d, int) or d < 2:
        raise KvcError(f"codebook dimension must be an integer >= 2, got {d!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise KvcError(f"codebook bit width must be an integer in 1..8, got {bits!r}")


def _beta_law(d: int) -> tuple[Callable, Callable, Callable]:
    """Density, survival P(X > x) and partial moment E[X 1{X > x}] of one coordinate of a uniform point on S^{d-1}."""
    # TurboQuant Lemma 1 (arXiv:2504.19874): f(x) = G(d/2)/(sqrt(pi) G((d-1)/2)) (1-x^2)^((d-3)/2); (1+x)/2 ~ Beta(a, a)
    a = (d - 1) / 2
    log_c = special.gammaln(d / 2) - special.gammaln(a) - 0.5 * math.log(math.pi)

    def log1m_sq(x: np.ndarray) -> np.ndarray:  # log(1 - x^2), accurate for small x
        with np.errstate(divide="ignore"):
            return np.log1p(-np.clip(x * x, 0.0, 1.0))

    def pdf(x: np.ndarray) -> np.ndarray:
        return np.exp(log_c + (a - 1) * log1m_sq(x))

    def sf(x: np.ndarray) -> np.ndarray:
        return special.betainc(a, a, np.clip((1 - x) / 2, 0.0, 1.0))

    def pm(x: np.ndarray) -> np.ndarray:
        # int_x^1 t f(t) dt = C (1-x^2)^a / (2a)  (antiderivative of t (1-t^2)^(a-1))
        return np.exp(log_c - math.log(2 * a) + a * log1m_sq(x))

    return pdf, sf, pm


def _lloyd_symmetric(pdf, sf, pm, init: np.ndarray, upper: float, tol: float) -> np.ndarray:
    """Lloyd-Max fixed point for a symmetric density, solved on the positive half (0 is a boundary).

    Newton's method on c = g(c), g = Lloyd map (cells bounded by midpoints -> conditional means);
    the Jacobian of g is tridiagonal: d E[X | t_(i-1) < X < t_i] / d t_i = f(t_i) (t_i - g_i) / P_i.
    """
    # Lloyd (1982) / Max (1960): optimal centroids are conditional means, boundaries are midpoints

    def lloyd_map(c: np.ndarray):
        t = np.concatenate([[0.0], (c[:-1] + c[1:]) / 2, [upper]])
        p = sf(t[:-1]) - sf(t[1:])
        return (pm(t[:-1]) - pm(t[1:])) / p, t, p

    c = np.sort(init)
    for _ in range(_MAX_ITER):
        g, t, p = lloyd_map(c)
        res = g - c
        err = np.max(np.abs(res))
        if not np.isfinite(err):
            raise KvcError("Lloyd-Max iteration produced an empty cell (dimension/bit width too extreme)")
        if err < tol:
            return np.concatenate([-g[::-1], g])
        ft = pdf(t[1:-1])
        up = 0.5 * ft * (t[1:-1] - g[:-1]) / p[:-1]  # d g_i / d c_(i+1)
        lo = 0.5 * ft * (g[1:] - t[1:-1]) / p[1:]  # d g_(i+1) / d c_i
        jac = np.diag(np.concatenate([up, [0.0]]) + np.concatenate([[0.0], lo]))
        jac += np.diag(up, 1) + np.diag(lo, -1)
        step = np.linalg.solve(np.eye(len(c)) - jac, res)
        lam = 1.0
        while lam > 1e-6:  # damped Newton; the plain Lloyd step (lam -> Lloyd) is the safe fallback
            cand = c + lam * step
            if np.all(np.diff(cand) > 0) and cand[0] > 0 and cand[-1] < upper:
                gc = lloyd_map(cand)[0]
                if np.max(np.abs(gc - cand)) < err:
                    break
            lam /= 2
        else:
            cand = g
        c = cand
    raise KvcError("Lloyd-Max iteration did not converge")


def _solve_beta(d: int, bits: int) -> np.ndarray:
    m = 1 << (bits - 1)
    # Panter-Dite point density ~ f^(1/3): a sphere marginal of dimension (d+6)/3, used as initial guess
    a0 = ((d + 6) / 3 - 1) / 2
    init = 2 * special.betaincinv(a0, a0, 0.5 + (np.arange(m) + 0.5) / (2 * m)) - 1
    pdf, sf, pm = _beta_law(d)
    return _lloyd_symmetric(pdf, sf, pm, init, 1.0, 1e-10 / math.sqrt(d))


def _load_or_solve_beta(d: int, bits: int) -> np.ndarray:
    path = codebook_cache_dir() / f"beta_d{d}_b{bits}_v{_CACHE_VERSION}.npy"
    try:
        cb = np.load(path)
        if cb.shape == (1 << bits,) and np.all(np.isfinite(cb)) and np.all(np.diff(cb) > 0):
            return cb
    except (OSError, ValueError):
        pass
    cb = _solve_beta(d, bits)
    try:  # atomic write: temp file in the same directory, then rename
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as fh:
            np.save(fh, cb)
        os.replace(fh.name, path)
    except OSError:
        pass  # an unwritable cache only costs a recomputation
    return cb


@functools.lru_cache(maxsize=None)
def _beta_cached(d: int, bits: int) -> tuple[float, ...]:
    return tuple(_load_or_solve_beta(d, bits).tolist())


def beta_codebook(d: int, bits: int) -> torch.Tensor:
    """Lloyd-Max codebook for one coordinate of a uniform point on S^{d-1} (exact Beta marginal)."""
    _check(d, bits)
    return torch.tensor(_beta_cached(d, bits), dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _gauss_std(bits: int) -> tuple[float, ...]:
    m = 1 << (bits - 1)
    init = stats.norm.ppf(0.5 + (np.arange(m) + 0.5) / (2 * m), scale=math.sqrt(3))  # Panter-Dite init
    # N(0,1): P(X > x) = Phi(-x), E[X 1{X > x}] = phi(x)
    return tuple(_lloyd_symmetric(stats.norm.pdf, stats.norm.sf, stats.norm.pdf, init, np.inf, 1e-10).tolist())


def gaussian_codebook(d: int, bits: int) -> torch.Tensor:
    """Lloyd-Max codebook for N(0, 1/d), the d -> infinity limit of the Beta marginal."""
    _check(d, bits)
    # TurboQuant Sec. 3.1 (arXiv:2504.19874): f_X -> N(0, 1/d) for large d
    return torch.tensor(_gauss_std(bits), dtype=torch.float64) / math.sqrt(d)


def distortion(codebook: torch.Tensor, d: int) -> float:
    """d * C(f_X, b): expected squared error of ``codebook`` per unit vector under the Beta(d) marginal."""
    # TurboQuant Thm. 1 (arXiv:2504.19874): D_mse = d * sum_i int_cell (x - c_i)^2 f_X(x) dx
    c = np.sort(codebook.detach().cpu().double().numpy())
    t = np.concatenate([[-1.0], np.clip((c[:-1] + c[1:]) / 2, -1.0, 1.0), [1.0]])
    _, sf, pm = _beta_law(d)
    p = sf(t[:-1]) - sf(t[1:])
    m1 = pm(t[:-1]) - pm(t[1:])
    # sum_i int (x^2 - 2 c_i x + c_i^2) f = E[X^2] - sum_i (2 c_i M_i - c_i^2 P_i), with E[X^2] = 1/d
    return float(1.0 - d * np.sum(2 * c * m1 - c * c * p))


def fit_codebook(samples: torch.Tensor, bits: int, weights: torch.Tensor | None = None,
                 max_iter: int = 300) -> torch.Tensor:
    """Data-fitted (optionally weighted) 1-D Lloyd-Max / k-means codebook of ``2**bits`` centroids.

    Deterministic: initialised at the weighted quantiles (i + 1/2) / 2^b; iterated until the cell
    assignment is stable. Empty cells keep their centroid.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise KvcError(f"codebook bit width must be an integer in 1..8, got {bits!r}")
    x = samples.detach().reshape(-1).double().cpu()
    w = torch.ones_like(x) if weights is None else weights.detach().reshape(-1).double().cpu()
    if x.numel() == 0 or w.shape != x.shape or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise KvcError("fit_codebook needs non-empty samples and matching non-negative weights with a positive sum")
    if not bool(torch.isfinite(x).all()):
        raise KvcError("fit_codebook samples contain NaN or inf")
    x, order = torch.sort(x)
    w = w[order]
    zero = torch.zeros(1, dtype=torch.float64)
    cw = torch.cat([zero, torch.cumsum(w, 0)])
    cwx = torch.cat([zero, torch.cumsum(w * x, 0)])
    k = 1 << bits
    # KVQuant Sec. 3.4 (arXiv:2401.18079): nuqX = weighted 1-D k-means; init at weighted quantiles
    targets = (torch.arange(k, dtype=torch.float64) + 0.5) / k * cw[-1]
    c = x[torch.searchsorted(cw[1:], targets).clamp(max=x.numel() - 1)]
    pos = None
    for _ in range(max_iter):
        new_pos = torch.searchsorted(x, (c[:-1] + c[1:]) / 2, right=True)
        if pos is not None and torch.equal(new_pos, pos):
            break
        pos = new_pos
        edges = torch.cat([torch.zeros(1, dtype=torch.long), pos, torch.tensor([x.numel()])])
        wsum = cw[edges[1:]] - cw[edges[:-1]]
        c = torch.where(wsum > 0, (cwx[edges[1:]] - cwx[edges[:-1]]) / wsum.clamp_min(1e-300), c)
    return torch.sort(c).values


def nearest_codes(x: torch.Tensor, codebook: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Index of the nearest centroid of a sorted codebook for every entry of ``x`` (int64, or
    ``dtype`` when it holds every index)."""
    cb = codebook.to(device=x.device, dtype=x.dtype)
    mids = (cb[:-1] + cb[1:]) / 2
    if mids.numel() > 15:
        return torch.bucketize(x.contiguous(), mids).to(dtype)
    # = bucketize (the number of midpoints strictly below x), one vectorised compare per midpoint
    codes = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for m in mids.unbind():
        codes += x > m
    return codes.to(dtype)
