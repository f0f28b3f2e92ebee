"""kvc.model.hooks: one attention hook for capture, eval and kvc.compressing, over sdpa and eager."""

from __future__ import annotations

import pytest
import torch
import transformers

from kvc.compression.registry import build
from kvc.eval import evaluate as ev
from kvc.model.hooks import Hooks, LayersDone, Recorder, hooked

CONTEXT, FED, WINDOW = 24, 8, 8


def _mistral(attention: str):
    """A tiny Mistral (GQA 4:2, sliding window shorter than the context), the same weights every call."""
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=WINDOW,
        attn_implementation=attention)).eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, 160, (2, CONTEXT + FED), generator=torch.Generator().manual_seed(1))


def _logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_hooks_that_change_nothing_change_nothing(attention):
    model, ids = _mistral(attention), _ids()
    plain = _logits(model, ids)
    with hooked(model, Hooks()):
        assert model.config._attn_implementation == f"kvc_{attention}"
        torch.testing.assert_close(_logits(model, ids), plain, rtol=0, atol=0)
    assert model.config._attn_implementation == attention


class SelfOnly(Hooks):
    """Each query sees only its own key (a forward pass without cache: query i is key i)."""

    def attention(self, call):
        B, H, K, _ = call.key.shape
        return torch.eye(call.query.shape[2], K, dtype=torch.bool).expand(B, H, -1, -1)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_returned_mask_replaces_the_models(attention):
    """Seeing only itself, each token is predicted as if it were alone at its position."""
    model, ids = _mistral(attention), _ids()[:, :12]
    with hooked(model, SelfOnly()):
        ours = _logits(model, ids)
    with torch.inference_mode():
        alone = torch.cat([model(input_ids=ids[:, t:t + 1], position_ids=torch.full((2, 1), t)).logits
                           for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(ours, alone, rtol=0, atol=1e-5)
    assert (alone - _logits(model, ids)).abs().max() > 1e-2  # unlike the model's own mask


def test_eager_attends_through_the_cache_masks_like_sdpa():
    """The eager path turns each layer's bool mask into the additive mask eager expects."""
    ids = _ids()
    context, fed = ids[:, :CONTEXT], ids[:, CONTEXT:]
    results = {}
    for attention in ("sdpa", "eager"):
        model = _mistral(attention)
        layers = ev.prefill(model, context)
        # sinks + recent tokens of each sliding layer's tail: kept keys that are not contiguous
        compressed = ev.compress(build("streamingllm", sinks=2, window=3), layers, torch.float32)
        results[attention] = (ev.continuation_logprobs(model, ev.uncompressed_cache(layers, torch.float32), fed),
                              ev.continuation_logprobs(model, compressed.cache(), fed),
                              _logits(model, ids)[:, CONTEXT:].log_softmax(-1))
    uncompressed, compressed, own = results["eager"]
    torch.testing.assert_close(uncompressed, own, rtol=0, atol=1e-5)  # the model's own answer
    torch.testing.assert_close(compressed, results["sdpa"][1], rtol=0, atol=1e-5)
    assert (compressed - own).abs().max() > 1e-2  # the eviction shows: the comparison above can fail


def test_recorder_stops_after_its_last_layer_and_a_failed_block_restores_the_model():
    model, ids = _mistral("sdpa"), _ids()
    plain = _logits(model, ids)
    recorder = Recorder({0}, stop_after_last=True)
    with pytest.raises(LayersDone), hooked(model, recorder):
        _logits(model, ids)
    assert set(recorder.records) == {0} and set(recorder.specs) == {0}
    assert recorder.specs[0].sliding_window == WINDOW
    rec = recorder.records[0]
    assert rec["q"].shape == (2, 4, CONTEXT + FED, 32) and rec["k"].shape == rec["k_pre"].shape == (2, 2, CONTEXT + FED, 32)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(model, ids), plain, rtol=0, atol=0)


def test_a_model_is_hooked_once():
    model = _mistral("sdpa")
    with hooked(model, Hooks()):
        with pytest.raises(RuntimeError, match="^kvc hooks are already installed on this model$"):
            with hooked(model, Hooks()):
                pass
        assert model.config._attn_implementation == "kvc_sdpa"
    assert model.config._attn_implementation == "sdpa"


def test_recorder_keeps_only_the_named_tensors_and_they_are_the_full_recorders():
    """``names`` (eval's prefill: q and k_pre; K and V come from the model's cache) drops the other
    tensors and changes none it keeps; queries at ``q_positions`` as before."""
    model, ids, positions = _mistral("sdpa"), _ids(), torch.tensor([0, 5, CONTEXT + FED - 1])
    full, named = Recorder({0, 1}, positions), Recorder({0, 1}, positions, names=ev.PREFILL_TENSORS)
    for recorder in (full, named):
        with hooked(model, recorder):
            _logits(model, ids)
    for L in (0, 1):
        assert set(full.records[L]) == {"k", "v", "q", "k_pre", "q_pre"}
        assert set(named.records[L]) == {"q", "k_pre"}
        for name, tensor in named.records[L].items():
            torch.testing.assert_close(tensor, full.records[L][name], rtol=0, atol=0)
        assert named.records[L]["q"].shape == (2, 4, 3, 32)
    assert named.cos_sin.keys() == full.cos_sin.keys() and named.specs == full.specs


def test_prefill_takes_k_and_v_from_the_models_own_cache():
    """Eval's prefill (recording q and k_pre only) holds the cache the model itself builds."""
    from transformers.cache_utils import DynamicCache

    model, ids = _mistral("sdpa"), _ids()[:, :CONTEXT]
    layers = ev.prefill(model, ids)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **{ev.cache_argument(model): cache})
    for layer, own in zip(layers, cache.layers):
        torch.testing.assert_close(layer.k, own.keys, rtol=0, atol=0)
        torch.testing.assert_close(layer.v, own.values, rtol=0, atol=0)
        assert layer.q.shape[2] == layer.k_pre.shape[2] == layer.k.shape[2]  # the sliding layer's tail
