"""eOptShrinkQ (Su, arXiv:2605.02905): eOptShrink low-rank part + TurboQuant-mse residual.

Algorithm, bits and theory: docs/methods.md#eoptshrinkq.
"""

from __future__ import annotations

from torch import Tensor

from ...analysis.rmt import eoptshrink
from ..lowrank import Components, LowRankQuant


class EOptShrinkQ(LowRankQuant):
    """Blocks of --block tokens: eOptShrinkQ rank, Frobenius-optimal shrunk singular values phi."""

    name = "eoptshrinkq"
    summary = "eOptShrink low-rank (shrunk, 4-bit factors) + TurboQuant-mse residual"
    paper = "Su, eOptShrinkQ: Near-Lossless KV Cache Compression, arXiv:2605.02905"

    def components(self, blocks: Tensor) -> Components:
        """The detected components with their shrunk values phi = d_hat sqrt(a1 a2), eOptShrinkQ Alg. 3
        (docs/methods.md#optimal-shrinkage); --rank-rule rd and --rank keep a prefix of them."""
        s = eoptshrink(blocks, rule=self.detection, imputation=self.detection)
        return Components(s.singular_values, s.left, s.right, s.phi, s.usable)
