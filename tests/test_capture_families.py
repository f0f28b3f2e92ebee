"""kvc capture on tiny randomly initialised models of every supported family.

Each case checks: K and V are exactly what the model's own cache stores (GQA-native shapes),
RoPE applied to k_pre / q_pre reproduces k / q, and the metadata describes the model.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from kvc.model.capture import capture
from kvc.io.capture import CaptureFile
from kvc.rope import apply_rope

SEQS, TOKENS = 2, 24
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=256, attn_implementation="sdpa")


def _llama():  # GQA 4:2, head_dim 64 (explicit, != hidden/heads)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=64))


def _mistral():  # MQA, sliding window
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=128, sliding_window=8))


def _qwen2():  # GQA 2:1, head_dim = hidden / heads = 64
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **{**COMMON, "hidden_size": 256}, num_attention_heads=4, num_key_value_heads=2))


def _qwen3():  # QK-norm, head_dim 256
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **COMMON, num_attention_heads=2, num_key_value_heads=1, head_dim=256))


def _gemma3():  # QK-norm, sliding + full layers with different RoPE bases, head_dim 128
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=128, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"]))


def _phi3():  # partial rotary (half the channels), MHA, head_dim 64
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **{**COMMON, "hidden_size": 256}, num_attention_heads=4, num_key_value_heads=4,
        partial_rotary_factor=0.5, pad_token_id=0))


FAMILIES = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3,
            "gemma3": _gemma3, "phi3": _phi3}
SLIDING = {"mistral": (0, 1), "gemma3": (0,)}  # layers with a sliding window (8) shorter than TOKENS


def _capture(model, tmp_path, layers=(0, 1), q_positions=None):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (SEQS, TOKENS))
    positions = torch.arange(TOKENS) if q_positions is None else q_positions
    path = tmp_path / "cap.safetensors"
    capture(model.eval(), ids, path, meta={"model": "tiny", "text_source": "random",
                                           "text_sha256": ""},
            layers=list(layers), q_positions=positions, batch_size=1)
    return ids, CaptureFile(path)


def _cache_keys_values(model, ids):
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
    cache = out.cache if "cache" in out else out.past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capture_matches_cache_and_rope(family, tmp_path):
    torch.manual_seed(1)
    model = FAMILIES[family]()
    config = model.config
    ids, cap = _capture(model, tmp_path)
    cache = _cache_keys_values(model, ids)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert cap.meta.num_kv_heads == config.num_key_value_heads
    assert cap.meta.num_heads == config.num_attention_heads
    assert cap.meta.head_dim == head_dim
    assert cap.meta.architecture == type(model).__name__
    assert cap.has_rope
    positions = torch.arange(TOKENS)
    for layer in (0, 1):
        k, v = cap.tensor(layer, "k"), cap.tensor(layer, "v")
        assert k.shape == (SEQS, config.num_key_value_heads, TOKENS, head_dim)  # GQA-native
        cache_k, cache_v = cache[layer]  # a sliding-window layer's cache keeps only the last tokens
        kept = cache_k.shape[2]
        torch.testing.assert_close(k[:, :, -kept:], cache_k, rtol=0, atol=0)
        torch.testing.assert_close(v[:, :, -kept:], cache_v, rtol=0, atol=0)
        sliding = layer in SLIDING.get(family, ())
        assert cap.meta.layer_types[layer] == ("sliding_attention" if sliding else "full_attention")
        assert (kept < TOKENS) if sliding else (kept == TOKENS)
        for pre, post in (("k_pre", "k"), ("q_pre", "q")):
            rotated = apply_rope(cap.tensor(layer, pre), positions, cap.meta.rope, layer)
            torch.testing.assert_close(rotated, cap.tensor(layer, post), rtol=1e-5, atol=1e-5)
        assert cap.tensor(layer, "q").shape == (SEQS, config.num_attention_heads, TOKENS, head_dim)


def test_partial_rotary_leaves_other_channels(tmp_path):
    model = _phi3()
    _, cap = _capture(model, tmp_path)
    assert cap.meta.rope["rotary_dims"] == 32
    torch.testing.assert_close(cap.tensor(0, "k")[..., 32:], cap.tensor(0, "k_pre")[..., 32:])


def test_per_layer_rope_base_recorded(tmp_path):
    model = _gemma3()
    _, cap = _capture(model, tmp_path)
    assert cap.meta.layer_types == ["sliding_attention", "full_attention"]
    assert cap.meta.sliding_window == 8
    assert cap.meta.rope["per_layer"], "sliding and full layers of Gemma3 use different bases"


def test_query_positions_and_layer_subset(tmp_path):
    model = _llama()
    _, cap = _capture(model, tmp_path, layers=(1,), q_positions=torch.tensor([3, 20, 23]))
    assert cap.layers == [1]
    assert cap.tensor(1, "q").shape[2] == 3
    torch.testing.assert_close(cap.q_positions, torch.tensor([3, 20, 23]))


def test_model_without_rope_stores_k_v_q_only(tmp_path):
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    _, cap = _capture(model, tmp_path)
    assert not cap.has_rope and cap.meta.rope is None
    assert cap.names(0) == {"k", "v", "q"}
    with pytest.raises(Exception, match="k_pre"):
        cap.tensor(0, "k_pre")
