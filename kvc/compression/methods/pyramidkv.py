"""PyramidKV (Cai et al. 2024, arXiv:2406.02069): SnapKV scoring with budgets decreasing with depth."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import KvcError
from ..protocol import LayerKV, option
from .snapkv import SnapKV


def pyramid(hi: int, lo: int, layers: int, layer: int) -> int:
    """Layer ``layer``'s integer share of the linear schedule hi -> lo over ``layers`` layers, by
    cumulative rounding (half up): the shares sum to the real schedule's sum, layers * (hi + lo) / 2."""
    def cumulative(n: int) -> int:  # round(sum_{i < n} (hi - i (hi - lo) / (L - 1))), exactly
        num = 2 * n * hi * (layers - 1) - (hi - lo) * n * (n - 1)  # 2 (L - 1) x the real sum
        den = 2 * (layers - 1)
        return (2 * num + den) // (2 * den)
    return cumulative(layer + 1) - cumulative(layer)


class PyramidKV(SnapKV):
    """SnapKV with a linear per-layer budget; ``--budget`` is the average over the layers, exactly.

    KVCache-Factory's schedule, with C the average budget, w the window, L layers:
    min = (C - w) // beta, max = 2(C - w) - min, layer l keeps max - l (max - min) / (L - 1) + w,
    each layer rounded so that the layers keep L * C tokens in all (docs/methods.md#pyramidkv).
    Falls back to SnapKV's budget C when max > T - w (the pyramid would not fit) or L = 1.
    """

    name = "pyramidkv"
    summary = "eviction: SnapKV votes with a pyramid of per-layer budgets"
    paper = "Cai et al., PyramidKV: Dynamic KV Cache Compression, arXiv:2406.02069"

    @dataclass
    class Options(SnapKV.Options):
        beta: int = option(20, "pyramid steepness: the last layer keeps (C - w) / beta + w", low=1)

    def validate(self, layer: LayerKV) -> None:
        super().validate(layer)
        if not 0 <= layer.layer < layer.num_layers:
            raise KvcError(f"{self.name}: layer {layer.layer} outside 0..{layer.num_layers - 1}")

    def count(self, layer: LayerKV) -> int:
        C, T, L = super().count(layer), layer.shape[2], layer.num_layers
        window = min(self.options.window, C)
        lo = (C - window) // self.options.beta  # PyramidKV sec. 3.3 / KVCache-Factory pyramidkv_utils
        hi = 2 * (C - window) - lo
        if L == 1 or hi > T - window:
            return C
        return pyramid(hi, lo, L, layer.layer) + window
