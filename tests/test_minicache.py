"""MiniCache: SLERP, the retention rule, the pairs and the stored bits against closed forms on
synthetic captures (docs/methods.md#minicache)."""

from __future__ import annotations

import math

import pytest
import torch

import kvc
from kvc.compression.methods.minicache import retained, slerp
from kvc.io.safetensors import save_safetensors
from kvc.model.synth import SpikedSpec, synthesize

S, H, T, D = 1, 2, 64, 16


def _capture(tmp_path, second, num_layers=2):
    """A capture whose layer 1 K and V are ``second(layer 0's)``; the other layers as synthesized."""
    tensors, meta = synthesize(SpikedSpec(num_layers=num_layers, num_kv_heads=H, num_heads=2 * H, head_dim=D,
                                          seq_len=T, seed=4))
    for name in ("k", "v"):
        tensors[f"layers.1.{name}"] = second(tensors[f"layers.0.{name}"].double()).float()
    path = tmp_path / "pair.safetensors"
    save_safetensors(path, tensors, meta.to_strings())
    return path


def test_slerp_closed_form():
    a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    for t in (0.0, 0.3, 0.5, 0.6, 1.0):  # orthogonal: the point at angle t * pi/2 from a
        want = torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2), 0.0], dtype=torch.float64)
        assert torch.allclose(slerp(a, b, t), want, atol=1e-12)
    c = torch.tensor([math.cos(1.0), math.sin(1.0), 0.0], dtype=torch.float64)  # 1 radian apart
    assert torch.allclose(slerp(a, c, 0.25), torch.tensor([math.cos(0.25), math.sin(0.25), 0.0],
                                                          dtype=torch.float64), atol=1e-12)
    assert torch.allclose(slerp(a, a, 0.6), a)  # identical directions: the limit, no 0/0


def test_retention_rule_closed_form():
    """Token k of b is a turned by theta_k = k pi / (T - 1) in a plane: d_k = k / (T - 1), d_min = 0,
    d_max = 1, so gamma keeps the tokens with k / (T - 1) > gamma."""
    theta = torch.arange(T, dtype=torch.float64) * math.pi / (T - 1)
    a = torch.zeros(S, H, T, D, dtype=torch.float64)
    a[..., 0] = 2.0
    b = torch.zeros_like(a)
    b[..., 0], b[..., 1] = 3 * torch.cos(theta), 3 * torch.sin(theta)
    for gamma in (0.05, 0.5, 0.9):
        keep = retained(a, b, gamma)
        want = torch.arange(T) / (T - 1) > gamma
        assert torch.equal(keep, want.expand(S, H, T))


def test_pairs_from_the_middle():
    mc = kvc.method("minicache")
    assert mc.groups(list(range(6)), 6) == [[0], [1], [2], [3, 4], [5]]
    assert mc.groups(list(range(7)), 7) == [[0], [1], [2], [3, 4], [5, 6]]
    assert kvc.method("minicache", start=0).groups([0, 1, 2, 4, 5], 6) == [[0, 1], [2], [4, 5]]
    assert mc.groups([0, 10, 20, 29], 30) == [[0], [10], [20], [29]]


def test_parallel_layers_merge_exactly_and_bits_are_counted(tmp_path):
    """Layer 1 = a positive per-token multiple of layer 0: every angular distance is 0, no token is
    retained, the shared direction is layer 0's and both layers come back to fp16 precision. Bits:
    layer 0 stores direction (D fp16) + magnitude (fp16) per token and the counts (int32 per
    sequence and head), layer 1 its magnitudes, for K and V."""
    scale = torch.linspace(0.5, 2.0, T, dtype=torch.float64)[:, None]
    result = kvc.compress(_capture(tmp_path, lambda x: x * scale), "minicache", start=0)
    summary = result.summary
    assert summary["k"]["mse_rel"] < 1e-6 and summary["v"]["mse_rel"] < 1e-6
    entries = S * H * T * D
    first = 2 * (S * H * T * (D + 1) * 16 + S * H * 32)
    second = 2 * (S * H * T * 16)
    assert result.bits_per_entry == pytest.approx((first + second) / (2 * 2 * entries))
    layers = {r["layer"]: r["bits_per_entry"] for r in result.heads if r["tensor"] == "kv"}
    assert layers[0] == pytest.approx(first / (2 * entries)) and layers[1] == pytest.approx(second / (2 * entries))


def test_retained_tokens_are_exact_and_counted(tmp_path):
    """Layer 1 = layer 0 with the sign of the last 8 tokens flipped: those are at distance 1, the rest
    at 0, so any gamma < 1 retains exactly those 8 (stored in fp16 in both layers, their int16
    positions once) and merges the rest exactly."""
    sign = torch.ones(T, 1, dtype=torch.float64)
    sign[-8:] = -1
    capture = _capture(tmp_path, lambda x: x * sign)
    result = kvc.compress(capture, "minicache", start=0, gamma=0.5, keep=True)
    assert result.summary["k"]["mse_rel"] < 1e-6 and result.summary["v"]["mse_rel"] < 1e-6
    merged, kept = T - 8, 8
    per_part_first = S * H * (merged * (D + 1) * 16 + kept * (D * 16 + 16) + 32)
    per_part_second = S * H * (merged * 16 + kept * D * 16)
    assert result.array_bytes * 8 == 2 * (per_part_first + per_part_second)
    # the compressed file decodes to the same reconstruction
    saved = result.save(tmp_path / "mc.kvcz")
    back = kvc.decompress(saved, tmp_path / "back.safetensors")
    original = kvc.load(capture)
    for layer in (0, 1):
        assert torch.allclose(back.tensor(layer, "v"), original.tensor(layer, "v"), rtol=2e-3, atol=1e-3)


def test_unmergeable_layers_lose_the_orthogonal_part(tmp_path):
    """Layer 1 orthogonal to layer 0 token by token, equal norms, no retention (gamma = 1): the
    shared direction e sits at angle t pi/2 from layer 0's direction u and (1 - t) pi/2 from layer 1's,
    so the relative error |u - e|^2 is 2 - 2 cos(t pi/2) for layer 0 and 2 - 2 cos((1 - t) pi/2) for
    layer 1."""

    def orthogonal(x):
        y = torch.roll(x, 1, dims=-1)
        y = y - (y * x).sum(-1, keepdim=True) / (x * x).sum(-1, keepdim=True) * x
        return y * x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True)

    t = 0.6
    result = kvc.compress(_capture(tmp_path, orthogonal), "minicache", start=0, gamma=1.0, t=t)
    mse = {r["layer"]: r["mse_rel"] for r in result.heads if r["tensor"] == "v"}
    assert mse[0] == pytest.approx(2 - 2 * math.cos(t * math.pi / 2), rel=1e-3)
    assert mse[1] == pytest.approx(2 - 2 * math.cos((1 - t) * math.pi / 2), rel=1e-3)


def test_groups_that_skip_or_reorder_layers_fail_loudly():
    from kvc.compression import engine
    from kvc.errors import MethodFailure

    class Skips(type(kvc.method("minicache"))):
        def groups(self, layers, num_layers):
            return [[layers[1], layers[0]]]

    with pytest.raises(MethodFailure, match=r"grouped layers \[0, 1\] as \[\[1, 0\]\]"):
        engine.groups(Skips(), [0, 1], 2)
    assert engine.groups(kvc.method("minicache", start=0), [0, 1, 2], 3) == [[0, 1], [2]]
