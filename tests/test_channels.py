"""Per-channel statistics and outlier channels (kvc.channels), batched over heads."""

from __future__ import annotations

import math

import pytest
import torch

from kvc.channels import channel_stats, outlier_mask, rope_partner
from kvc.errors import KvcError
from kvc.synth import SpikedSpec, synthesize

F64 = torch.float64


def test_gaussian_channel_statistics():
    gen = torch.Generator().manual_seed(0)
    X = 2.0 * torch.randn(3, 20000, 8, generator=gen, dtype=F64)
    st = channel_stats(X)
    assert st.rms.shape == (3, 8)
    assert torch.allclose(st.rms, torch.full_like(st.rms, 2.0), rtol=0.02)
    assert torch.allclose(st.kurtosis, torch.full_like(st.kurtosis, 3.0), atol=0.15)  # Gaussian: 3
    # |x| of a zero-mean Gaussian is half-normal: CV = sqrt(pi/2 - 1)
    assert torch.allclose(st.magnitude_cv, torch.full_like(st.magnitude_cv, math.sqrt(math.pi / 2 - 1)), rtol=0.02)
    assert torch.allclose(st.max_abs, X.abs().amax(-2))
    assert torch.allclose(st.rms_ratio.median(-1).values, torch.ones(3, dtype=F64))


def test_heavy_tails_steady_magnitudes_and_constant_channels():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(20000, 4, generator=gen, dtype=F64)
    X[:, 1] = torch.distributions.Laplace(0.0, 1.0).sample((20000,)).to(F64)  # kurtosis 6
    X[:, 2] = 5.0 + 0.1 * X[:, 2]  # steady magnitude: tiny CV
    X[:, 3] = 7.0  # constant: kurtosis undefined
    st = channel_stats(X)
    assert st.kurtosis[1].item() == pytest.approx(6.0, rel=0.1)
    assert st.magnitude_cv[2].item() < 0.03 and st.magnitude_cv[3].item() == 0
    assert math.isnan(st.kurtosis[3].item())


def test_outliers_found_per_head_in_one_batched_call():
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(2, 3, 512, 64, generator=gen, dtype=F64)  # [seq, head, tokens, channels]
    planted = {(0, 0): [5], (0, 1): [], (0, 2): [1, 63], (1, 0): [7, 8, 9], (1, 1): [30], (1, 2): [0]}
    for (s, h), chans in planted.items():
        X[s, h, :, chans] *= 8.0
    mask = outlier_mask(channel_stats(X).rms)
    assert mask.shape == (2, 3, 64)
    for (s, h), chans in planted.items():
        assert mask[s, h].nonzero().flatten().tolist() == chans


def test_topk_mode_and_bad_arguments():
    rms = torch.tensor([[1.0, 9.0, 2.0, 8.0], [4.0, 3.0, 2.0, 1.0]], dtype=F64)
    assert outlier_mask(rms, topk=2).tolist() == [[False, True, False, True], [True, True, False, False]]
    assert not outlier_mask(rms, topk=0).any()
    assert outlier_mask(rms, factor=3.0).tolist() == [[False, True, False, True], [False] * 4]
    with pytest.raises(KvcError):
        outlier_mask(rms, topk=5)
    with pytest.raises(KvcError):
        outlier_mask(rms, factor=0)


def test_rope_partner():
    ch = torch.arange(64)
    full = rope_partner(ch, 64)
    assert full[3].item() == 35 and full[40].item() == 8
    assert torch.equal(full[full], ch)  # an involution
    partial = rope_partner(ch, 64, rotary_dims=32)  # channels past the rotary dims do not rotate
    assert partial[3].item() == 19 and partial[40].item() == 40


@pytest.mark.parametrize("noise", ["white", "colored"])
def test_synth_planted_outliers_found_exactly(noise):
    planted = [3, 17, 40]
    spec = SpikedSpec(num_layers=2, num_kv_heads=3, num_heads=6, head_dim=64, seq_len=256, num_seqs=2,
                      noise=noise, outlier_channels=planted, seed=5)
    tensors, _ = synthesize(spec)
    for layer in range(2):
        for name in ("k_pre", "v"):
            x = tensors[f"layers.{layer}.{name}"]  # [S, H, T, D]
            pooled = x.transpose(0, 1).reshape(3, -1, 64)
            rms = channel_stats(pooled).rms
            # white noise: the ratio rule; colored (channel variances 1..10): the top-k rule
            mask = outlier_mask(rms) if noise == "white" else outlier_mask(rms, topk=len(planted))
            for head in range(3):
                assert mask[head].nonzero().flatten().tolist() == planted, (layer, name, head)
