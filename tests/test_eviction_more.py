"""Knorm, KeyDiff, TOVA, Expected Attention, AdaKV and ThinK (docs/methods.md#eviction) on planted
cases whose right answer is known; PyramidKV's budget met exactly."""

from __future__ import annotations

import math
import re

import pytest
import torch

from kvc.compression import engine
from kvc.compression.eviction import keep_count
from kvc.compression.registry import build, get
from kvc.errors import KvcError
from test_eviction import D, kept_positions, make_layer, random_layer, rope_meta, unit

GEN = torch.Generator().manual_seed(0)


def noise(*shape, scale=0.01):
    return scale * torch.randn(*shape, generator=GEN)


def test_knorm_keeps_the_lowest_key_norms():
    T, planted = 64, [5, 20, 33, 60]
    k = unit(0) + noise(1, 2, T, D)  # norm ~1
    k[0, 0, planted] *= 0.1
    k[0, 1, [7, 8]] *= 0.1
    k[0, 1, 9] *= 50  # a huge norm is never kept
    keep = build("knorm", budget=4 / T).select(make_layer(k, noise(1, 4, T, D)))
    assert kept_positions(keep[0, 0]) == planted
    assert {7, 8} <= set(kept_positions(keep[0, 1])) and 9 not in kept_positions(keep[0, 1])
    assert not build("knorm", budget=63 / T).select(make_layer(k, noise(1, 4, T, D)))[0, 1, 9]


def test_keydiff_keeps_the_keys_least_like_the_mean_direction():
    T, planted = 64, [3, 30, 50]
    k = (2 + torch.rand(1, 1, T, 1, generator=GEN)) * unit(0) + noise(1, 1, T, D)  # one direction
    k[0, 0, planted] = unit(1) + unit(2) * torch.tensor([[1.0], [-1.0], [0.5]])  # orthogonal to it
    keep = build("keydiff", budget=3 / T).select(make_layer(k, noise(1, 2, T, D)))
    assert kept_positions(keep[0, 0]) == planted


def test_tova_keeps_what_the_last_query_attends_to_over_all_heads():
    T = 64
    k = noise(1, 2, T, D)
    k[0, 0, [10, 40]] = 10 * unit(0)  # only KV head 0's group sees these ...
    q = noise(1, 4, T, D)
    q[0, :2, -1] = 10 * unit(0)  # ... from the last query; head 1's attention is flat
    q[0, :2, :-1] = 10 * unit(1)  # earlier queries look elsewhere: they do not count
    k[0, 0, 25] = 10 * unit(1)
    keep = build("tova", budget=3 / T).select(make_layer(k, q))
    assert kept_positions(keep[0, 0]) == [10, 40, 63]
    assert keep[0, 1].equal(keep[0, 0])  # one set for every head of the layer (head mean)


def expected_attention_reference(layer, sinks: int, future: int) -> torch.Tensor:
    """Independent form: explicit rotation matrices R_t (rotate_half layout) averaged over the next
    positions, explicit Gaussian fit, E[exp(s q.k)] = exp(s k.R mu + s^2/2 k^T R Sigma R^T k)."""
    S, H, T, Dh = layer.shape
    G = layer.q.shape[1] // H
    inv = torch.tensor(layer.rope["inv_freq"], dtype=torch.float64)
    R = torch.zeros(Dh, Dh, dtype=torch.float64)
    half = Dh // 2
    for t in range(T, T + future):
        c, s = torch.cos(t * inv), torch.sin(t * inv)
        Rt = torch.zeros(Dh, Dh, dtype=torch.float64)
        idx = torch.arange(half)
        Rt[idx, idx], Rt[idx + half, idx + half] = c, c
        Rt[idx, idx + half], Rt[idx + half, idx] = -s, s
        R += Rt / future
    scale = 1 / math.sqrt(Dh)
    out = torch.empty(S, H, T, dtype=torch.float64)
    for b in range(S):
        for h in range(H):
            probs = []
            for g in range(G):
                qs = []
                for i in range(sinks, T):
                    c, s = torch.cos(i * inv), torch.sin(i * inv)
                    Ri = torch.zeros(Dh, Dh, dtype=torch.float64)
                    idx = torch.arange(half)
                    Ri[idx, idx], Ri[idx + half, idx + half] = c, c
                    Ri[idx, idx + half], Ri[idx + half, idx] = -s, s
                    qs.append(Ri.T @ layer.q[b, h * G + g, i].double())  # undo RoPE
                Q = torch.stack(qs)
                mu, C = Q.mean(0), torch.cov(Q.T, correction=0)
                mu, C = R @ mu, R @ C @ R.T
                k = layer.k[b, h, sinks:].double()
                z = scale * k @ mu + scale ** 2 / 2 * torch.einsum("td,de,te->t", k, C, k)
                probs.append(z.softmax(0))
            score = torch.stack(probs).mean(0) * layer.v[b, h, sinks:].double().norm(dim=-1)
            out[b, h] = torch.cat([torch.full((sinks,), math.inf, dtype=torch.float64), score])
    return out


def test_expected_attention_matches_its_closed_form():
    layer = random_layer(S=1, H=2, G=2, T=24, rope=rope_meta())
    got = build("expected_attention", sinks=2, future=16).scores(layer)
    want = expected_attention_reference(layer, 2, 16).float()
    assert torch.allclose(got, want, rtol=1e-4)


def test_expected_attention_keeps_the_keys_the_query_statistic_points_at():
    T, planted = 64, [12, 31, 47]
    q = (5 * unit(0) + noise(1, 2, T, D, scale=0.1))  # mean along e0, no RoPE
    k = noise(1, 1, T, D, scale=0.1)
    k[0, 0, planted] = 3 * unit(0)
    k[0, 0, 50] = -3 * unit(0)  # anti-aligned: least expected attention
    layer = make_layer(k, q)
    layer.v = torch.nn.functional.normalize(layer.v, dim=-1)  # equal value norms
    keep = build("expected_attention", budget=7 / T, sinks=4).select(layer)
    assert kept_positions(keep[0, 0]) == [0, 1, 2, 3] + planted
    # the value norm weighs in: a planted token with a tiny value loses its place
    layer.v[0, 0, 31] *= 1e-4
    assert 31 not in kept_positions(build("expected_attention", budget=7 / T).select(layer)[0, 0])


def test_adakv_moves_budget_to_the_head_whose_scores_are_spread():
    T = 64  # count 16 per head, 32 in all
    k = unit(0) + noise(1, 2, T, D)  # head 0: every norm ~1
    k[0, 1] *= 10  # head 1: norms ~10 ...
    low = list(range(0, 60, 2))
    k[0, 1, low] *= 0.001  # ... but 30 tokens of tiny norm, which Knorm ranks above all of head 0
    layer = make_layer(k, noise(1, 4, T, D))
    counts = get("adakv+knorm")(get("adakv+knorm").Options(budget=0.25, alpha=0.0)).select(layer).sum(-1)
    assert counts.tolist() == [[2, 30]]
    keep = build("adakv+knorm", budget=0.25).select(layer)  # safeguard: floor(0.2 * 16) = 3 per head
    assert keep.sum(-1).tolist() == [[3, 29]]
    assert set(kept_positions(keep[0, 1])) <= set(low)


def test_adakv_bits_follow_the_unequal_head_counts():
    layer = random_layer(S=2, H=3, G=2, T=96)
    comp = build("adakv+h2o")
    encoded, decoded, bits = engine.encode_decode(comp, layer)
    counts = decoded.keep.sum(-1)
    assert int(counts.sum()) == 2 * 3 * keep_count(96, 0.25)  # the layer's budget, exactly
    rows = counts.sum(0).double() * D * 16
    side = (16 * counts.sum(0) + 32 * 2).double() / 2  # int16 positions + int32 counts
    assert torch.equal(bits["k"], rows + side) and torch.equal(bits["v"], rows + side)


def test_adakv_over_snapkv_keeps_every_window():
    layer = random_layer(S=1, H=2, G=2, T=256)
    keep = build("adakv", budget=0.5, window=16).select(layer)
    assert keep[..., -16:].all() and int(keep.sum()) == 2 * 128


def test_adakv_names():
    assert get("adakv+tova").name == "adakv+tova"
    assert get("adakv+knorm+int").name == "adakv+knorm+int"
    assert get("adakv+int").evictor_cls is get("adakv")  # Ada-SnapKV, then int on the kept tokens
    with pytest.raises(KvcError, match="adakv wraps an eviction method that scores tokens .*; "
                                       "streamingllm does not"):
        get("adakv+streamingllm")


def test_think_prunes_the_planted_low_magnitude_channels():
    T, pruned_k, pruned_q = 64, [1, 4, 9], [2, 12]
    k = torch.randn(1, 2, T, D, generator=GEN)
    q = torch.randn(1, 4, T, D, generator=GEN)
    k[..., pruned_k] *= 0.01  # keys small in these channels
    q[..., pruned_q] *= 0.01  # the queries ignore these, however large the keys are
    k[..., pruned_q] *= 10
    layer = make_layer(k, q)
    comp = build("think", ratio=5 / D, window=8)
    encoded = comp.encode(layer)
    channels = encoded.arrays["k.channels"]
    expected = [c for c in range(D) if c not in pruned_k + pruned_q]
    assert channels.tolist() == [[expected, expected]]
    decoded = comp.decode(encoded, layer)
    assert (decoded.k[..., pruned_k + pruned_q] == 0).all()
    assert decoded.k[..., expected].equal(k[..., expected].half().float())
    assert decoded.v.equal(layer.v.half().float())
    # bits: K holds D - 5 fp16 channels per token + one uint8 index per kept channel and head
    kept = D - 5
    assert encoded.nbits("k.") == 2 * T * kept * 16 + 2 * kept * 8
    assert encoded.nbits("v.") == 2 * T * D * 16


def test_snapkv_then_think_evicts_tokens_then_channels():
    T, w, ignored = 128, 8, [0, 5, 11]
    layer = random_layer(S=1, H=2, G=2, T=T)
    layer.q[..., T - w:, ignored] *= 0.001  # the window's queries ignore these channels ...
    layer.q[..., : T - w, :] *= 0.01
    layer.q[..., : T - w, ignored] = 1000.0  # ... earlier queries, which do not score, use them
    encoded, decoded, _ = engine.encode_decode(build("snapkv+think", budget=0.5, ratio=3 / D,
                                                     snapkv_window=w, think_window=w), layer)
    assert (decoded.keep.sum(-1) == 64).all()
    expected = [c for c in range(D) if c not in ignored]
    assert encoded.arrays["k.channels"].tolist() == [[expected, expected]]


@pytest.mark.parametrize("method", ["knorm", "keydiff", "tova", "expected_attention", "adakv",
                                    "adakv+tova"])
@pytest.mark.parametrize("budget", [0.1, 0.5, 1.0])
def test_new_methods_keep_the_budget(method, budget):
    layer = random_layer(T=96)
    keep = get(method)(get(method).Options(budget=budget)).select(layer)
    if method.startswith("adakv"):
        assert int(keep.sum()) == 2 * 2 * keep_count(96, budget)
    else:
        assert (keep.sum(-1) == keep_count(96, budget)).all()


@pytest.mark.parametrize("seed", range(40))
def test_pyramidkv_meets_the_budget_exactly(seed):
    gen = torch.Generator().manual_seed(seed)
    T = int(torch.randint(80, 4000, (1,), generator=gen))
    L = int(torch.randint(2, 40, (1,), generator=gen))
    budget = float(torch.rand(1, generator=gen)) * 0.6 + 0.02
    window = int(torch.randint(1, 80, (1,), generator=gen))
    comp = build("pyramidkv", budget=budget, window=window, beta=int(torch.randint(1, 30, (1,), generator=gen)))
    shell = random_layer(S=1, H=1, G=1, T=8)
    counts = [comp.count(shell.__class__(l, torch.zeros(1, 1, T, 1), torch.zeros(1, 1, T, 1),
                                         torch.zeros(1, 1, 0, 1), torch.arange(0), num_layers=L))
              for l in range(L)]
    assert sum(counts) == L * keep_count(T, budget)
    assert all(a >= b for a, b in zip(counts, counts[1:])) and 1 <= counts[-1] and counts[0] <= T


@pytest.mark.parametrize("method,params,message", [
    ("expected_attention", {"sinks": -1}, "expected_attention: --sinks must be >= 0, got -1"),
    ("expected_attention", {"future": 0}, "expected_attention: --future must be in [1, 1000000], got 0"),
    ("adakv", {"alpha": 1.5}, "adakv: --alpha must be in [0, 1], got 1.5"),
    ("think", {"ratio": 1.0}, "think: --ratio must be in [0, 1), got 1"),
    ("think", {"keys": "pre"}, "think: --keys must be one of post, got 'pre'"),
    ("knorm", {"budget": 0.0}, "knorm: --budget must be in (0, 1], got 0"),
])
def test_impossible_options_fail(method, params, message):
    with pytest.raises(KvcError, match="^" + re.escape(message) + "$"):
        build(method, **params)
