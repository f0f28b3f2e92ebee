"""fp16: K and V stored as IEEE half precision, the uncompressed baseline (16 bits per entry)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..protocol import LayerKV, Nominal, TensorCompressor


class FP16(TensorCompressor):
    """Stores each tensor as float16; bits per entry are 16 exactly."""

    name = "fp16"
    summary = "baseline: K and V in float16 (16 bits per entry)"

    @classmethod
    def nominal_bits(cls, options: TensorCompressor.Options, key_dim: int, value_dim: int) -> Nominal:
        return Nominal(16.0, 16.0)

    def encode_tensor(self, x: Tensor, kind: str, layer: LayerKV, generator: torch.Generator
                      ) -> tuple[dict[str, Tensor], dict[str, Any], float | None]:
        return {"x": x.to(torch.float16)}, {}, None

    def decode_tensor(self, arrays: dict[str, Tensor], meta: dict[str, Any], kind: str,
                      shape: tuple[int, ...]) -> Tensor:
        return arrays["x"].float()
