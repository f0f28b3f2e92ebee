"""svdq: the rank-matched truncated-SVD control for eoptshrinkq (docs/methods.md#svdq)."""

from __future__ import annotations

from torch import Tensor

from ...analysis.rmt import eoptshrink, gram_eigh
from ..lowrank import DETECTION_RULES, Components, LowRankQuant


class SVDQ(LowRankQuant):
    """eoptshrinkq with the raw singular values: same components, factor and residual codecs."""

    name = "svdq"
    summary = "control: rank-matched truncated SVD (unshrunk) + TurboQuant-mse residual"
    paper = "rank-matched control (LaplaceKV audit): same rank and codec as eoptshrinkq, no shrinkage"

    @property
    def detects(self) -> bool:
        """Rank-matched to eoptshrinkq under a detection rule; rd and --rank need the singular values only."""
        return self.options.rank_rule in DETECTION_RULES and not self.options.rank

    def components(self, blocks: Tensor) -> Components:
        if not self.detects:  # every nonzero singular triplet is a candidate (docs/methods.md#rate-optimal-rank)
            svd = gram_eigh(blocks)
            return Components(svd.singular_values, svd.left, svd.right, svd.singular_values, svd.nonzero)
        s = eoptshrink(blocks, rule=self.detection, imputation=self.detection)
        y = s.singular_values[..., : s.usable.shape[-1]]
        # unshrunk y_i on the components eoptshrinkq keeps
        return Components(s.singular_values, s.left, s.right, y * s.usable, s.usable)
