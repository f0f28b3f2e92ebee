"""QJL: keys as 1-bit signs of a JL sketch (m rows) plus the fp16 norm; values group-quantized
(docs/methods.md#qjl).

Keys: sign(S k) in {+-1}^m and ||k|| (kvc.quant.qjl); the decoded key
k_hat = sqrt(pi/2)/m ||k|| S^T sign(S k) gives exactly the paper's asymmetric, unbiased inner-product
estimate <q, k_hat>. S rows are orthogonalized in chunks of d (``--orthogonal``, the authors' default).
Optional outlier channels (``--outliers c``, the authors use 8): per group of G tokens the c channels
with the largest norm over the group are sketched separately (first ``--outlier-sketch-dim`` rows of
the same S, own fp16 norm); the inlier part (those channels zeroed) uses the full sketch. The
channel indices are not stored: decoding the zero-padded outlier sketch needs no index (the
authors' kernel keeps them, 8 bytes per group, for its own layout). Values: asymmetric min/max ``--value-bits`` per token in groups of G
channels (as KIVI). ``--residual R``: tokens after the last full group of T - R stay in fp16 (the
authors' buffer is 128; default 0 here so that short captures are quantized whole).
No paper bit count is given (QJL reports "3 bits per FP number" for its whole LongBench setup).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import MethodFailure
from ...quant.packing import check_code_bits, pack_codes, seed_array, unpack_codes
from ...quant.qjl import qjl_decode, qjl_encode, qjl_sketch
from ...quant.rotation import draw_seed
from ...quant.uniform import minmax_dequantize, minmax_quantize
from ..protocol import LayerKV, Nominal, TensorCompressor, option


class QJL(TensorCompressor):
    name = "qjl"
    summary = "1-bit JL sign sketch of the keys (m rows) + fp16 norms; values min/max group-quantized"
    paper = "Zandieh, Daliri, Han 2024, QJL, arXiv:2406.03482"

    @dataclass
    class Options(TensorCompressor.Options):
        sketch_dim: int = option(256, "sketch rows m = key sign bits per token", low=1)
        orthogonal: bool = option(True, "orthogonalize the sketch rows in chunks of d (QR, scaled by sqrt(d))")
        outliers: int = option(0, "outlier channels per token group sketched separately (authors: 8)",
                               low=0, below_head_dim=True)
        outlier_sketch_dim: int = option(256, "sketch rows for the outlier channels", low=1)
        value_bits: int = option(2, "bits per value entry (asymmetric min/max per token)", low=1, high=8)
        group_size: int = option(32, "channels per value group; tokens per outlier-selection group",
                                 low=1, divides_head_dim=True)
        residual: int = option(0, "most recent tokens kept in fp16 (authors' buffer: 128)", low=0)

    def _tokens(self, T: int) -> int:
        """The number of quantized (leading) tokens; with outliers, whole groups of G tokens."""
        o = self.options
        free = max(T - o.residual, 0)
        return (free // o.group_size) * o.group_size if o.outliers else free

    def validate(self, layer: LayerKV) -> None:
        super().validate(layer)
        if self._tokens(layer.shape[2]) == 0:
            raise MethodFailure(f"qjl: no token of {layer.shape[2]} is outside the fp16 window (lower --residual)")

    @classmethod
    def nominal_bits(cls, options: Options, key_dim: int, value_dim: int) -> Nominal:
        """Keys (m + 16 [+ m_o + 16 with outlier channels]) / D: sign bits and fp16 norms per token;
        values B + 32/G; the fp16 window of R tokens."""
        key = options.sketch_dim + 16 + (options.outlier_sketch_dim + 16 if options.outliers else 0)
        return Nominal(key / key_dim, options.value_bits + 32 / options.group_size, options.residual)

    def encode_tensor(self, x: Tensor, kind: str, layer: LayerKV, generator: torch.Generator
                      ) -> tuple[dict[str, Tensor], dict[str, Any], float | None]:
        S, H, T, D = x.shape
        o = self.options
        n = self._tokens(T)
        xq = x[..., :n, :]
        arrays: dict[str, Tensor] = {"window": x[..., n:, :].to(torch.float16)}
        meta: dict[str, Any] = {"tokens": n}
        if kind == "v":
            codes, scale, zero = minmax_quantize(xq, o.value_bits, o.group_size)
            arrays.update(codes=pack_codes(codes, o.value_bits), scale=scale, zero=zero)
            check_code_bits("qjl values", [arrays["codes"]], xq.numel(), o.value_bits)
            return arrays, {**meta, "bits": o.value_bits, "group": o.group_size}, None
        seed = draw_seed(generator)
        rows = max(o.sketch_dim, o.outlier_sketch_dim if o.outliers else 0)
        sketch = qjl_sketch(D, rows, seed, bool(o.orthogonal), device=x.device)
        arrays["seed"] = seed_array(seed)
        meta.update(rows=rows, m=o.sketch_dim, orthogonal=bool(o.orthogonal), outliers=o.outliers)
        inl = xq
        if o.outliers:
            g = xq.reshape(S, H, n // o.group_size, o.group_size, D)
            # QJL code (QJLKeyQuantizer.build_sketch): top channel norms over each group of G tokens
            idx = torch.linalg.vector_norm(g, dim=-2).topk(o.outliers, dim=-1).indices
            mask = torch.zeros(S, H, n // o.group_size, D, dtype=torch.bool, device=x.device)
            mask = mask.scatter(-1, idx, True)[..., None, :].expand_as(g).reshape(xq.shape)
            out = torch.where(mask, xq, torch.zeros_like(xq))
            inl = xq - out
            osigns, onorm = qjl_encode(out, sketch[:o.outlier_sketch_dim])
            arrays.update(out_signs=pack_codes(osigns, 1), out_norm=onorm)
            meta["out_m"] = o.outlier_sketch_dim
        signs, norms = qjl_encode(inl, sketch[:o.sketch_dim])
        arrays.update(signs=pack_codes(signs, 1), norm=norms)
        check_code_bits("qjl keys", [arrays["signs"]], S * H * n * o.sketch_dim, 1)
        return arrays, meta, None

    def decode_tensor(self, arrays: dict[str, Tensor], meta: dict[str, Any], kind: str,
                      shape: tuple[int, ...]) -> Tensor:
        S, H, T, D = shape
        n = meta["tokens"]
        if kind == "v":
            codes = unpack_codes(arrays["codes"], meta["bits"], (S, H, n, D))
            xq = minmax_dequantize(codes, arrays["scale"], arrays["zero"])
        else:
            device = arrays["window"].device
            sketch = qjl_sketch(D, meta["rows"], int(arrays["seed"]), meta["orthogonal"], device=device)
            signs = unpack_codes(arrays["signs"], 1, (S, H, n, meta["m"])).bool()
            xq = qjl_decode(signs, arrays["norm"], sketch[:meta["m"]])
            if meta["outliers"]:
                osigns = unpack_codes(arrays["out_signs"], 1, (S, H, n, meta["out_m"])).bool()
                xq = xq + qjl_decode(osigns, arrays["out_norm"], sketch[:meta["out_m"]])
        return torch.cat([xq, arrays["window"].float()], dim=-2)
