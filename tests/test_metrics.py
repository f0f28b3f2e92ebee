"""kvc.metrics.fidelity: closed-form cases and an explicit per-query-head reference."""

import math

import pytest
import torch

from kvc.metrics import fidelity as metrics
from kvc.metrics.fidelity import layer_metrics

S, H, G, T, D = 2, 2, 3, 24, 8


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(S, H, T, D, generator=gen, dtype=torch.float64) + 0.5  # a mean, as real keys have
    v = torch.randn(S, H, T, D, generator=gen, dtype=torch.float64)
    q = torch.randn(S, H * G, T, D, generator=gen, dtype=torch.float64)
    return k, v, q, torch.arange(T)


def reference(k, k_hat, v, v_hat, q, pos, keep=None):
    """Per KV head, looping over query heads with K/V repeated (the slow, obvious way)."""
    out = {n: torch.zeros(H, dtype=torch.float64) for n in ("bias", "kl", "out_err", "out_ref", "n", "rows", "kl_rows")}
    for qh in range(H * G):
        h = qh // G  # GQA: query head qh reads KV head qh // G
        for s in range(S):
            for i, p in enumerate(pos.tolist()):
                vis = torch.arange(T) <= p
                kept = vis if keep is None else vis & keep[s, h]
                x = k[s, h] @ q[s, qh, i]
                y = k_hat[s, h] @ q[s, qh, i]
                out["bias"][h] += (y - x)[kept].sum()
                out["n"][h] += kept.sum()
                prob = torch.softmax(x[vis] / math.sqrt(D), 0)
                o = prob @ v[s, h][vis]
                o_hat = torch.zeros(D, dtype=torch.float64)
                if kept.any():
                    prob_hat = torch.softmax(y[kept] / math.sqrt(D), 0)
                    o_hat = prob_hat @ v_hat[s, h][kept]
                    logp = torch.log_softmax(x[vis] / math.sqrt(D), 0)[kept[vis]]
                    out["kl"][h] += (prob_hat * (prob_hat.log() - logp)).sum()
                    out["kl_rows"][h] += 1
                out["out_err"][h] += (o_hat - o).square().sum()
                out["out_ref"][h] += o.square().sum()
    return {"attn_out_rel": (out["out_err"] / out["out_ref"]).sqrt(), "attn_kl": out["kl"] / out["kl_rows"]}


def test_identity_is_exact(data):
    k, v, q, pos = data
    m = layer_metrics(k, k, v, v, q, pos)
    for name in ("mse_rel", "ip_bias_rel", "ip_rmse_rel"):
        assert torch.equal(m["k"][name], torch.zeros(H, dtype=torch.float64)), name
    assert torch.allclose(m["k"]["ip_slope"], torch.ones(H, dtype=torch.float64))
    assert torch.equal(m["v"]["mse_rel"], torch.zeros(H, dtype=torch.float64))
    kv = m["kv"]
    for name in ("mse_rel", "attn_logit_rmse", "attn_kl", "attn_out_rel"):
        assert torch.allclose(kv[name], torch.zeros(H, dtype=torch.float64), atol=1e-12), name
    assert torch.allclose(kv["attn_topk_overlap"], torch.ones(H, dtype=torch.float64))


def test_doubled_keys(data):
    k, v, q, pos = data
    m = layer_metrics(k, 2 * k, v, v, q, pos)["k"]
    assert torch.allclose(m["mse_rel"], torch.ones(H, dtype=torch.float64))
    assert torch.allclose(m["ip_slope"], torch.full((H,), 2.0, dtype=torch.float64))
    assert torch.allclose(m["ip_rmse_rel"], torch.ones(H, dtype=torch.float64))
    # e = <q,2k> - <q,k> = x, so ip_bias_rel = mean(x) / mean|x| over the causal pairs
    x = torch.einsum("shgmd,shtd->shgmt", q.reshape(S, H, G, T, D), k)
    causal = torch.arange(T)[None, :] <= pos[:, None]
    x = x.masked_fill(~causal, 0)
    expected = x.sum((0, 2, 3, 4)) / x.abs().sum((0, 2, 3, 4))
    assert torch.allclose(m["ip_bias_rel"], expected)


def test_constant_value_shift(data):
    """Softmax rows sum to one, so V + c moves every output by c: attn_out_rel = |c| sqrt(rows) / |O|."""
    k, v, q, pos = data
    c = torch.linspace(-1, 1, D, dtype=torch.float64)
    m = layer_metrics(k, k, v, v + c, q, pos)["kv"]
    qg = q.reshape(S, H, G, T, D)
    logits = torch.einsum("shgmd,shtd->shgmt", qg, k) / math.sqrt(D)
    logits = logits.masked_fill(torch.arange(T)[None, :] > pos[:, None], float("-inf"))
    o = torch.einsum("shgmt,shtd->shgmd", logits.softmax(-1), v)
    expected = c.norm() * math.sqrt(S * G * T) / o.square().sum((0, 2, 3, 4)).sqrt()
    assert torch.allclose(m["attn_out_rel"], expected)
    assert torch.allclose(m["attn_kl"], torch.zeros(H, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(m["attn_topk_overlap"], torch.ones(H, dtype=torch.float64))


def test_gqa_causal_and_eviction_match_reference(data):
    k, v, q, _ = data
    gen = torch.Generator().manual_seed(1)
    k_hat = k + 0.3 * torch.randn(k.shape, generator=gen, dtype=torch.float64)
    v_hat = v + 0.3 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
    pos = torch.tensor([0, 3, 10, 23])
    keep = torch.rand(S, H, T, generator=gen) < 0.6
    keep[..., 0] = False  # the query at position 0 sees no kept key
    for kp in (None, keep):
        m = layer_metrics(k, k_hat, v, v_hat, q[:, :, pos], pos, kp)["kv"]
        ref = reference(k, k_hat, v, v_hat, q[:, :, pos], pos, kp)
        assert torch.allclose(m["attn_out_rel"], ref["attn_out_rel"]), kp is None
        assert torch.allclose(m["attn_kl"], ref["attn_kl"]), kp is None


def test_eviction_kl_is_minus_log_kept_mass(data):
    k, v, q, pos = data
    keep = torch.ones(S, H, T, dtype=torch.bool)
    keep[..., 5:9] = False
    m = layer_metrics(k, k, v, v, q, pos, keep)
    qg = q.reshape(S, H, G, T, D)
    p = (torch.einsum("shgmd,shtd->shgmt", qg, k) / math.sqrt(D)).masked_fill(
        torch.arange(T)[None, :] > pos[:, None], float("-inf")).softmax(-1)
    mass = (p * keep[:, :, None, None, :]).sum(-1)
    assert torch.allclose(m["kv"]["attn_kl"], -mass.log().mean((0, 2, 3)))
    assert torch.allclose(m["k"]["ip_slope"], torch.ones(H, dtype=torch.float64))  # kept keys are exact
    assert torch.all(m["k"]["mse_rel"] == 0)  # k_hat = k everywhere here; zeros would count


def test_chunking_does_not_change_results(data, monkeypatch):
    k, v, q, pos = data
    k_hat, v_hat = k * 1.1 + 0.05, v - 0.1
    whole = layer_metrics(k, k_hat, v, v_hat, q, pos)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", S * H * G * T * 5)  # 5 queries per chunk
    chunked = layer_metrics(k, k_hat, v, v_hat, q, pos)
    for t in whole:
        for name in whole[t]:
            assert torch.allclose(whole[t][name], chunked[t][name], rtol=1e-10, atol=1e-12), (t, name)
