"""SnapKV (Li et al. 2024, arXiv:2404.14469): votes of an observation window of the last queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import KvcError
from ..protocol import LayerKV, option
from ..eviction import ScoredEvictor, attention_mass, avg_pool, grouped_queries


class SnapKV(ScoredEvictor):
    """Keep the observation window (last ``--window`` tokens) plus the top keys by its pooled attention.

    Scores: causal attention of the window's queries summed over the window, averaged over the query
    group (kvpress), average-pooled with ``--kernel`` over the tokens before the window. When the
    budget is smaller than the window, the window shrinks to the budget.
    """

    name = "snapkv"
    summary = "eviction: observation-window attention votes, pooled"
    paper = "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, arXiv:2404.14469"

    @dataclass
    class Options(ScoredEvictor.Options):
        window: int = option(64, "observation window: the last queries that vote, kept themselves", low=1)
        kernel: int = option(5, "average-pooling kernel over the votes", low=1, odd=True)

    def scores(self, layer: LayerKV) -> Tensor:
        """Pooled window votes [S, H, T] of the tokens before the window; the last min(window, count)
        tokens score +inf (kept)."""
        T, count = layer.shape[2], self.count(layer)
        window = min(self.options.window, count)
        observing = layer.q_positions >= T - window
        if not bool(observing.any()):
            raise KvcError(f"{self.name}: the capture has no queries in the last {window} positions")
        q = grouped_queries(layer)[..., observing.to(layer.q.device), :]
        votes = attention_mass(q, layer.k, layer.q_positions[observing], layer.attention)[..., : T - window]
        pooled = avg_pool(votes, self.options.kernel)  # SnapKV Alg. 1: top (count - w) + the window
        return torch.cat([pooled, pooled.new_full((*pooled.shape[:-1], window), float("inf"))], dim=-1)
