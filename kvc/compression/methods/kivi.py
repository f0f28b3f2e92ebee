"""KIVI: asymmetric 2-bit quantization, keys per channel, values per token, fp16 recent window
(docs/methods.md#kivi).

Offline emulation of the streaming cache at the end of the capture:
- keys: per channel, in groups of G consecutive tokens; the first floor((T - R) / G) * G tokens are
  quantized (KIVI quantizes keys in chunks of G once R tokens have accumulated), the rest
  (between R and R + G - 1 tokens) stays in fp16;
- values: per token, in groups of G consecutive channels; the first T - R tokens are quantized, the
  most recent R stay in fp16.
Stored: codes (packed B bits), fp16 scale and zero point per group, the fp16 window.
Paper bits per entry: B + 2*16/G (KIVI counts the quantized entries only; 3.0 at B = 2, G = 32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import MethodFailure
from ...quant.packing import check_code_bits, pack_codes, unpack_codes
from ...quant.uniform import minmax_dequantize, minmax_quantize
from ..protocol import LayerKV, Nominal, TensorCompressor, option


def quantized_tokens(kind: str, T: int, group: int, residual: int) -> int:
    """Number of leading tokens KIVI holds quantized (the rest is the fp16 window)."""
    free = max(T - residual, 0)
    return (free // group) * group if kind == "k" else free


class KIVI(TensorCompressor):
    name = "kivi"
    summary = "asymmetric B-bit groups: keys per channel, values per token, recent tokens in fp16"
    paper = "Liu et al. 2024, KIVI, arXiv:2402.02750"

    @dataclass
    class Options(TensorCompressor.Options):
        bits: int = option(2, "bits per quantized entry (KIVI-2 and KIVI-4 in the paper)", low=1, high=8)
        group_size: int = option(32, "group size G: tokens per key group, channels per value group",
                                 low=1, divides_head_dim=True)
        residual: int = option(128, "fp16 window R of the most recent tokens", low=0)

    def validate(self, layer: LayerKV) -> None:
        super().validate(layer)
        T, G, R = layer.shape[2], self.options.group_size, self.options.residual
        if quantized_tokens("k", T, G, R) == 0:
            raise MethodFailure(f"kivi: {T} tokens leave no full group of {G} keys outside the "
                                f"fp16 window of {R}; nothing would be quantized (lower --residual)")

    @classmethod
    def nominal_bits(cls, options: Options, key_dim: int, value_dim: int) -> Nominal:
        rate = options.bits + 32 / options.group_size  # fp16 scale and zero point per group of G
        return Nominal(rate, rate, options.residual)

    def encode_tensor(self, x: Tensor, kind: str, layer: LayerKV, generator: torch.Generator
                      ) -> tuple[dict[str, Tensor], dict[str, Any], float | None]:
        T = x.shape[-2]
        B, G, R = self.options.bits, self.options.group_size, self.options.residual
        n = quantized_tokens(kind, T, G, R)
        xq = x[..., :n, :]
        # KIVI sec. 3.2/3.3: keys per channel (groups along tokens), values per token (groups along channels)
        codes, scale, zero = minmax_quantize(xq, B, G, axis=-2 if kind == "k" else -1)
        arrays = {"codes": pack_codes(codes, B), "scale": scale, "zero": zero,
                  "window": x[..., n:, :].to(torch.float16)}
        check_code_bits(f"kivi {B}-bit", [arrays["codes"]], xq.numel(), B)
        # KIVI (TurboQuant table 1 counting): B + 2*16/G bits per quantized entry
        return arrays, {"tokens": n, "bits": B, "group": G}, B + 32 / G

    def decode_tensor(self, arrays: dict[str, Tensor], meta: dict[str, Any], kind: str,
                      shape: tuple[int, ...]) -> Tensor:
        S, H, T, D = shape
        n = meta["tokens"]
        qshape = (S, H, D, n) if kind == "k" else (S, H, n, D)
        codes = unpack_codes(arrays["codes"], meta["bits"], qshape, torch.uint8, transposed=kind == "k")
        xq = minmax_dequantize(codes, arrays["scale"], arrays["zero"], axis=-2 if kind == "k" else -1)
        if n == T:  # no fp16 window
            return xq
        out = torch.empty(S, H, T, D, device=xq.device)
        out[..., :n, :], out[..., n:, :] = xq, arrays["window"]
        return out
