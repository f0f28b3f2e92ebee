"""Eviction methods (docs/methods.md#eviction): kept sets on constructed cases, budgets, bit accounting."""

from __future__ import annotations

import re

import pytest
import torch

from kvc.compression.protocol import LayerKV
from kvc.compression.registry import build
from kvc.compression.eviction import keep_count
from kvc.errors import KvcError
from kvc.rope import apply_rope

D = 16


def rope_meta(d: int = D) -> dict:
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    return {"style": "rotate_half", "theta": 10000.0, "inv_freq": inv_freq.tolist(),
            "attention_scaling": 1.0, "rotary_dims": d, "per_layer": {}}


def make_layer(k: torch.Tensor, q: torch.Tensor, layer: int = 0, num_layers: int = 1,
               rope: dict | None = None) -> LayerKV:
    """A layer from keys [S, H, T, D] and queries [S, H_q, T, D] at positions 0..T-1 (V random)."""
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(k.shape, generator=gen)
    return LayerKV(layer, k, v, q, torch.arange(q.shape[2]), rope=rope, num_layers=num_layers)


def random_layer(S=2, H=2, G=2, T=64, seed=0, **kw) -> LayerKV:
    gen = torch.Generator().manual_seed(seed)
    return make_layer(torch.randn(S, H, T, D, generator=gen), torch.randn(S, H * G, T, D, generator=gen), **kw)


def unit(i: int) -> torch.Tensor:
    return torch.eye(D)[i]


def kept_positions(keep: torch.Tensor) -> list[int]:
    return torch.nonzero(keep).flatten().tolist()


def test_streamingllm_keeps_sinks_and_window():
    layer = random_layer(T=64)
    keep = build("streamingllm", budget=0.25).select(layer)  # 16 tokens: 4 sinks + 12 recent
    expected = list(range(4)) + list(range(52, 64))
    assert all(kept_positions(keep[s, h]) == expected for s in range(2) for h in range(2))
    keep = build("streamingllm", sinks=2, window=10).select(layer)
    assert kept_positions(keep[0, 0]) == [0, 1] + list(range(54, 64))


def test_h2o_keeps_heavy_hitters_and_recent():
    T, heavy = 64, [3, 17, 29]
    k = 0.1 * torch.randn(1, 1, T, D, generator=torch.Generator().manual_seed(0))
    k[0, 0, heavy] = 10 * unit(0)
    q = (10 * unit(0)).expand(1, 2, T, D).clone()  # both query heads of the group attend the hitters
    keep = build("h2o", budget=6 / 64, recent=0.5).select(make_layer(k, q))
    assert kept_positions(keep[0, 0]) == heavy + [61, 62, 63]


def test_snapkv_keeps_what_the_window_attends_to():
    T, w = 64, 8
    gen = torch.Generator().manual_seed(0)
    k = 0.1 * torch.randn(1, 2, T, D, generator=gen)
    q = 0.1 * torch.randn(1, 4, T, D, generator=gen)
    k[0, 0, [10, 20]] = 10 * unit(0)  # KV head 0: query head 0 reads these ...
    k[0, 0, 30] = 10 * unit(1)  # ... and query head 1 this one (group average keeps all three)
    k[0, 1, [12, 25, 40]] = 10 * unit(2)  # KV head 1 (query heads 2, 3)
    k[0, :, 45] = 10 * unit(3)  # attended only by queries before the window: not kept
    q[0, :, : T - w] += 10 * unit(3)
    q[0, 0, T - w:] += 10 * unit(0)
    q[0, 1, T - w:] += 10 * unit(1)
    q[0, 2:, T - w:] += 10 * unit(2)
    layer = make_layer(k, q)
    window = list(range(T - w, T))
    keep = build("snapkv", budget=(3 + w) / T, window=w, kernel=1).select(layer)
    assert kept_positions(keep[0, 0]) == [10, 20, 30] + window
    assert kept_positions(keep[0, 1]) == [12, 25, 40] + window
    # kernel 5 pools each vote over +-2 tokens: the neighbourhoods of the attended tokens are kept
    keep = build("snapkv", budget=(15 + w) / T, window=w, kernel=5).select(layer)
    assert kept_positions(keep[0, 0]) == [j for c in (10, 20, 30) for j in range(c - 2, c + 3)] + window


def test_snapkv_window_shrinks_to_a_small_budget():
    keep = build("snapkv", budget=4 / 64, window=8).select(random_layer(T=64))
    assert (keep.sum(-1) == 4).all() and keep[..., 60:].all()


@pytest.mark.parametrize("method", ["streamingllm", "h2o", "snapkv"])
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 1.0])
def test_fixed_budgets_are_respected(method, budget):
    layer = random_layer(T=96)
    keep = build(method, budget=budget).select(layer)
    assert (keep.sum(-1) == keep_count(96, budget)).all()


def test_pyramidkv_budgets_decrease_linearly_and_average_the_budget():
    T, L, C, w = 512, 8, 128, 16
    counts = []
    for l in range(L):
        layer = random_layer(S=1, H=1, G=1, T=T, layer=l, num_layers=L)
        keep = build("pyramidkv", budget=C / T, window=w).select(layer)
        counts.append(int(keep.sum()))
    lo = (C - w) // 20
    hi = 2 * (C - w) - lo
    # the real schedule hi - l (hi - lo) / (L - 1) + w, each layer within one token of it
    assert all(abs(n - (hi - l * (hi - lo) / (L - 1) + w)) <= 1 for l, n in enumerate(counts))
    assert counts[0] == hi + w and counts[-1] == lo + w and sum(counts) == L * C
    # a pyramid that does not fit (max > T - w) falls back to the SnapKV budget
    layer = random_layer(S=1, H=1, G=1, T=T, layer=0, num_layers=L)
    assert int(build("pyramidkv", budget=0.75, window=w).select(layer).sum()) == keep_count(T, 0.75)


def test_gvote_budget_adapts_to_peaked_attention():
    T = 128
    gen = torch.Generator().manual_seed(0)
    q = 10 * unit(0) + 0.3 * torch.randn(1, 2, T, D, generator=gen)
    flat_k = 0.01 * torch.randn(1, 1, T, D, generator=gen)
    peaked_k = flat_k.clone()
    peaked_k[0, 0, 7] = 10 * unit(0)
    flat = build("gvote").select(make_layer(flat_k, q))
    peaked = build("gvote").select(make_layer(peaked_k, q))
    assert int(flat.sum()) >= 0.9 * T
    assert kept_positions(peaked[0, 0]) == [7]
    assert build("gvote").select(make_layer(peaked_k, q)).equal(peaked)  # deterministic under --seed


def test_gvote_samples_follow_the_queries_through_rope():
    T, rope = 32, rope_meta()
    c = torch.randn(D, generator=torch.Generator().manual_seed(0))
    q = apply_rope(c.expand(1, 2, T, D), torch.arange(T), rope, 0)  # one pre-RoPE query at every position
    layer = make_layer(torch.randn(1, 1, T, D), q, rope=rope)
    samples = build("gvote", samples=3).sample_queries(layer)
    expected = apply_rope(c.double().expand(3, D), torch.full((3,), T), rope, 0)
    assert torch.allclose(samples[0, 0, 0], expected, atol=1e-4)


@pytest.mark.parametrize("method", ["streamingllm", "h2o", "snapkv", "pyramidkv", "gvote", "knorm", "keydiff",
                                    "tova", "expected_attention", "adakv"])
def test_bits_are_kept_fraction_times_16_plus_indices(method):
    layer = random_layer(S=2, H=2, G=2, T=96, layer=1, num_layers=3)
    comp = build(method)
    enc = comp.encode(layer)
    dec = comp.decode(enc, layer)
    kept = int(dec.keep.sum())
    S, H, T, _ = layer.shape
    # K and V rows in fp16 + one int16 position per kept token + one int32 count per (seq, head)
    assert enc.nbits() == kept * (2 * D * 16 + 16) + S * H * 32
    bpe = enc.nbits() / (2 * layer.entries)
    fraction = kept / (S * H * T)
    assert bpe == pytest.approx(16 * fraction + 16 * fraction / (2 * D) + 32 / (2 * T * D))
    assert dec.keep.equal(comp.select(layer))
    assert dec.k[dec.keep].equal(layer.k[dec.keep].half().float())
    assert (dec.v[~dec.keep] == 0).all()


@pytest.mark.parametrize("method,params,message", [
    ("h2o", {"budget": 0.0}, "h2o: --budget must be in (0, 1], got 0"),
    ("h2o", {"recent": 1.5}, "h2o: --recent must be in [0, 1], got 1.5"),
    ("snapkv", {"budget": 1.5}, "snapkv: --budget must be in (0, 1], got 1.5"),
    ("snapkv", {"kernel": 4}, "snapkv: --kernel must be odd, got 4"),
    ("snapkv", {"kernel": -1}, "snapkv: --kernel must be >= 1, got -1"),
    ("snapkv", {"window": 0}, "snapkv: --window must be >= 1, got 0"),
    ("streamingllm", {"sinks": -1}, "streamingllm: --sinks must be >= 0, got -1"),
    ("streamingllm", {"window": -1}, "streamingllm: --window must be >= 0, got -1"),
    ("pyramidkv", {"beta": 0}, "pyramidkv: --beta must be >= 1, got 0"),
    ("gvote", {"nucleus": 0.0}, "gvote: --nucleus must be in (0, 1], got 0"),
    ("gvote", {"samples": 0}, "gvote: --samples must be >= 1, got 0"),
])
def test_impossible_options_fail(method, params, message):
    """Declared constraints are checked when the method is built, before any layer."""
    with pytest.raises(KvcError, match="^" + re.escape(message) + "$"):
        build(method, **params)
