"""AdaKV (Feng et al. 2024, arXiv:2407.11550): head-adaptive budgets around a scoring eviction method."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...errors import KvcError
from ..protocol import Compressor, Evictor, LayerKV, option
from ..eviction import ScoredEvictor, topk_keep
from .snapkv import SnapKV


class AdaKV(Evictor):
    """Per layer, keep the top H * count scores of the wrapped method over all KV heads jointly, so a
    head with peaked scores gives tokens to a head with flat ones; each head first keeps its own top
    max(1, floor(alpha * count)) (the safeguard). ``adakv`` wraps SnapKV (the paper's Ada-SnapKV);
    ``adakv+NAME`` wraps any scoring method (h2o, tova, knorm, ...), with its options.
    """

    name = "adakv"
    summary = "eviction: head-adaptive budget over SnapKV scores (adakv+NAME: over NAME's)"
    paper = "Feng et al., Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation, arXiv:2407.11550"
    scorer: ClassVar[type[ScoredEvictor]] = SnapKV

    @dataclass
    class Options(SnapKV.Options):
        budget: float = option(0.25, "fraction of the tokens kept per (sequence, layer), shared unequally "
                               "by the KV heads", low=0, high=1, low_open=True)
        alpha: float = option(0.2, "safeguard: share of its budget each head keeps by its own scores",
                              low=0, high=1)

    def __init__(self, options: "AdaKV.Options | None" = None):
        super().__init__(options)
        values = dataclasses.asdict(self.options)
        self.inner = self.scorer(self.scorer.Options(
            **{f.name: values[f.name] for f in dataclasses.fields(self.scorer.Options)}))

    def validate(self, layer: LayerKV) -> None:
        super().validate(layer)
        self.inner.validate(layer)

    def select(self, layer: LayerKV) -> Tensor:
        scores = self.inner.scores(layer)
        S, H, T = scores.shape
        count = self.inner.count(layer)
        alpha = self.options.alpha
        safe = max(1, int(count * alpha)) if alpha > 0 else 0
        # AdaKV safeguard: each head's own top floor(alpha * count) are kept before the joint top-k
        scores = scores.masked_fill(topk_keep(scores, safe), float("inf"))
        return topk_keep(scores.reshape(S, H * T), H * count).reshape(S, H, T)  # AdaKV Alg. 1

    @classmethod
    def around(cls, scorer: type[Compressor]) -> type["AdaKV"]:
        """The class of ``adakv+NAME``: AdaKV over the scores of ``scorer``."""
        return _around(cls, scorer)


@functools.cache
def _around(cls: type[AdaKV], scorer: type[Compressor]) -> type[AdaKV]:
    if not issubclass(scorer, ScoredEvictor):
        raise KvcError(f"{cls.name} wraps an eviction method that scores tokens (snapkv, h2o, tova, "
                       f"knorm, keydiff, expected_attention, pyramidkv); {scorer.name} does not")
    own = {f.name: f for f in dataclasses.fields(cls.Options) if f.name in ("budget", "alpha")}
    options = dataclasses.make_dataclass("Options", [(name, float, dataclasses.field(
        default=f.default, metadata=f.metadata)) for name, f in own.items()], bases=(scorer.Options,))
    return type(f"{cls.__name__}{scorer.__name__}", (cls,), {
        "name": f"{cls.name}+{scorer.name}", "Options": options, "scorer": scorer,
        "__module__": __name__, "summary": f"eviction: head-adaptive budget over {scorer.name}'s scores",
        "paper": f"{cls.paper}; {scorer.paper}"})
