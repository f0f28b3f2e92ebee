"""svdq: the rank-matched truncated-SVD control for eoptshrinkq (docs/methods.md#svdq)."""

from __future__ import annotations

from torch import Tensor

from ...analysis.rmt import Shrinkage
from ..lowrank import LowRankQuant


class SVDQ(LowRankQuant):
    """eoptshrinkq with the raw singular values: same components, factor and residual codecs."""

    name = "svdq"
    summary = "control: rank-matched truncated SVD (unshrunk) + TurboQuant-mse residual"
    paper = "rank-matched control (LaplaceKV audit): same rank and codec as eoptshrinkq, no shrinkage"

    def weights(self, shrinkage: Shrinkage) -> Tensor:
        y = shrinkage.singular_values[..., : shrinkage.usable.shape[-1]]
        return y * shrinkage.usable  # unshrunk y_i on the components eoptshrinkq keeps
