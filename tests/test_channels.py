"""Per-channel statistics and outlier channels (kvc.analysis.channels), batched over heads."""

from __future__ import annotations

import math
import re
import statistics

import pytest
import torch

from kvc.analysis.channels import BAND_MIN, band_mask, channel_runs, channel_stats, median, outlier_mask, rope_partner
from kvc.errors import KvcError
from kvc.model.synth import SpikedSpec, synthesize

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
    assert torch.allclose(torch.quantile(st.rms_ratio, 0.5, dim=-1), torch.ones(3, dtype=F64))  # d = 8: even


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
    # medians 5 and 2.5 (means of the two middle values): thresholds 7.5 and 3.75
    assert outlier_mask(rms, factor=1.5).tolist() == [[False, True, False, True], [True, False, False, False]]
    with pytest.raises(KvcError, match=re.escape("--outlier-topk must lie in 0..4, got 5")):
        outlier_mask(rms, topk=5)
    with pytest.raises(KvcError, match=re.escape("--outlier-factor must be > 0, got 0")):
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


def test_median_is_the_true_median_for_even_counts():
    # sorted [1, 1, 1, 2, 4, 8]: torch's lower median is 1, the median is (1 + 2) / 2 = 1.5
    rms = torch.tensor([[8.0, 1.0, 2.0, 1.0, 4.0, 1.0], [3.0, 1.0, 2.0, 7.0, 5.0, 6.0]], dtype=F64)
    assert rms.median(-1).values.tolist() == [1.0, 3.0]  # what the rule used to divide by
    expected = [statistics.median(row) for row in rms.tolist()]
    assert median(rms).tolist() == expected == [1.5, 4.0]
    assert median(torch.tensor([5.0, 1.0, 3.0])).item() == 3.0  # odd count: the middle value
    # channel 0 (rms 8) is 8x the lower median but 5.3x the median: not an outlier at factor 6
    assert not outlier_mask(rms).any()
    ratio = channel_stats(torch.diag_embed(rms).mT * math.sqrt(6)).rms_ratio  # a matrix with those channel RMS
    assert torch.allclose(ratio, rms / torch.tensor([[1.5], [4.0]], dtype=F64))


def test_bands_are_runs_of_adjacent_flagged_channels():
    flags = torch.zeros(2, 3, 32, dtype=torch.bool)
    flags[0, 0, [2, 10, 11, 12, 13, 20, 21, 22, 24]] = True  # run of 4 at 10-13; runs of 3 and 1 are not bands
    flags[0, 1, 28:] = True  # a band touching the last channel
    flags[1, 2, :] = True  # every channel
    flags[1, 0, [0, 2, 4, 6, 8, 10]] = True  # alternating: no band
    bands = band_mask(flags)
    assert bands.shape == flags.shape and not (bands & ~flags).any()
    assert channel_runs(bands[0, 0].tolist()) == [[10, 13]]
    assert channel_runs(bands[0, 1].tolist()) == [[28, 31]]
    assert channel_runs(bands[1, 2].tolist()) == [[0, 31]]
    assert not bands[1, 0].any() and not bands[0, 2].any()
    assert channel_runs((flags[0, 0] & ~bands[0, 0]).tolist()) == [[2, 2], [20, 22], [24, 24]]
    assert BAND_MIN == 4 and channel_runs(band_mask(flags, min_run=3)[0, 0].tolist()) == [[10, 13], [20, 22]]
    assert not band_mask(torch.ones(3, dtype=torch.bool)).any()  # fewer channels than a band


@pytest.mark.parametrize("n", [1, 2, 3, 64, 65])
def test_median_is_torch_quantile(n):
    x = torch.randn(20, 3, n, generator=torch.Generator().manual_seed(n), dtype=F64)
    x[0, 0, 0] = float("nan")  # NaN propagates, as in torch.quantile
    for t in (x, x.float()):
        want = torch.quantile(t, 0.5, dim=-1)
        assert torch.equal(median(t).nan_to_num(7.0), want.nan_to_num(7.0))
        assert median(t, keepdim=True).shape == (20, 3, 1)
