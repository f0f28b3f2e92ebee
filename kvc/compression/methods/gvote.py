"""GVote (Tang et al. 2025, arXiv:2509.03136): adaptive budget by voting of sampled future queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...rope import apply_rope
from ..protocol import Evictor, LayerKV, option
from ..eviction import attention, grouped_queries, nucleus_keep

RIDGE = 1e-6  # relative diagonal loading of the fitted covariance (Tq <= D leaves it singular)


class GVote(Evictor):
    """Keep the union of the attention nuclei of the current query and of sampled future queries.

    Our reading of the paper's steps 2-4 (not fully published; docs/methods.md#gvote):
    (1) the last captured query's nucleus (smallest key set with mass >= ``--nucleus``) is kept;
    (2) per query head, a Gaussian N(mu, Sigma) (full covariance) is fitted to the captured queries
        before RoPE (RoPE undone at their positions). This equals fitting the paper's Gaussian to the
        hidden states, since W_Q maps a Gaussian to a Gaussian; heads are sampled independently;
    (3) ``--samples`` draws per head are rotated by RoPE at the next decode position T, attend to
        all T keys, the attention is averaged over the query group, and each draw keeps its nucleus;
    (4) the kept set is the union of (1) and (3); its size, per (sequence, KV head), is the budget.
    """

    name = "gvote"
    summary = "eviction: adaptive budget, union of nuclei of Monte-Carlo future queries"
    paper = "Tang et al., Adaptive KV-Cache Compression without Manually Setting Budget, arXiv:2509.03136"

    @dataclass
    class Options(Evictor.Options):
        samples: int = option(8, "Monte-Carlo future queries per head (paper: S >= 8)", low=1)
        nucleus: float = option(0.95, "attention mass each query's kept set must reach (p_nuc)",
                                low=0, high=1, low_open=True)

    def sample_queries(self, layer: LayerKV) -> Tensor:
        """Future queries [S, H, G, samples, D] (after RoPE at position T) from the per-head Gaussian fit."""
        q = grouped_queries(layer).double()
        positions = layer.q_positions.to(q.device) + layer.offset
        q_pre = apply_rope(q, positions, layer.rope, layer.layer, inverse=True) if layer.rope else q
        mean = q_pre.mean(-2, keepdim=True)
        centered = q_pre - mean
        cov = centered.mT @ centered / max(q.shape[-2] - 1, 1)
        D = q.shape[-1]
        eye = torch.eye(D, dtype=q.dtype, device=q.device)
        scale = cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
        cov = cov + RIDGE * scale[..., None, None] * eye
        noise = torch.randn(*q.shape[:3], self.options.samples, D, dtype=q.dtype, device=q.device,
                            generator=self.generator(layer.layer, q.device))
        draws = mean + noise @ torch.linalg.cholesky(cov).mT  # GVote step 2: Monte-Carlo from the fit
        if layer.rope is None:
            return draws
        future = torch.full((self.options.samples,), layer.shape[2] + layer.offset, device=q.device)
        return apply_rope(draws, future, layer.rope, layer.layer)

    def select(self, layer: LayerKV) -> Tensor:
        k = layer.k.double()
        current = attention(grouped_queries(layer)[..., -1:, :].double(), k, layer.q_positions[-1:],
                            layer.attention)
        next_position = torch.full((self.options.samples,), layer.shape[2])  # where future queries sit
        sampled = attention(self.sample_queries(layer), k, next_position, layer.attention)
        probs = torch.cat([current, sampled], dim=-2).mean(2)  # [S, H, 1 + samples, T], group mean
        return nucleus_keep(probs, self.options.nucleus).any(-2)  # GVote step 4: union of the votes
