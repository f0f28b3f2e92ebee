"""Expected Attention (Devoto et al. 2025, arXiv:2510.00636): attention that future queries are
expected to pay, from a Gaussian fit of the queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import KvcError
from ...rope import apply_rope, cos_sin, rope_params
from ..protocol import LayerKV, option
from ..eviction import ScoredEvictor, grouped_queries

CHUNK = 4096  # future positions per step of the rotation average


class ExpectedAttention(ScoredEvictor):
    """Keep the tokens with the largest expected attention of the next ``--future`` queries, times
    their value norm; the first ``--sinks`` tokens are always kept.

    Per query head, the queries before RoPE (captured ones at positions >= sinks, RoPE undone) are
    fitted with N(mu, Sigma); the rotation is replaced by its average R over the positions T ..
    T + future - 1, so q ~ N(R mu, R Sigma R^T), and for logits s q.k (s the layer's scale)
    E[exp(s q.k)] = exp(s k.R mu + s^2/2 k^T R Sigma R^T k). The softmax of these over the keys is
    averaged over the query group and multiplied by ||v_j|| (docs/methods.md#expected-attention).
    """

    name = "expected_attention"
    summary = "eviction: expected attention of future queries (Gaussian fit, averaged RoPE) x value norm"
    paper = ("Devoto et al., Expected Attention: KV Cache Compression by Estimating Attention from "
             "Future Queries Distribution, arXiv:2510.00636")

    @dataclass
    class Options(ScoredEvictor.Options):
        sinks: int = option(4, "first tokens always kept, and left out of the query statistics", low=0)
        future: int = option(512, "future positions whose RoPE rotation is averaged", low=1, high=1_000_000)
        covariance: bool = option(True, "use the queries' covariance (else the mean only)")
        vnorm: bool = option(True, "multiply the expected attention by the value norm")

    def average_rotation(self, layer: LayerKV, dim: int, dtype: torch.dtype) -> Tensor:
        """R^T [D, D] (so that mu @ R^T = R mu): RoPE averaged over the next ``future`` positions.

        Each R_t is cos_t + sin_t * P on the rotated channels (P: rotate_half), so their mean is
        mean(cos) + mean(sin) * P; cos and sin as transformers computes them (float32), averaged in
        chunks of positions."""
        eye = torch.eye(dim, dtype=dtype, device=layer.k.device)
        if layer.rope is None:
            return eye
        inv_freq, scaling, rotary = rope_params(layer.rope, layer.layer)
        start = layer.shape[2] + layer.offset
        cos, sin = (torch.zeros(rotary, dtype=dtype, device=eye.device) for _ in range(2))
        for first in range(start, start + self.options.future, CHUNK):
            positions = torch.arange(first, min(first + CHUNK, start + self.options.future), device=eye.device)
            c, s = cos_sin(positions, inv_freq, scaling)
            cos += c.to(dtype).sum(0)
            sin += s.to(dtype).sum(0)
        half = rotary // 2
        mean = eye.clone()
        mean[:rotary, :rotary] = torch.diag(cos / self.options.future)
        sin = sin / self.options.future
        index = torch.arange(half, device=eye.device)
        mean[index, index + half] = -sin[:half]  # (R x)_i = cos_i x_i - sin_i x_{i+half}
        mean[index + half, index] = sin[half:]  # (R x)_{i+half} = cos x_{i+half} + sin x_i
        return mean.mT

    def scores(self, layer: LayerKV) -> Tensor:
        S, H, T, D = layer.shape
        sinks = min(self.options.sinks, T - 1)
        fitted = layer.q_positions >= sinks
        if not bool(fitted.any()):
            raise KvcError(f"{self.name}: the capture has no queries after the first {sinks} positions")
        q = grouped_queries(layer)[..., fitted.to(layer.q.device), :].double()
        if layer.rope is not None:
            q = apply_rope(q, layer.q_positions[fitted].to(q.device) + layer.offset, layer.rope,
                           layer.layer, inverse=True)
        mean = q.mean(-2)  # [S, H, G, D]
        rotation = self.average_rotation(layer, D, q.dtype)
        k = layer.k[..., sinks:, :].double()
        s = layer.attention.scale(D)
        logits = s * torch.einsum("shgd,shtd->shgt", mean @ rotation, k)
        if self.options.covariance:
            centered = q - mean[..., None, :]
            cov = centered.mT @ centered / q.shape[-2]  # biased, as kvpress
            cov = rotation.mT @ cov @ rotation  # R Sigma R^T
            logits = logits + s * s / 2 * torch.einsum("shtd,shgde,shte->shgt", k, cov, k)
        scores = logits.softmax(-1).mean(2)  # expected attention, group mean
        if self.options.vnorm:
            scores = scores * layer.v[..., sinks:, :].double().norm(dim=-1)
        return torch.cat([scores.new_full((S, H, sinks), float("inf")), scores], dim=-1).to(layer.k.dtype)
