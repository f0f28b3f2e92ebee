"""Shared scoring for the eviction methods (docs/methods.md#eviction), batched over sequences and heads.

Queries are the captured ones (after RoPE, at ``LayerKV.q_positions``); key j sits at position j.
GQA: query heads h*G .. (h+1)*G - 1 read KV head h; scores are computed against the shared K (never
repeated) and averaged over the group.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import AttentionSpec
from ..errors import KvcError
from .protocol import Evictor, LayerKV, option
from ..metrics.fidelity import grouped, masked_logits

QUERY_CHUNK = 256  # queries per attention block in `attention_mass` (bounds memory at long T)


def grouped_queries(layer: LayerKV) -> Tensor:
    """Queries [S, H_q, Tq, D] viewed as [S, H_kv, G, Tq, D] (query head h*G + g reads KV head h)."""
    Hq, H = layer.q.shape[1], layer.shape[1]
    if Hq % H:
        raise KvcError(f"{Hq} query heads are not a multiple of {H} KV heads")
    return grouped(layer.q, H)


def attention(q: Tensor, k: Tensor, q_positions: Tensor, spec: AttentionSpec) -> Tensor:
    """The layer's attention probabilities: q [S, H, G, M, D] at ``q_positions`` [M], k [S, H, T, D]
    -> [S, H, G, M, T], with the layer's mask, logit scale and soft cap (``spec``)."""
    logits, _ = masked_logits(torch.einsum("shgmd,shtd->shgmt", q, k), q_positions, spec, q.shape[-1])
    return logits.softmax(-1)


def attention_mass(q: Tensor, k: Tensor, q_positions: Tensor, spec: AttentionSpec) -> Tensor:
    """Attention received by each key, summed over queries, averaged over the group: [S, H, T]."""
    # H2O (arXiv:2306.14048) sec. 3: s_j = sum_i A_ij; SnapKV (arXiv:2404.14469) eq. over the window
    return sum(attention(q[..., i:i + QUERY_CHUNK, :], k, q_positions[i:i + QUERY_CHUNK], spec).sum(-2)
               for i in range(0, q.shape[-2], QUERY_CHUNK)).mean(2)


def avg_pool(scores: Tensor, kernel: int) -> Tensor:
    """1-D average pooling along the last dim (stride 1, zero padding kernel//2; odd kernel keeps length)."""
    shape = scores.shape
    # SnapKV sec. 4.2: F.avg_pool1d(kernel, padding=kernel//2, stride=1) on the vote vector
    return F.avg_pool1d(scores.reshape(-1, 1, shape[-1]), kernel, 1, kernel // 2).reshape(shape)


def topk_keep(scores: Tensor, count: int) -> Tensor:
    """Bool mask [..., T] of the ``count`` highest scores along the last dim (+inf forces a token in)."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(-1, scores.topk(count, dim=-1).indices, True)


def nucleus_keep(probs: Tensor, p: float) -> Tensor:
    """Bool mask [..., T]: the smallest set of entries whose probability mass reaches ``p``."""
    sorted_probs, order = probs.sort(-1, descending=True)
    # top-p (Holtzman et al. 2020): keep an entry while the mass before it is still below p
    before = sorted_probs.cumsum(-1) - sorted_probs
    keep = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    return keep.scatter_(-1, order, before < p)


def recent(T: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """Bool [T]: the last ``n`` positions."""
    return torch.arange(T, device=device) >= T - n


def keep_count(tokens: int, budget: float) -> int:
    """Tokens kept for a budget fraction: round(budget * T), at least 1, at most T."""
    return min(tokens, max(1, round(budget * tokens)))


class BudgetEvictor(Evictor):
    """An eviction method that keeps a fixed fraction ``--budget`` of the tokens per (sequence, KV head)."""

    @dataclass
    class Options(Evictor.Options):
        budget: float = option(0.25, "fraction of the tokens kept per (sequence, KV head)",
                               low=0, high=1, low_open=True)

    def count(self, layer: LayerKV) -> int:
        """Tokens kept per (sequence, KV head) in this layer: the budget's share of the tokens seen
        (``LayerKV.seen``), at most those still held."""
        T = layer.shape[2]
        return min(T, keep_count(T if layer.seen is None else layer.seen, self.options.budget))


class ScoredEvictor(BudgetEvictor):
    """A budget evictor that scores every token and keeps the ``count`` best per (sequence, KV head).

    ``scores`` is what the head-adaptive wrapper (``adakv+NAME``, docs/methods.md#adakv) ranks
    jointly across the heads; +inf forces a token in (a window, the sinks).
    """

    @abstractmethod
    def scores(self, layer: LayerKV) -> Tensor:
        """Importance [S, H, T] of every token (higher is kept first)."""

    def select(self, layer: LayerKV) -> Tensor:
        return topk_keep(self.scores(layer), self.count(layer))
