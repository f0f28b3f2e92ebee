"""Knorm (Devoto et al. 2024, arXiv:2406.11430): keep the keys of lowest L2 norm."""

from __future__ import annotations

from torch import Tensor

from ..protocol import LayerKV
from ..eviction import ScoredEvictor


class Knorm(ScoredEvictor):
    """Keep the ``count`` keys of smallest L2 norm per (sequence, KV head); query-free.

    The paper observes that a low key norm goes with high attention (sec. 3); the norm is the same
    before and after RoPE, which is a rotation.
    """

    name = "knorm"
    summary = "eviction: keep the keys of lowest L2 norm (query-free)"
    paper = "Devoto et al., A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, arXiv:2406.11430"

    def scores(self, layer: LayerKV) -> Tensor:
        return -layer.k.norm(dim=-1)  # Devoto et al. 2024: evict the largest ||k_j||
