"""KVQuant: pre-RoPE per-channel keys, per-token values, non-uniform codebook, dense-and-sparse
(docs/methods.md#kvquant).

Per tensor (K before RoPE by default, V), the first token (attention sink) is stored in fp16
(``--first_few_fp16 1``). Every other entry belongs to one *vector*: a channel over the tokens for
keys (per-channel quantization), a token over the channels for values (per-token).

1. Sparse outliers: per vector, the round(f * L) entries farthest from the vector's median
   (f = ``--outlier-frac``, L its length) are kept exactly in fp16 with their index (uint8 when
   L <= 256, int16 up to 32768, else int32). This stands in for KVQuant's upper/lower thresholds
   (calibrated offline per channel for keys, top-k online per token for values): here the capture
   itself is the calibration set and the count per vector is fixed, so no CSR pointers are needed.
2. Dense part: the remaining entries are normalized to [-1, 1] by the vector's fp16 zero point
   (midrange) and fp16 scale (half-range, rounded up), then mapped to the nearest of 2^X signposts.
3. nuqX codebook: one per layer and tensor, fitted by weighted 1-D k-means (Lloyd) on the
   normalized inlier values of all sequences and heads of the layer (kvc.quant.lloyd_max.fit_codebook).
   KVQuant weights each entry by the diagonal Fisher information (squared gradients of the loss).
   No gradients exist offline, so ``--fisher query`` (default) uses, for keys, the mean squared
   captured query per channel of the head's query group, E[q_c^2]: the squared sensitivity of the
   logit q.k to k_c (for pre-RoPE keys the two channels of a RoPE pair share the mean of their
   weights, since RoPE mixes them); values get uniform weights (their Fisher proxy would need the
   attention probabilities). ``--fisher uniform`` weights every entry equally.
Not implemented: Q-Norm (the paper's mean/std renormalization of centroids at 2 bits).

Paper bits per entry: X + 32 f (fp16 value + 16-bit index per outlier, scales not counted): nuq3-1% =
3.32, KVQuant quotes 3.33 at 32K context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import MethodFailure
from ...quant.lloyd_max import fit_codebook, nearest_codes
from ...quant.packing import check_code_bits, index_dtype, pack_codes, unpack_codes
from ...quant.uniform import fp16_ceil
from ...rope import rope_params
from ..protocol import LayerKV, Nominal, TensorCompressor, option
from ..eviction import grouped_queries


def paper_bits(bits: int, outlier_frac: float) -> float:
    """KVQuant's own count: X bits + 32 bits (fp16 value + 16-bit index) per outlier."""
    # KVQuant sec. 3.5 / table 1 (arXiv:2401.18079): nuqX-1% ~ X.33 bits at 32K context
    return bits + 32.0 * outlier_frac


class KVQuant(TensorCompressor):
    name = "kvquant"
    summary = "pre-RoPE per-channel keys, nuqX k-means codebook per layer, 1% fp16 outliers, fp16 sink"
    paper = "Hooper et al. 2024, KVQuant, arXiv:2401.18079"

    @dataclass
    class Options(TensorCompressor.Options):
        keys: str = option("pre", "compress keys before (pre) or after (post) RoPE", choices=("pre", "post"))
        bits: int = option(3, "bits X of the non-uniform codebook (nuqX)", low=1, high=8)
        outlier_frac: float = option(0.01, "fraction of entries per vector kept in fp16 (dense-and-sparse)",
                                     low=0, high=0.5, high_open=True)
        fisher: str = option("query", "k-means weights standing in for Fisher information: query "
                             "(keys weighted by mean squared query per channel) or uniform",
                             choices=("query", "uniform"))

    def validate(self, layer: LayerKV) -> None:
        super().validate(layer)
        if layer.shape[2] < 2:
            raise MethodFailure("kvquant needs at least 2 tokens (the first stays in fp16)")

    @classmethod
    def nominal_bits(cls, options: Options, key_dim: int, value_dim: int) -> Nominal:
        """Keys: X + 32 f (the paper's count: fp16 value + 16-bit index per outlier; the per-channel
        scale and zero point vanish over the tokens). Values: X + 32/D + round(f D) (16 + i_b)/D
        (fp16 scale and zero point per token, fp16 outliers with i_b-bit indices, uint8 for
        D <= 256). The first token stays in fp16."""
        X, f = options.bits, options.outlier_frac
        outliers = round(f * value_dim) * (16 + 8 * index_dtype(value_dim).itemsize) / value_dim
        return Nominal(paper_bits(X, f), X + 32 / value_dim + outliers, 1)

    def _fisher_proxy(self, layer: LayerKV) -> Tensor | None:
        """Per-channel key weights [S, H, D] = E[q_c^2] over the query group and positions."""
        if self.options.fisher == "uniform" or layer.q is None or layer.q.numel() == 0:
            return None
        w = grouped_queries(layer).float().pow(2).mean(dim=(2, 3))
        if self.options.keys == "pre" and layer.rope is not None:
            S, H = w.shape[:2]
            r = rope_params(layer.rope, layer.layer)[2]
            # rotate_half RoPE pairs channel c with c + r/2 (RoFormer eq. 34): share their weight
            pair = w[..., :r].reshape(S, H, 2, r // 2).mean(dim=2)
            w = torch.cat([pair, pair, w[..., r:]], dim=-1)
        return w

    def encode_tensor(self, x: Tensor, kind: str, layer: LayerKV, generator: torch.Generator
                      ) -> tuple[dict[str, Tensor], dict[str, Any], float | None]:
        o = self.options
        bits = o.bits
        xr = x[..., 1:, :].float()
        # KVQuant sec. 3.1-3.2: keys per channel (vector = channel over tokens), values per token
        xv = xr.transpose(-1, -2) if kind == "k" else xr
        L = xv.shape[-1]
        n_out = int(round(o.outlier_frac * L))
        # KVQuant sec. 3.5 (dense-and-sparse): the entries farthest from the bulk stay in fp16
        dev = (xv - xv.median(dim=-1, keepdim=True).values).abs()
        idx = dev.topk(n_out, dim=-1).indices
        mask = torch.zeros_like(xv, dtype=torch.bool).scatter(-1, idx, True)
        inf = torch.full_like(xv, float("inf"))
        lo = torch.where(mask, inf, xv).amin(dim=-1)
        hi = torch.where(mask, -inf, xv).amax(dim=-1)
        # KVQuant sec. 3.4: normalize each vector to [-1, 1] before the nuq signposts
        zero = ((hi + lo) / 2).to(torch.float16)
        z = zero.float()[..., None]
        scale = fp16_ceil(torch.maximum(hi - zero.float(), zero.float() - lo))
        s = scale.float()[..., None]
        u = torch.where(s > 0, (xv - z) / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(xv))
        key_weights = self._fisher_proxy(layer) if kind == "k" else None  # from this call's layer
        weights = None if key_weights is None else key_weights.to(xv.device)[..., None].expand_as(xv)[~mask]
        # KVQuant sec. 3.4 (nuqX): argmin sum_i F_ii (A_i - Q(A_i))^2 = weighted 1-D k-means
        cb = fit_codebook(u[~mask], bits, weights).to(device=x.device, dtype=torch.float32)
        codes = nearest_codes(u, cb)
        arrays = {"sink": x[..., :1, :].to(torch.float16), "codes": pack_codes(codes, bits),
                  "scale": scale, "zero": zero, "codebook": cb,
                  "out_value": xv.gather(-1, idx).to(torch.float16),
                  "out_index": idx.to(index_dtype(L))}
        check_code_bits(f"kvquant nuq{bits}", [arrays["codes"]], xv.numel(), bits)
        return arrays, {"bits": bits, "outliers": n_out}, paper_bits(bits, o.outlier_frac)

    def decode_tensor(self, arrays: dict[str, Tensor], meta: dict[str, Any], kind: str,
                      shape: tuple[int, ...]) -> Tensor:
        S, H, T, D = shape
        vshape = (S, H, D, T - 1) if kind == "k" else (S, H, T - 1, D)
        codes = unpack_codes(arrays["codes"], meta["bits"], vshape)
        xv = arrays["codebook"].float()[codes] * arrays["scale"].float()[..., None] + arrays["zero"].float()[..., None]
        xv = xv.scatter(-1, arrays["out_index"].long(), arrays["out_value"].float())
        xr = xv.transpose(-1, -2) if kind == "k" else xv
        return torch.cat([arrays["sink"].float(), xr], dim=-2)
