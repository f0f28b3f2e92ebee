"""Per-channel statistics of K/V matrices [..., n, d] over tokens, batched over leading dims.

Outlier channels are the classic KV-cache quantization hazard (KIVI, Liu et al. 2024, sec. 3;
KVQuant, Hooper et al. 2024, sec. 3.1): a few key channels carry magnitudes many times the
others, consistently across tokens, and RoPE mixes each such channel with its rotation partner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvc.errors import KvcError


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
    """Statistics of each channel (column) of X [..., n, d] across its tokens (rows)."""
    X = X.to(torch.float64)
    rms = X.square().mean(-2).sqrt()
    centered = X - X.mean(-2, keepdim=True)
    var = centered.square().mean(-2)
    kurtosis = centered.pow(4).mean(-2) / var.square()  # Pearson 1905 moment ratio beta_2
    mag = X.abs()
    cv = mag.std(-2, correction=0) / mag.mean(-2)  # coefficient of variation of |x| over tokens
    median = rms.median(-1, keepdim=True).values
    return ChannelStats(rms, mag.amax(-2), rms / median, kurtosis, cv)


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
    return rms > factor * rms.median(-1, keepdim=True).values


def rope_partner(channels: Tensor, d: int, rotary_dims: int | None = None) -> Tensor:
    """Rotation partner of each channel under rotate_half RoPE (i <-> i +- r/2; RoFormer eq. 34).

    Channels past the rotary dims (partial rotary) are their own partner.
    """
    r = d if rotary_dims is None else rotary_dims
    half = r // 2
    partner = torch.where(channels < half, channels + half, channels - half)
    return torch.where(channels < r, partner, channels)
