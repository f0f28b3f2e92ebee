"""The attention metrics and the eviction scores chunk their queries: the result is the unchunked
one, and no tensor of [queries x keys] for all heads at once is ever made (memory linear in tokens)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvc.attention import AttentionSpec
from kvc.compression import eviction
from kvc.metrics import fidelity

S, H, G, T, D = 1, 2, 3, 96, 16


class Largest(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@contextlib.contextmanager
def largest():
    mode = Largest()
    with mode:
        yield mode


def _layer(seed=0):
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(S, H, T, D, generator=gen) for _ in range(2))
    noise = [0.1 * torch.randn(S, H, T, D, generator=gen) for _ in range(2)]
    q = torch.randn(S, H * G, T, D, generator=gen)
    return k, k + noise[0], v, v + noise[1], q, torch.arange(T)


@pytest.mark.parametrize("spec", [AttentionSpec(), AttentionSpec(sliding_window=20, softcap=30.0)])
def test_layer_metrics_chunked_equal_unchunked_and_stay_small(monkeypatch, spec):
    k, k_hat, v, v_hat, q, pos = _layer()
    keep = torch.rand(S, H, T, generator=torch.Generator().manual_seed(1)) > 0.3
    monkeypatch.setattr(fidelity, "CHUNK_ELEMENTS", S * H * G * T * T)  # one chunk: every query at once
    whole = fidelity.layer_metrics(k, k_hat, v, v_hat, q, pos, keep, spec)
    monkeypatch.setattr(fidelity, "CHUNK_ELEMENTS", S * H * G * T * 8)  # 8 queries per chunk
    with largest() as mode:
        chunked = fidelity.layer_metrics(k, k_hat, v, v_hat, q, pos, keep, spec)
    for row in whole:
        for name, value in whole[row].items():
            assert torch.allclose(chunked[row][name], value, rtol=1e-12, atol=1e-15), (row, name)
    # the inputs, or a chunk of logits; the logits of all queries would be 12x a chunk
    assert mode.numel <= max(q.numel(), S * H * G * 8 * T) < S * H * G * T * T


def test_attention_mass_chunked_equals_unchunked_and_stays_small(monkeypatch):
    k, _, _, _, q, pos = _layer(2)
    qg = fidelity.grouped(q, H)
    monkeypatch.setattr(eviction, "QUERY_CHUNK", T)
    whole = eviction.attention_mass(qg, k, pos, AttentionSpec())
    monkeypatch.setattr(eviction, "QUERY_CHUNK", 16)
    with largest() as mode:
        chunked = eviction.attention_mass(qg, k, pos, AttentionSpec())
    assert torch.allclose(chunked, whole, rtol=1e-6, atol=1e-7)
    assert mode.numel <= max(q.numel(), S * H * G * 16 * T) < S * H * G * T * T  # inputs, or one block of 16 queries
