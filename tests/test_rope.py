"""RoPE from capture metadata (kvc.rope) against transformers' own rotary modules; foreign files."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from kvc.errors import KvcError
from kvc.rope import apply_rope, default_inv_freq, rope_params


def _llama_rotary(theta: float, head_dim: int) -> LlamaRotaryEmbedding:
    return LlamaRotaryEmbedding(transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, head_dim=head_dim, rope_theta=theta))


@pytest.mark.parametrize("theta, head_dim", [(10000.0, 64), (500000.0, 128), (1e6, 96), (100000.0, 256)])
def test_derived_inv_freq_is_transformers_default(theta, head_dim):
    expected = _llama_rotary(theta, head_dim).inv_freq
    assert torch.equal(default_inv_freq(theta, head_dim), expected)
    inv_freq, scaling, dims = rope_params({"theta": theta, "rotary_dims": head_dim}, layer=0)
    assert torch.equal(inv_freq, expected) and scaling == 1.0 and dims == head_dim


def test_derived_partial_rotary_is_transformers_phi3():
    config = transformers.Phi3Config(hidden_size=256, num_attention_heads=4, partial_rotary_factor=0.5,
                                     rope_theta=20000.0)
    expected = Phi3RotaryEmbedding(config).inv_freq  # rotary dims 32 of head_dim 64
    inv_freq, _, dims = rope_params({"style": "rotate_half", "theta": 20000.0, "rotary_dims": 32}, layer=3)
    assert dims == 32 and torch.equal(inv_freq, expected)


def test_apply_rope_without_inv_freq_matches_transformers():
    theta, head_dim, T = 500000.0, 64, 40
    rotary = _llama_rotary(theta, head_dim)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, T, head_dim, generator=gen), torch.randn(2, 2, T, head_dim, generator=gen)
    positions = torch.arange(T)
    cos, sin = rotary(k, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    foreign = {"theta": theta, "rotary_dims": head_dim}  # no inv_freq, no attention_scaling
    assert torch.allclose(apply_rope(k, positions, foreign, 0), k_ref, atol=1e-6)
    assert torch.allclose(apply_rope(q, positions, foreign, 0), q_ref, atol=1e-6)
    assert torch.allclose(apply_rope(k_ref, positions, foreign, 0, inverse=True), k, atol=1e-5)


def test_per_layer_theta_override_derives_for_that_layer_only():
    stored = default_inv_freq(10000.0, 64) * 0.5  # a stored (scaled) table kvc must keep as is
    rope = {"theta": 10000.0, "inv_freq": stored.tolist(), "attention_scaling": 1.2, "rotary_dims": 64,
            "per_layer": {"1": {"theta": 1e6}, "2": {"rotary_dims": 32}}}
    inv0, s0, r0 = rope_params(rope, 0)
    assert torch.equal(inv0, stored) and (s0, r0) == (1.2, 64)
    inv1, s1, r1 = rope_params(rope, 1)
    assert torch.equal(inv1, _llama_rotary(1e6, 64).inv_freq) and (s1, r1) == (1.2, 64)
    inv2, _, r2 = rope_params(rope, 2)
    assert torch.equal(inv2, default_inv_freq(10000.0, 32)) and r2 == 32


@pytest.mark.parametrize("rope, message", [
    ({"rotary_dims": 64}, "needs inv_freq, or theta and rotary_dims"),
    ({"theta": 10000.0}, "needs inv_freq, or theta and rotary_dims"),
    ({"theta": -1.0, "rotary_dims": 64}, "theta must be a positive number"),
    ({"theta": "big", "rotary_dims": 64}, "theta must be a positive number"),
    ({"theta": 10000.0, "rotary_dims": 63}, "rotary_dims must be a positive even integer"),
    ({"inv_freq": [1.0, 0.5], "rotary_dims": 64}, "inv_freq has 2 entries"),
    ({"inv_freq": "x"}, "inv_freq must be a non-empty list"),
    ({"theta": 1e4, "rotary_dims": 8, "attention_scaling": 0}, "attention_scaling must be a positive"),
    ({"style": "interleaved", "theta": 1e4, "rotary_dims": 8}, "unsupported rope style"),
    ({"theta": 1e4, "rotary_dims": 8, "per_layer": []}, "per_layer"),
    ([1, 2], "JSON object"),
])
def test_malformed_rope_is_one_clear_error(rope, message):
    with pytest.raises(KvcError, match=message):
        rope_params(rope, 0)


def test_rotary_dims_beyond_head_dim_is_refused():
    with pytest.raises(KvcError, match="exceeds head_dim"):
        apply_rope(torch.zeros(1, 4, 16), torch.arange(4), {"theta": 1e4, "rotary_dims": 32}, 0)
