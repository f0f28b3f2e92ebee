"""int-B baseline: uniform B-bit integers per token (over the channels) or per channel (over tokens).

Asymmetric (default): min/max with fp16 scale and zero point per vector, 2^B levels (as KIVI with one
group per vector). ``--symmetric``: absmax scale only, 2^B - 1 levels around an exact zero (B >= 2).
A vector is one token's D channels (``--axis token``) or one channel's T tokens (``--axis channel``)
of one sequence and head. Bits per entry: B + 32/L (asymmetric) or B + 16/L (symmetric).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import KvcError
from ...quant.packing import check_code_bits, pack_codes, unpack_codes
from ...quant.uniform import minmax_dequantize, minmax_quantize, symmetric_dequantize, symmetric_quantize
from ..protocol import LayerKV, Nominal, TensorCompressor, option


class IntQuant(TensorCompressor):
    name = "int"
    summary = "uniform B-bit integers per token or per channel, asymmetric (min/max) or symmetric"
    paper = "baseline (round-to-nearest integer quantization)"

    @dataclass
    class Options(TensorCompressor.Options):
        bits: int = option(4, "bits per entry (2..8 with --symmetric)", low=1, high=8)
        axis: str = option("token", "one scale per token (over channels) or per channel (over tokens)",
                           choices=("token", "channel"))
        symmetric: bool = option(False, "symmetric absmax scale, no zero point")

    def check_options(self, head_dim: int | None = None) -> None:
        super().check_options(head_dim)
        if self.options.symmetric and self.options.bits < 2:  # 2^B - 1 levels around zero
            raise KvcError(f"int: --bits must be in [2, 8] with --symmetric, got {self.options.bits}")

    @classmethod
    def nominal_bits(cls, options: Options, key_dim: int, value_dim: int) -> Nominal:
        """B + 32/D (asymmetric) or B + 16/D (symmetric) per token; B per channel (its scale over
        the tokens vanishes at steady state)."""
        side = 0 if options.axis == "channel" else 16 if options.symmetric else 32
        return Nominal(options.bits + side / key_dim, options.bits + side / value_dim)

    def encode_tensor(self, x: Tensor, kind: str, layer: LayerKV, generator: torch.Generator
                      ) -> tuple[dict[str, Tensor], dict[str, Any], float | None]:
        o = self.options
        bits = o.bits
        xv = x.transpose(-1, -2) if o.axis == "channel" else x
        if o.symmetric:
            codes, scale = symmetric_quantize(xv, bits)
            arrays = {"codes": pack_codes(codes, bits), "scale": scale}
        else:  # per channel: the groups run along the tokens (the stored layout is that of xv)
            codes, scale, zero = minmax_quantize(x, bits, axis=-2 if o.axis == "channel" else -1)
            arrays = {"codes": pack_codes(codes, bits), "scale": scale, "zero": zero}
        check_code_bits(f"int{bits}", [arrays["codes"]], x.numel(), bits)
        return arrays, {"bits": bits, "axis": o.axis, "symmetric": bool(o.symmetric)}, None

    def decode_tensor(self, arrays: dict[str, Tensor], meta: dict[str, Any], kind: str,
                      shape: tuple[int, ...]) -> Tensor:
        S, H, T, D = shape
        vshape = (S, H, D, T) if meta["axis"] == "channel" else (S, H, T, D)
        codes = unpack_codes(arrays["codes"], meta["bits"], vshape, torch.uint8,
                             transposed=meta["axis"] == "channel" and not meta["symmetric"])
        if not meta["symmetric"]:
            return minmax_dequantize(codes, arrays["scale"], arrays["zero"],
                                     axis=-2 if meta["axis"] == "channel" else -1)
        xv = symmetric_dequantize(codes, arrays["scale"], meta["bits"])
        return xv.transpose(-1, -2) if meta["axis"] == "channel" else xv
