"""KeyDiff (Park et al. 2025, arXiv:2504.15364): keep the keys least similar to the mean key direction."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..protocol import LayerKV
from ..eviction import ScoredEvictor


class KeyDiff(ScoredEvictor):
    """Keep the ``count`` keys of lowest cosine similarity to the anchor, the mean of the normalized
    keys of the (sequence, KV head); query-free.

    One-shot over the prompt, as kvpress's ``KeyDiffPress``; the paper evicts block by block while
    the prompt streams in (its Alg. 1), which kvpress writes as ``BlockPress(KeyDiffPress)``.
    """

    name = "keydiff"
    summary = "eviction: keep the keys most dissimilar to the mean key direction (query-free)"
    paper = "Park et al., KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference, arXiv:2504.15364"

    def scores(self, layer: LayerKV) -> Tensor:
        anchor = F.normalize(layer.k, dim=-1).mean(-2, keepdim=True)  # KeyDiff: the anchor is the mean unit key
        return -F.cosine_similarity(layer.k, anchor, dim=-1)  # evict the most similar
