"""FP8 baseline: e4m3 or e5m2 entries with one calibrated fp16 scale per (sequence, head).

The scale is amax(|x|) over the head's tokens and channels divided by the format's largest finite
value (kvc.quant.fp8), so nothing saturates. Bits per entry: 8 + 16 / (T * D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...quant.fp8 import FORMATS, fp8_decode, fp8_encode
from ..protocol import LayerKV, Nominal, TensorCompressor, option

_DIMS = (-2, -1)  # per-head scale: reduce over tokens and channels


class FP8(TensorCompressor):
    name = "fp8"
    summary = "8-bit floats (e4m3 or e5m2) with a calibrated per-head fp16 scale"
    paper = "Micikevicius et al. 2022, FP8 formats, arXiv:2209.05433"

    @dataclass
    class Options(TensorCompressor.Options):
        format: str = option("e4m3", "fp8 format: e4m3 (max 448) or e5m2 (max 57344)", choices=tuple(FORMATS))

    @classmethod
    def nominal_bits(cls, options: Options, key_dim: int, value_dim: int) -> Nominal:
        return Nominal(8.0, 8.0)  # the per-head scale, 16/(T D), vanishes (docs/methods.md#nominal-bits)

    def encode_tensor(self, x: Tensor, kind: str, layer: LayerKV, generator: torch.Generator
                      ) -> tuple[dict[str, Tensor], dict[str, Any], float | None]:
        codes, scale = fp8_encode(x, self.options.format, _DIMS)
        return {"codes": codes, "scale": scale}, {"format": self.options.format}, None

    def decode_tensor(self, arrays: dict[str, Tensor], meta: dict[str, Any], kind: str,
                      shape: tuple[int, ...]) -> Tensor:
        return fp8_decode(arrays["codes"], arrays["scale"], meta["format"], _DIMS)
