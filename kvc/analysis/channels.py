"""Per-channel statistics of K/V matrices [..., n, d] over tokens, batched over leading dims.

Outlier channels are the classic KV-cache quantization hazard (KIVI, Liu et al. 2024, sec. 3;
KVQuant, Hooper et al. 2024, sec. 3.1): a few key channels carry magnitudes many times the
others, consistently across tokens, and RoPE mixes each such channel with its rotation partner.
A run of at least ``BAND_MIN`` adjacent flagged channels is a band (in the rotate-half layout,
adjacent channels have adjacent RoPE frequencies: a low-frequency band is many channels wide),
not a set of isolated outliers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvc.errors import KvcError

ROW_BLOCK = 512  # rows per block in `channel_stats` (its buffer stays in cache)
BAND_MIN = 4  # adjacent flagged channels that make a band rather than isolated outliers


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics over the n tokens, each [..., d].

    rms: sqrt(mean x^2); max_abs: max |x|; rms_ratio: rms / median channel rms;
    kurtosis: Pearson kurtosis E(x - m)^4 / var^2 (3 for Gaussian, NaN for a constant channel);
    magnitude_cv: std |x| / mean |x| (0.756 for a zero-mean Gaussian, ~0 for a steady magnitude).
    """

    rms: Tensor
    max_abs: Tensor
    rms_ratio: Tensor
    kurtosis: Tensor
    magnitude_cv: Tensor


def channel_stats(X: Tensor) -> ChannelStats:
    """Statistics of each channel (column) of X [..., n, d] across its tokens (rows).

    Moments about the mean (no cancellation; sum x^2 = sum (x - m)^2 + n m^2), taken in X's dtype
    (float32 or float64; torch sums float32 pairwise) over blocks of ``ROW_BLOCK`` rows through one
    reused buffer, accumulated and returned in float64.
    """
    n = X.shape[-2]
    f64 = torch.float64
    mean = X.mean(-2, keepdim=True)
    buf = X.new_empty(*X.shape[:-2], min(n, ROW_BLOCK), X.shape[-1])
    sums = {key: torch.zeros(*X.shape[:-2], X.shape[-1], dtype=f64, device=X.device) for key in ("c2", "c4", "abs")}
    blocks = [(X[..., i:i + ROW_BLOCK, :], buf[..., : min(ROW_BLOCK, n - i), :]) for i in range(0, n, ROW_BLOCK)]
    for x, b in blocks:
        torch.sub(x, mean, out=b)
        sums["c2"] += b.square_().sum(-2)
        sums["c4"] += b.square_().sum(-2)
        sums["abs"] += torch.abs(x, out=b).sum(-2)
    mean_abs = sums["abs"] / n
    var_abs = torch.zeros_like(mean_abs)
    for x, b in blocks:
        var_abs += torch.abs(x, out=b).sub_(mean_abs.to(X.dtype)[..., None, :]).square_().sum(-2)
    mean = mean.squeeze(-2).to(f64)
    var = sums["c2"] / n
    rms = (var + mean.square()).sqrt()
    kurtosis = sums["c4"] / n / var.square()  # E (x - m)^4 / var^2, Pearson 1905 beta_2
    cv = (var_abs / n).sqrt() / mean_abs  # coefficient of variation of |x| over tokens
    max_abs = torch.maximum(X.amax(-2), X.amin(-2).neg_()).to(f64)
    return ChannelStats(rms, max_abs, rms / median(rms, keepdim=True), kurtosis, cv)


def median(x: Tensor, keepdim: bool = False) -> Tensor:
    """Median over the last dim: the mean of the two middle values for an even count.

    (torch.median returns the lower of the two.) Equal to torch.quantile(x, 0.5, dim=-1), NaN
    included, at a fraction of its cost on small rows.
    """
    s = x.sort(-1).values
    n = x.shape[-1]
    mid = s[..., (n - 1) // 2].lerp(s[..., n // 2], 0.5)  # quantile's own interpolation
    mid = torch.where(s[..., -1].isnan(), s[..., -1], mid)  # sort puts NaN last
    return mid.unsqueeze(-1) if keepdim else mid


def outlier_mask(rms: Tensor, factor: float = 6.0, topk: int | None = None) -> Tensor:
    """Boolean [..., d]: channels whose RMS exceeds factor x the median channel RMS, or the top-k by RMS.

    The ratio-to-median rule is scale-free (as KVQuant's per-channel outlier threshold, sec. 3.3);
    top-k fixes the count instead (KVQuant's dense-and-sparse split keeps a fixed fraction).
    """
    d = rms.shape[-1]
    if topk is not None:
        if not 0 <= topk <= d:
            raise KvcError(f"--outlier-topk must lie in 0..{d}, got {topk}")
        index = rms.topk(topk, dim=-1).indices
        return torch.zeros_like(rms, dtype=torch.bool).scatter_(-1, index, True)
    if factor <= 0:
        raise KvcError(f"--outlier-factor must be > 0, got {factor}")
    return rms > factor * median(rms, keepdim=True)


def band_mask(flags: Tensor, min_run: int = BAND_MIN) -> Tensor:
    """Boolean [..., d]: the flagged channels of flags [..., d] that lie in a run of >= min_run adjacent ones."""
    d = flags.shape[-1]
    if d < min_run:
        return torch.zeros_like(flags, dtype=torch.bool)
    full = flags.unfold(-1, min_run, 1).all(-1).to(torch.uint8)  # [..., d - m + 1]: run of m starts at s
    # channel c is in a band iff some all-flagged window starts in [c - m + 1, c]
    padded = torch.nn.functional.pad(full, (min_run - 1, min_run - 1))
    return padded.unfold(-1, min_run, 1).any(-1)


def channel_runs(flags: list[bool]) -> list[list[int]]:
    """[start, end] (inclusive) of each run of True in flags, in order."""
    runs: list[list[int]] = []
    for c, flag in enumerate(flags):
        if flag and runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        elif flag:
            runs.append([c, c])
    return runs


def rope_partner(channels: Tensor, d: int, rotary_dims: int | None = None) -> Tensor:
    """Rotation partner of each channel under rotate_half RoPE (i <-> i +- r/2; RoFormer eq. 34).

    Channels past the rotary dims (partial rotary) are their own partner.
    """
    r = d if rotary_dims is None else rotary_dims
    half = r // 2
    partner = torch.where(channels < half, channels + half, channels - half)
    return torch.where(channels < r, partner, channels)
