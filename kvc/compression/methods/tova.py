"""TOVA (Oren et al. 2024, arXiv:2401.06104): keep the tokens the last query attends to most."""

from __future__ import annotations

from torch import Tensor

from ...errors import KvcError
from ..protocol import LayerKV
from ..eviction import ScoredEvictor, attention, grouped_queries


class TOVA(ScoredEvictor):
    """Keep the ``count`` tokens with the highest attention from the last query, averaged over all
    the layer's query heads (one kept set for every KV head, as the paper's multi-head policy and
    kvpress's ``TOVAPress``); the last token itself is always kept.

    One-shot after the prompt (kvpress); the paper applies the same rule at every decoding step.
    """

    name = "tova"
    summary = "eviction: attention of the last query, averaged over the layer's heads"
    paper = "Oren et al., Transformers are Multi-State RNNs (TOVA), arXiv:2401.06104"

    def scores(self, layer: LayerKV) -> Tensor:
        S, H, T, _ = layer.shape
        last = layer.q_positions == T - 1
        if not bool(last.any()):
            raise KvcError(f"{self.name}: the capture has no query at the last position {T - 1}")
        q = grouped_queries(layer)[..., last.to(layer.q.device), :]
        # TOVA sec. 3: score of token j = attention of the current query, mean over the heads
        probs = attention(q, layer.k, layer.q_positions[last], layer.attention).mean((1, 2, 3))
        probs[:, -1] = float("inf")
        return probs[:, None, :].expand(S, H, T)
