"""eoptshrinkq and its svdq control (docs/methods.md#eoptshrinkq, docs/methods.md#svdq): bits, round trip,
bit saving."""

from __future__ import annotations

import math
import re

import pytest
import torch

from kvc.compression.protocol import LayerKV
from kvc.compression.registry import build
from kvc.compression.lowrank import paper_bits
from kvc.errors import KvcError
from kvc.quant.rotation import make_rotation
from kvc.quant.turboquant import tq_codebook, tq_mse_decode, tq_mse_encode
from kvc.analysis.rmt import eoptshrink, predicted_bit_saving
from kvc.rope import apply_rope
from kvc.model.synth import SpikedSpec, spiked_block


def spiked(heads: int, n: int, d: int, strengths: list[float], seed: int = 0) -> torch.Tensor:
    """[1, heads, n, d] float32 from the spiked model (spikes in units of the BBP threshold)."""
    spec = SpikedSpec(num_kv_heads=heads, head_dim=d, seq_len=n, strengths=strengths)
    return spiked_block(spec, torch.Generator().manual_seed(seed)).float()


def layer_of(k: torch.Tensor, v: torch.Tensor, rope: dict | None = None) -> LayerKV:
    """A layer with keys k (before RoPE when ``rope``), values v and dummy queries."""
    q = torch.zeros(k.shape[0], k.shape[1], 1, k.shape[-1])
    positions = torch.arange(k.shape[2])
    k_post = apply_rope(k, positions, rope, 0) if rope else k
    return LayerKV(0, k_post, v, q, torch.tensor([k.shape[2] - 1]), k_pre=k if rope else None, rope=rope)


def rel_mse(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x_hat - x).square().sum() / x.square().sum())


def test_paper_formula_is_2_plus_r_over_16():
    # docs/methods.md#oracle-bits: n = d = 128, b = 2, b_f = 4 -> 2 + r/16 (2.1875 at r = 3)
    assert float(paper_bits(2, 3, 128, 128, 4)) == 2.1875
    for r in range(8):
        assert float(paper_bits(2, r, 128, 128, 4)) == 2 + r / 16


def test_full_count_at_rank_3_is_near_2_33():
    n = d = 128
    x = spiked(1, n, d, [6.0, 4.0, 3.0])
    comp = build("eoptshrinkq", keys="post")
    enc = comp.encode(layer_of(x, x.clone()))
    assert enc.arrays["k.ranks"].tolist() == [[[3]]] and enc.arrays["v.ranks"].tolist() == [[[3]]]
    assert enc.bits_paper == 2.1875
    bpe = enc.nbits("k.") / x.numel()
    # residual codes + fp16 norms + 4-bit factors + fp16 phi + two fp16 codebooks + uint8 rank
    expected = 2 + 16 / d + 3 * (n + d) * 4 / (n * d) + (3 * 16 + 2 * 16 * 16 + 8) / (n * d)
    assert bpe == pytest.approx(expected, abs=1e-12)
    assert abs(bpe - 2.33) < 0.03  # readers' ~2.33, docs/methods.md#eoptshrinkq-bits


@pytest.mark.parametrize("method", ["eoptshrinkq", "svdq"])
def test_round_trip_with_tail_and_ragged_ranks(method):
    d, n, T = 64, 128, 2 * 128 + 44
    gen = torch.Generator().manual_seed(3)
    heads = [spiked(1, T, d, s, seed=i) for i, s in enumerate([[], [5.0, 4.0], [8.0, 6.0, 5.0, 4.0]])]
    x = torch.cat(heads, dim=1)
    v = torch.randn(x.shape, generator=gen)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    rope = {"style": "rotate_half", "inv_freq": inv_freq.tolist(), "attention_scaling": 1.0,
            "rotary_dims": d, "per_layer": {}}
    layer = layer_of(x, v, rope)
    comp = build(method, keys="pre", block=n)
    enc = comp.encode(layer)
    ranks = enc.arrays["k.ranks"]
    assert ranks.dtype == torch.uint8 and ranks.shape == (1, 3, 2)
    assert ranks[0, 0].tolist() == [0, 0] and ranks[0, 2].min() >= 2  # ragged: ranks vary per block
    R = int(ranks.sum())
    assert enc.arrays["k.u_codes"].numel() == math.ceil(R * n * 4 / 8)
    assert enc.arrays["k.v_codes"].numel() == math.ceil(R * d * 4 / 8)
    assert enc.arrays["k.codes"].numel() == 3 * 2 * n * d * 2 // 8
    dec = build(method, keys="pre", block=n).decode(enc, layer)  # a fresh instance: arrays + meta suffice
    assert dec.k_pre[..., 2 * n:, :].equal(x[..., 2 * n:, :].half().float())  # fp16 tail
    assert torch.allclose(dec.k, apply_rope(dec.k_pre, torch.arange(T), rope, 0))
    assert rel_mse(dec.k_pre, x) < 0.05 and rel_mse(dec.v, v) < 0.15  # 2-bit TQ on white noise: ~0.12
    assert enc.nbits() == sum(a.numel() * a.element_size() * 8 for a in enc.arrays.values())
    per_head = comp.head_bits(enc, layer)  # ragged factors are charged to the heads that hold them
    assert float(per_head["k"].sum()) == pytest.approx(enc.nbits("k."))
    assert per_head["k"][0] < per_head["k"][1] < per_head["k"][2]


def test_svdq_is_rank_matched_with_unshrunk_values():
    x = spiked(4, 128, 64, [5.0, 3.0, 2.0])
    layer = layer_of(x, x.clone())
    e, s = build("eoptshrinkq", keys="post").encode(layer), build("svdq", keys="post").encode(layer)
    assert e.arrays["k.ranks"].equal(s.arrays["k.ranks"])
    assert (s.arrays["k.weights"] > e.arrays["k.weights"]).all()  # shrinkage pulls every phi below y
    assert e.nbits() == s.nbits()


def test_eoptshrinkq_beats_turboquant_by_the_predicted_margin():
    """docs/methods.md#oracle-energy-bits: saving at equal MSE = 1/2 log2(1/(1 - rho)) - factor overhead."""
    n = d = 128
    x = spiked(8, n, d, [14.0, 10.0, 8.0], seed=1)  # rho ~ 0.74 per block
    enc = build("eoptshrinkq", keys="post").encode(layer_of(x, x.clone()))
    x_hat = build("eoptshrinkq", keys="post").decode(enc, layer_of(x, x.clone())).v
    mse, bpe = rel_mse(x_hat, x), enc.nbits("v.") / x.numel()
    rotation = make_rotation("haar", d, 7)
    tq = {b: rel_mse(tq_mse_decode(*tq_mse_encode(x, b, rotation, tq_codebook(d, b)), rotation,
                                   tq_codebook(d, b)), x) for b in (2, 3, 4)}
    lo = max(b for b in tq if tq[b] >= mse)  # log2 MSE is ~linear in bits: interpolate
    b_equal = lo + math.log2(tq[lo] / mse) / math.log2(tq[lo] / tq[lo + 1])
    saving = b_equal + 16 / d - bpe  # both sides pay the fp16 norms
    shrinkage = eoptshrink(x[0])
    rho = 1 - shrinkage.residual(x[0]).square().sum() / x.square().sum()
    predicted = float(predicted_bit_saving(rho, shrinkage.rank.double().mean(), n, d))
    assert 0.6 < predicted < 0.9
    assert saving == pytest.approx(predicted, abs=0.1)
    assert mse < tq[3]  # 2-bit residual + factors (~2.33 bpe) beats plain 3-bit TurboQuant


@pytest.mark.parametrize("params,message", [
    ({"bits": 0}, "eoptshrinkq: --bits must be in [1, 8], got 0"),
    ({"factor_bits": 9}, "eoptshrinkq: --factor-bits must be in [1, 8], got 9"),
    ({"block": 2}, "eoptshrinkq: --block 2 at head_dim 64: min(n, d) = 2: the eoptshrinkq rank rule needs at least 3"),
    ({"block": 0}, "eoptshrinkq: --block must be >= 1, got 0")])
def test_impossible_options_fail(params, message):
    x = spiked(1, 128, 64, [])
    with pytest.raises(KvcError, match="^" + re.escape(message)):
        build("eoptshrinkq", keys="post", **params).validate(layer_of(x, x))


@pytest.mark.parametrize("method", ["eoptshrinkq", "svdq"])
def test_rank_zero_layer_is_plain_residual_turboquant(method):
    """A layer of pure noise: no block has a spike, so the codec is TurboQuant-mse of the blocks alone."""
    n, d = 128, 64
    x = spiked(2, 2 * n, d, [], seed=4)
    enc = build(method, keys="post", block=n).encode(layer_of(x, x.clone()))
    assert not enc.arrays["v.ranks"].any() and enc.arrays["v.weights"].numel() == 0
    assert enc.arrays["v.u_codes"].numel() == enc.arrays["v.v_codes"].numel() == 0
    assert enc.bits_paper == 2.0  # b + r (n + d) b_f / (n d) at r = 0
    decoded = build(method, keys="post", block=n).decode(enc, layer_of(x, x.clone())).v
    rotation = make_rotation("haar", d, enc.meta["v"]["seed"])
    codebook = tq_codebook(d, 2)
    plain = tq_mse_decode(*tq_mse_encode(x, 2, rotation, codebook), rotation, codebook)
    assert torch.allclose(decoded, plain, rtol=0, atol=1e-6)
    assert 0.05 < rel_mse(decoded, x) < 0.15  # 2-bit TurboQuant on white noise: ~0.12
