"""What one attention layer of the model computes: its mask and its logit transform.

Every metric, eviction score and query-aware statistic of kvc goes through ``AttentionSpec``, so it
describes the attention the model really computes on that layer (docs/format.md, "attention"):

- causal: the query at position p sees keys j <= p; bidirectional (encoders): every key;
- sliding window W (transformers' masking_utils): causal p - W < j <= p; bidirectional |p - j| <= W;
- logits = s * <q, k> with the layer's own scale s (1/sqrt(D) unless the model says otherwise,
  e.g. Gemma's ``query_pre_attn_scalar``; Vaswani et al. 2017 eq. 1), then, with a soft cap c,
  c * tanh(logits / c) (Gemma 2, Team Gemma 2024, sec. 2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class AttentionSpec:
    """The attention of one layer; the defaults are plain causal attention over all earlier keys."""

    causal: bool = True
    sliding_window: int | None = None
    scaling: float | None = None  # None: 1 / sqrt(head_dim)
    softcap: float | None = None

    def visible(self, q_positions: Tensor, key_positions: Tensor) -> Tensor:
        """bool [..., M, T]: which keys (at ``key_positions`` [..., T]) each query (at ``q_positions``
        [..., M]) sees; leading dimensions broadcast."""
        distance = q_positions[..., :, None] - key_positions[..., None, :]  # p - j
        if self.causal:
            seen = distance >= 0
            if self.sliding_window is not None:
                seen &= distance < self.sliding_window
            return seen
        if self.sliding_window is not None:
            return distance.abs() <= self.sliding_window
        return distance.new_ones(distance.shape, dtype=bool)

    def scale(self, head_dim: int) -> float:
        """s in logits = s <q, k>."""
        return self.scaling if self.scaling is not None else 1 / math.sqrt(head_dim)

    def logits(self, scores: Tensor, head_dim: int) -> Tensor:
        """The model's attention logits from raw inner products <q, k>."""
        logits = scores * self.scale(head_dim)
        if self.softcap is not None:
            logits = self.softcap * (logits / self.softcap).tanh()
        return logits

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "AttentionSpec":
        return cls(causal=bool(value.get("causal", True)), sliding_window=value.get("sliding_window"),
                   scaling=value.get("scaling"), softcap=value.get("softcap"))


def spec_of(module: Any, kwargs: dict[str, Any]) -> AttentionSpec:
    """The spec of a transformers attention module from what it passes its attention function.

    ``scaling``, ``sliding_window`` and ``softcap`` are the keyword arguments every modeling file
    hands to ``AttentionInterface`` functions; ``is_causal`` is the module's own flag.
    """
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    scaling = kwargs.get("scaling", getattr(module, "scaling", None))
    return AttentionSpec(causal=bool(getattr(module, "is_causal", True)),
                         sliding_window=int(window) if window else None,
                         scaling=float(scaling) if scaling is not None else None,
                         softcap=float(softcap) if softcap else None)


def describe(specs: dict[int, AttentionSpec]) -> str:
    """One line for a summary: 'causal, full on layers 1,3; sliding window 512 on layers 0,2'."""
    groups: dict[str, list[int]] = {}
    for layer, spec in sorted(specs.items()):
        kind = "causal" if spec.causal else "bidirectional"
        span = f"sliding window {spec.sliding_window}" if spec.sliding_window else "full"
        cap = f", soft cap {spec.softcap:g}" if spec.softcap else ""
        groups.setdefault(f"{kind}, {span}{cap}", []).append(layer)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{kind} on layers {','.join(map(str, layers))}" for kind, layers in groups.items())
