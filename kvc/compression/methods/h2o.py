"""H2O (Zhang et al., NeurIPS 2023, arXiv:2306.14048): heavy hitters + recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..protocol import LayerKV, option
from ..eviction import ScoredEvictor, attention_mass, grouped_queries, recent


class H2O(ScoredEvictor):
    """Keep the recent window plus the tokens with the largest accumulated causal attention.

    One-shot (prefill) form, as in KVCache-Factory: scores sum the softmax rows of all captured
    queries; ``--recent`` is the share of the budget given to the most recent tokens (the original
    scripts' heavy_ratio 0.1 + recent_ratio 0.1 is ``--budget 0.2 --recent 0.5``).
    """

    name = "h2o"
    summary = "eviction: heavy hitters by accumulated attention + recent window"
    paper = "Zhang et al., H2O: Heavy-Hitter Oracle, arXiv:2306.14048"

    @dataclass
    class Options(ScoredEvictor.Options):
        recent: float = option(0.5, "share of the budget kept as the most recent tokens", low=0, high=1)

    def scores(self, layer: LayerKV) -> Tensor:
        """Accumulated attention [S, H, T]; the round(recent * count) last tokens score +inf."""
        scores = attention_mass(grouped_queries(layer), layer.k, layer.q_positions, layer.attention)
        window = recent(layer.shape[2], round(self.options.recent * self.count(layer)), scores.device)
        return scores.masked_fill(window, float("inf"))  # H2O sec. 3.2: heavy + recent
