"""Low-rank + quantized-residual codec shared by ``eoptshrinkq`` and ``svdq``
(docs/methods.md#eoptshrinkq-algorithm).

Per (sequence, KV head) the tokens are cut into blocks of ``--block`` rows; the last, unfinished
block stays fp16. All blocks of a layer are decomposed in one batched call (the method's
``components``: singular triplets and their weights); the rank rule keeps r_b of them per block
(``--rank-rule``: detection by ``kvc.analysis.rmt.eoptshrink``, or rd, the rate-optimal rank of
docs/methods.md#rate-optimal-rank; ``--rank``: a fixed rank). Block X_b (n x d) with r_b components:

    X_b ~= U_b diag(w_b) V_b^T + R_b

- U_b [n, r_b], V_b [d, r_b]: the singular vectors, quantized at ``--factor-bits`` with data-fitted
  Lloyd-Max codebooks. Granularity: one codebook per (layer, K or V, side U or V) fitted on all
  factor entries of the layer's blocks, scaled by sqrt(n) resp. sqrt(d) to unit variance.
- w_b: fp16 weights; the difference between the methods (shrunk phi or raw singular values).
- R_b = X_b - U_hat diag(w_hat) V_hat^T, formed from the decoded factors (so the factor error is
  coded too): TurboQuant-mse at ``--bits`` with an fp16 norm per token and one Haar rotation whose
  seed is stored in the metadata.

Stored arrays (per tensor): ``ranks`` uint8 [S, H, nb]; ``u_codes`` / ``v_codes``: packed factor
codes, ragged (block-major, then component, then entry; sum(r_b) columns); ``u_codebook`` /
``v_codebook`` fp16 [2^b_f]; ``weights`` fp16 [sum(r_b)]; ``codes``: packed residual codes
[S, H, nb n, d]; ``norms`` fp16 [S, H, nb n]; ``tail`` fp16 [S, H, T - nb n, d].
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import KvcError
from ..quant.lloyd_max import beta_codebook, distortion, fit_codebook, nearest_codes
from ..quant.packing import pack_codes, unpack_codes
from ..quant.rotation import draw_seed, make_rotation
from ..quant.turboquant import tq_codebook, tq_mse_decode, tq_mse_encode
from ..analysis.rmt import rank_rule_unfit, rate_optimal_prefix
from .protocol import Encoded, LayerKV, Nominal, TensorCompressor, option

RAGGED = ("u_codes", "v_codes", "weights")  # arrays whose size follows the per-block ranks
NOMINAL_RANK = 3  # typical rank r per block of the nominal count (docs/methods.md#eoptshrinkq-bits)
MAX_RANK = 255  # ranks are stored as uint8
DETECTION_RULES = ("eoptshrinkq", "matlab")  # rank rules that detect spikes (eoptshrink); rd does not


def paper_bits(bits: int, rank: Tensor | float, n: int, d: int, factor_bits: int) -> Tensor:
    """Bits per entry by the paper's formula, per block: b + r (n + d) b_f / (n d).

    Paper count of docs/methods.md#eoptshrinkq-bits.
    """
    return bits + torch.as_tensor(rank, dtype=torch.float64) * (n + d) * factor_bits / (n * d)


def quantize_factor(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Fitted Lloyd-Max codes of the entries of x (int64, x's shape) and the fp16 codebook [2^bits]."""
    if x.numel() == 0:
        return (torch.zeros(x.shape, dtype=torch.int64, device=x.device),
                torch.zeros(1 << bits, dtype=torch.float16, device=x.device))
    codebook = fit_codebook(x, bits).to(device=x.device, dtype=torch.float16)
    return nearest_codes(x, codebook.to(x.dtype)), codebook


def residual_distortion(d: int, bits: int) -> float:
    """D_b: TurboQuant-mse's expected squared error per unit row at ``bits`` (exact Beta(d) codebook);
    D_0 = 1 (nothing coded), beyond 8 bits D_b = D_8 4^{8-b} (docs/methods.md#rate-optimal-rank)."""
    if bits <= 0:
        return 1.0
    if bits > 8:
        return residual_distortion(d, 8) * 4.0 ** (8 - bits)
    return distortion(tq_codebook(d, bits), d)


def residual_slope(d: int, bits: int) -> float:
    """gamma_b = 1/2 log2(D_{b-1} / D_{b+1}): log2 of the residual error saved per bit per entry
    around ``bits`` (docs/methods.md#rate-optimal-rank)."""
    return 0.5 * math.log2(residual_distortion(d, bits - 1) / residual_distortion(d, bits + 1))


def factor_distortion(n: int, d: int, factor_bits: int) -> float:
    """c_f = 1 - (1 - delta_n)(1 - delta_d): relative squared error of one quantized component w u v^T,
    delta_m the Lloyd-Max error of a coordinate of a uniform unit vector in R^m scaled to unit variance
    (docs/methods.md#error-decomposition)."""
    def delta(m: int) -> float:
        return 0.0 if m < 2 else distortion(beta_codebook(m, factor_bits), m)  # R^1: +-1, coded exactly

    return 1.0 - (1.0 - delta(n)) * (1.0 - delta(d))


@dataclass(frozen=True)
class Components:
    """Candidate components of every block [..., n, d], in descending singular-value order:
    singular values y [..., p]; left [..., n, m] and right [..., d, m] singular vectors; the weights
    w [..., m] a method stores; usable [..., m]: the candidates a rank rule may keep."""

    singular_values: Tensor
    left: Tensor
    right: Tensor
    weights: Tensor
    usable: Tensor


@dataclass(frozen=True)
class ErrorPrediction:
    """The rank rule's choice and the predicted coded error per block [...]
    (docs/methods.md#error-decomposition): energy ||X_b||^2, ranks, and the residual energy the coder
    sees in three parts: bulk sum_{i not kept} y_i^2, shrinkage excess sum_kept (y_i - w_i)^2, factor
    error c_f sum_kept (2 y_i w_i - w_i^2); distortion D_b of the residual coder."""

    energy: Tensor
    ranks: Tensor
    bulk: Tensor
    excess: Tensor
    factor: Tensor
    distortion: float

    @property
    def error(self) -> Tensor:
        """Predicted E||X_b - X_hat_b||^2 = D_b (bulk + excess + factor)."""
        return self.distortion * (self.bulk + self.excess + self.factor)


def compose(u: Tensor, w: Tensor, v: Tensor, ranks: Tensor) -> Tensor:
    """Sum_i w_i u_i v_i^T per block [..., n, d] from ragged u [R, n], w [R], v [R, d] and ranks [...]."""
    r_max = int(ranks.max()) if ranks.numel() else 0
    slots = torch.arange(r_max, device=ranks.device) < ranks[..., None].long()
    U = u.new_zeros(*ranks.shape, r_max, u.shape[-1])
    V = v.new_zeros(*ranks.shape, r_max, v.shape[-1])
    W = w.new_zeros(*ranks.shape, r_max)
    U[slots], V[slots], W[slots] = u, v, w
    return (U.mT * W[..., None, :]) @ V  # U diag(w) V^T


class LowRankQuant(TensorCompressor):
    """Blockwise low-rank factors (fitted-codebook codes) + a TurboQuant-mse residual.

    Subclasses give the candidate components and their weights (``components``); rank rules,
    factors, residual codec and storage are shared. Keys default to before RoPE, by measurement on the default capture
    (SmolLM2-135M, 30 layers, 4 x 512 tokens, eoptshrinkq defaults, mean over layers): pre 2.55
    bits/entry, K mse_rel 0.017, relative MSE of the causal logits
    q.k with the real queries 0.011; post 2.51 bits/entry, 0.030, 0.018.
    """

    @dataclass
    class Options(TensorCompressor.Options):
        keys: str = option("pre", "compress keys before (pre, measured better) or after (post) RoPE",
                          choices=("pre", "post"))
        bits: int = option(2, "TurboQuant-mse bits per residual entry", low=1, high=8)
        factor_bits: int = option(4, "bits per low-rank factor entry (fitted Lloyd-Max codebook)", low=1, high=8)
        block: int = option(128, "tokens per block; the unfinished last block stays fp16", low=1)
        rank_rule: str = option("eoptshrinkq", "rank rule: eoptshrinkq (BBP-type detection), matlab (v5 rule and "
                                "pseudo-noise imputation), rd (rate-optimal: fewest total bits at equal predicted "
                                "error)",
                                choices=("eoptshrinkq", "matlab", "rd"))
        rank: int = option(0, "fixed rank per block instead of the rule's (0: the rule's; eoptshrinkq keeps at most "
                           "this many of its usable components)", low=0, high=MAX_RANK)

    @property
    def detection(self) -> str:
        """The spike-detection rule behind the candidates: --rank-rule, or eoptshrinkq's with rd."""
        return self.options.rank_rule if self.options.rank_rule in DETECTION_RULES else "eoptshrinkq"

    @property
    def detects(self) -> bool:
        """Whether ``components`` runs a detection rule (which needs min(n, d) >= 3)."""
        return True

    @abstractmethod
    def components(self, blocks: Tensor) -> Components:
        """The candidate components of blocks [..., n, d] and the weights the method stores."""

    def validate(self, layer: LayerKV) -> None:
        super().validate(layer)
        o = self.options
        if self.detects and o.block <= layer.shape[2]:
            why = rank_rule_unfit(self.detection, min(o.block, layer.shape[3]))
            if why:
                raise KvcError(f"{self.name}: --block {o.block} at head_dim {layer.shape[3]}: {why}")

    def select(self, c: Components, n: int, d: int) -> Tensor:
        """The components kept [..., m]: the first --rank usable ones, the rd prefix, or all usable."""
        o = self.options
        usable = c.usable & (torch.arange(c.usable.shape[-1], device=c.usable.device) < MAX_RANK)
        if o.rank:
            return usable & (usable.cumsum(-1) <= o.rank)
        if o.rank_rule != "rd":
            return usable
        excess, factor = self._excess_and_factor(c, n, d)
        y2 = c.singular_values[..., : c.weights.shape[-1]].square()
        gains = torch.where(usable, y2 - excess - factor, 0.0)  # = (1 - c_f)(2 y w - w^2)
        costs = usable * (o.factor_bits * (n + d) + 16)  # factor codes and the fp16 weight
        energy = c.singular_values.square().sum(-1)  # ||X_b||_F^2
        m = rate_optimal_prefix(energy, gains, costs, n * d, residual_slope(d, o.bits))
        return usable & (torch.arange(usable.shape[-1], device=usable.device) < m[..., None])

    def _excess_and_factor(self, c: Components, n: int, d: int) -> tuple[Tensor, Tensor]:
        """Per candidate [..., m]: the residual energy it leaves beyond the bulk if kept, (y - w)^2 and
        c_f (2 y w - w^2) (docs/methods.md#error-decomposition)."""
        y, w = c.singular_values[..., : c.weights.shape[-1]], c.weights
        return (y - w).square(), factor_distortion(n, d, self.options.factor_bits) * (2 * y * w - w * w)

    def predict(self, blocks: Tensor) -> ErrorPrediction:
        """The ranks this compressor keeps in blocks [..., n, d] and their predicted coded error, from
        the singular values alone (docs/methods.md#error-decomposition)."""
        n, d = blocks.shape[-2:]
        c = self.components(blocks)
        keep = self.select(c, n, d)
        excess, factor = self._excess_and_factor(c, n, d)
        y2 = c.singular_values.square()
        energy = y2.sum(-1)
        return ErrorPrediction(energy, keep.sum(-1), energy - (y2[..., : keep.shape[-1]] * keep).sum(-1),
                               (excess * keep).sum(-1), (factor * keep).sum(-1),
                               residual_distortion(d, self.options.bits))

    @classmethod
    def nominal_bits(cls, options: Options, key_dim: int, value_dim: int) -> Nominal:
        """Fully counted at rank r = --rank, else the typical NOMINAL_RANK, block n, factor bits b_f:
        b + 16/d + r (n + d) b_f/(n d) + 16 r/(n d) + 16 2^b_f/(n d) (docs/methods.md#eoptshrinkq-bits)."""
        def rate(d: int) -> float:
            n, r, bf = options.block, options.rank or NOMINAL_RANK, options.factor_bits
            return options.bits + 16 / d + r * (n + d) * bf / (n * d) + 16 * r / (n * d) + 16 * 2 ** bf / (n * d)

        return Nominal(rate(key_dim), rate(value_dim))

    def encode_tensor(self, x: Tensor, kind: str, layer: LayerKV, generator: torch.Generator
                      ) -> tuple[dict[str, Tensor], dict[str, Any], float | None]:
        o = self.options
        S, H, T, D = x.shape
        n, nb = o.block, T // o.block
        blocks = x[..., : nb * n, :].reshape(S, H, nb, n, D).float()
        seed = draw_seed(generator)
        arrays = {"tail": x[..., nb * n:, :].to(torch.float16)}
        meta = {"seed": seed}
        if nb == 0:
            return arrays, meta, None
        candidates = self.components(blocks)
        keep = self.select(candidates, n, D)
        ranks = keep.sum(-1)
        u = candidates.left.mT[keep].float() * math.sqrt(n)  # [R, n], unit variance entries
        v = candidates.right.mT[keep].float() * math.sqrt(D)  # [R, D]
        u_codes, u_cb = quantize_factor(u, o.factor_bits)
        v_codes, v_cb = quantize_factor(v, o.factor_bits)
        w = candidates.weights[keep].to(torch.float16)
        arrays.update(ranks=ranks.to(torch.uint8), u_codes=pack_codes(u_codes, o.factor_bits),
                      v_codes=pack_codes(v_codes, o.factor_bits), u_codebook=u_cb, v_codebook=v_cb,
                      weights=w)
        lowrank = self._lowrank(arrays, n, D)
        rotation = make_rotation("haar", D, seed, x.device)
        codes, norms = tq_mse_encode((blocks - lowrank).reshape(S, H, nb * n, D), o.bits, rotation,
                                     tq_codebook(D, o.bits))
        arrays.update(codes=pack_codes(codes, o.bits), norms=norms)
        return arrays, meta, float(paper_bits(o.bits, ranks.double().mean(), n, D, o.factor_bits))

    def _lowrank(self, arrays: dict[str, Tensor], n: int, d: int) -> Tensor:
        """Decoded low-rank part [S, H, nb, n, d] (float32) from the stored factor arrays."""
        ranks = arrays["ranks"].long()
        R, b_f = int(ranks.sum()), self.options.factor_bits
        u_cb, v_cb = arrays["u_codebook"].float(), arrays["v_codebook"].float()
        u = u_cb.to(ranks.device)[unpack_codes(arrays["u_codes"], b_f, (R, n))] / math.sqrt(n)
        v = v_cb.to(ranks.device)[unpack_codes(arrays["v_codes"], b_f, (R, d))] / math.sqrt(d)
        return compose(u, arrays["weights"].float(), v, ranks)

    def head_bits(self, encoded: Encoded, layer: LayerKV) -> dict[str, Tensor]:
        """Per KV head: the ragged factor arrays in proportion to the head's ranks, the rest evenly."""
        H, out = layer.shape[1], {}
        for kind in ("k", "v"):
            ragged = sum(encoded.nbits(f"{kind}.{name}") for name in RAGGED)
            ranks = encoded.arrays.get(f"{kind}.ranks")
            rank = torch.zeros(H, dtype=torch.float64) if ranks is None else ranks.double().sum((0, 2)).cpu()
            out[kind] = (encoded.nbits(f"{kind}.") - ragged) / H + ragged * rank / rank.sum().clamp_min(1)
        return out

    def decode_tensor(self, arrays: dict[str, Tensor], meta: dict[str, Any], kind: str,
                      shape: tuple[int, ...]) -> Tensor:
        S, H, T, D = shape
        n = self.options.block
        nb = T // n
        tail = arrays["tail"].float()
        if nb == 0:
            return tail
        rotation = make_rotation("haar", D, meta["seed"], tail.device)
        codes = unpack_codes(arrays["codes"], self.options.bits, (S, H, nb * n, D))
        residual = tq_mse_decode(codes, arrays["norms"], rotation, tq_codebook(D, self.options.bits))
        blocks = self._lowrank(arrays, n, D) + residual.reshape(S, H, nb, n, D)
        return torch.cat([blocks.reshape(S, H, nb * n, D), tail], dim=-2)
