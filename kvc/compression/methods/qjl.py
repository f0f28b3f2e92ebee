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

from ...errors import KvcError, MethodFailure
from ...quant.options import int_option
from ...quant.packing import check_code_bits, pack_codes, seed_array, unpack_codes
from ...quant.qjl import qjl_decode, qjl_encode, qjl_sketch
from ...quant.rotation import draw_seed
from ...quant.uniform import minmax_dequantize, minmax_quantize
from ..protocol import LayerKV, TensorCompressor, option


class QJL(TensorCompressor):
    name = "qjl"
    summary = "1-bit JL sign sketch of the keys (m rows) + fp16 norms; values min/max group-quantized"
    paper = "Zandieh, Daliri, Han 2024, QJL, arXiv:2406.03482"

    @dataclass
    class Options(TensorCompressor.Options):
        sketch_dim: int = option(256, "sketch rows m = key sign bits per token")
        orthogonal: bool = option(True, "orthogonalize the sketch rows in chunks of d (QR, scaled by sqrt(d))")
        outliers: int = option(0, "outlier channels per token group sketched separately (authors: 8)")
        outlier_sketch_dim: int = option(256, "sketch rows for the outlier channels")
        value_bits: int = option(2, "bits per value entry (asymmetric min/max per token)")
        group_size: int = option(32, "channels per value group; tokens per outlier-selection group")
        residual: int = option(0, "most recent tokens kept in fp16 (authors' buffer: 128)")

    def _settings(self, T: int, D: int) -> dict[str, int]:
        """Validated integer options plus ``tokens``, the number of quantized (leading) tokens."""
        o = self.options
        c = {"sketch_dim": int_option("qjl", "sketch_dim", o.sketch_dim, 1),
             "outliers": int_option("qjl", "outliers", o.outliers, 0),
             "outlier_sketch_dim": int_option("qjl", "outlier_sketch_dim", o.outlier_sketch_dim, 1),
             "group_size": int_option("qjl", "group_size", o.group_size, 1),
             "residual": int_option("qjl", "residual", o.residual, 0),
             "value_bits": int_option("qjl", "value_bits", o.value_bits, 1, 8)}
        if c["group_size"] > D or D % c["group_size"]:
            raise KvcError(f"qjl --group-size {c['group_size']} must divide the head dimension {D}")
        if c["outliers"] >= D:
            raise KvcError(f"qjl --outliers {c['outliers']} must be smaller than the head dimension {D}")
        free = max(T - c["residual"], 0)
        c["tokens"] = (free // c["group_size"]) * c["group_size"] if c["outliers"] else free
        if c["tokens"] == 0:
            raise MethodFailure(f"qjl: no token of {T} is outside the fp16 window (lower --residual)")
        return c

    def validate(self, layer: LayerKV) -> None:
        self._settings(layer.shape[2], layer.shape[3])

    def encode_tensor(self, x: Tensor, kind: str, generator: torch.Generator
                      ) -> tuple[dict[str, Tensor], dict[str, Any], float | None]:
        S, H, T, D = x.shape
        c = self._settings(T, D)
        n = c["tokens"]
        xq = x[..., :n, :]
        arrays: dict[str, Tensor] = {"window": x[..., n:, :].to(torch.float16)}
        meta: dict[str, Any] = {"tokens": n}
        if kind == "v":
            codes, scale, zero = minmax_quantize(xq, c["value_bits"], c["group_size"])
            arrays.update(codes=pack_codes(codes, c["value_bits"]), scale=scale, zero=zero)
            check_code_bits("qjl values", [arrays["codes"]], xq.numel(), c["value_bits"])
            return arrays, {**meta, "bits": c["value_bits"], "group": c["group_size"]}, None
        seed = draw_seed(generator)
        rows = max(c["sketch_dim"], c["outlier_sketch_dim"] if c["outliers"] else 0)
        sketch = qjl_sketch(D, rows, seed, bool(self.options.orthogonal), device=x.device)
        arrays["seed"] = seed_array(seed)
        meta.update(rows=rows, m=c["sketch_dim"], orthogonal=bool(self.options.orthogonal), outliers=c["outliers"])
        inl = xq
        if c["outliers"]:
            g = xq.reshape(S, H, n // c["group_size"], c["group_size"], D)
            # QJL code (QJLKeyQuantizer.build_sketch): top channel norms over each group of G tokens
            idx = torch.linalg.vector_norm(g, dim=-2).topk(c["outliers"], dim=-1).indices
            mask = torch.zeros(S, H, n // c["group_size"], D, dtype=torch.bool, device=x.device)
            mask = mask.scatter(-1, idx, True)[..., None, :].expand_as(g).reshape(xq.shape)
            out = torch.where(mask, xq, torch.zeros_like(xq))
            inl = xq - out
            osigns, onorm = qjl_encode(out, sketch[:c["outlier_sketch_dim"]])
            arrays.update(out_signs=pack_codes(osigns, 1), out_norm=onorm)
            meta["out_m"] = c["outlier_sketch_dim"]
        signs, norms = qjl_encode(inl, sketch[:c["sketch_dim"]])
        arrays.update(signs=pack_codes(signs, 1), norm=norms)
        check_code_bits("qjl keys", [arrays["signs"]], S * H * n * c["sketch_dim"], 1)
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
