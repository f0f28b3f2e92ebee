"""kvc.compressing: a method applied to the cache of model.generate after the prefill, on tiny random
Llama (GQA) and Mistral (sliding window shorter than the prompt) models."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache

from kvc.compression.registry import build
from kvc.errors import KvcError
from kvc.eval.generate import compressing
from kvc.eval import evaluate as ev

PROMPT, NEW, WINDOW = 24, 16, 8  # prompts three times the sliding window; generation slides past it too
COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=256, attn_implementation="sdpa", eos_token_id=None, pad_token_id=0)
GREEDY = dict(max_new_tokens=NEW, do_sample=False, output_scores=True, return_dict_in_generate=True)


def _model(name: str, dtype: torch.dtype):
    torch.manual_seed(0)
    if name == "llama":  # GQA 4:2
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32))
    else:  # MQA, sliding window on every layer
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            **COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=WINDOW))
    return model.to(dtype).eval()


def _prompts(batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 160, (batch, PROMPT), generator=torch.Generator().manual_seed(1))


def _scores(out) -> torch.Tensor:
    return torch.stack(out.scores)


def _assert_restored(model):
    assert model.config._attn_implementation == "sdpa"
    assert not model._forward_hooks and not model._forward_pre_hooks
    modeling = sys.modules[type(model).__module__]
    assert modeling.apply_rotary_pos_emb.__module__ == modeling.__name__  # not kvc's wrapper


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_lossless_method_generates_exactly_the_plain_tokens(name):
    # a float16 model caches K and V in float16, so the fp16 method stores them exactly
    model = _model(name, torch.float16)
    ids = _prompts()
    plain = model.generate(ids, **GREEDY)
    with compressing(model, "fp16") as state:
        ours = model.generate(ids, **GREEDY)
        beams = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
    torch.testing.assert_close(ours.sequences, plain.sequences, rtol=0, atol=0)
    torch.testing.assert_close(_scores(ours), _scores(plain), rtol=0, atol=1e-3)
    assert state.prefills == 2 and state.bits_per_entry == 16
    torch.testing.assert_close(beams, model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False),
                               rtol=0, atol=0)
    _assert_restored(model)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_lossy_method_changes_generation_and_the_block_restores_the_model(name):
    model = _model(name, torch.float16)
    ids = _prompts()
    plain = model.generate(ids, **GREEDY)
    with compressing(model, "streamingllm", sinks=0, window=4) as state:  # 4 of 24 prompt tokens kept
        lossy = model.generate(ids, **GREEDY)
    first = _scores(plain)[0]  # the first token comes from the prefill, before any compression
    torch.testing.assert_close(_scores(lossy)[0], first, rtol=0, atol=0)
    assert (_scores(lossy) - _scores(plain)).abs().max() > 0.1
    assert state.prefills == 1 and state.bits_per_entry < 16
    _assert_restored(model)
    after = model.generate(ids, **GREEDY)
    torch.testing.assert_close(after.sequences, plain.sequences, rtol=0, atol=0)
    torch.testing.assert_close(_scores(after), _scores(plain), rtol=0, atol=0)


@pytest.mark.parametrize("name, method, options", [
    ("llama", "turboquant", dict(bits=2)),
    # sinks + recent tokens of a sliding layer's tail: the kept keys are not contiguous, so only the
    # layer's own mask (absolute positions) shows each decoded token the keys of its window
    ("mistral", "streamingllm", dict(sinks=2, window=4)),
])
def test_generation_uses_the_cache_of_kvc_eval(name, method, options):
    """generate inside the block = kvc eval's prefill, compress and greedy decoding on its cache."""
    model = _model(name, torch.float32)
    ids = _prompts()
    with compressing(model, method, **options) as state:
        tokens = model.generate(ids, max_new_tokens=NEW, do_sample=False)[:, PROMPT:]
    compressed = ev.compress(build(method, **options), ev.prefill(model, ids), torch.float32)
    with torch.inference_mode():
        first = model(ids).logits[:, -1].argmax(-1, keepdim=True)
    expected = torch.cat([first, ev.greedy(model, compressed.cache(), first, NEW - 1)], dim=1)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    assert state.bits_per_entry == compressed.bits / compressed.entries
    # the check can fail: the uncompressed cache decodes other tokens
    plain = model.generate(ids, max_new_tokens=NEW, do_sample=False)[:, PROMPT:]
    assert not torch.equal(plain, tokens)


def test_refusals_leave_the_model_as_it_was():
    model = _model("llama", torch.float32)
    ids = _prompts()
    plain = model.generate(ids, max_new_tokens=4, do_sample=False)
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    with pytest.raises(KvcError, match="^kvc.compressing: padded batches are not supported"):
        with compressing(model, "fp16"):
            model.generate(ids, attention_mask=padded, max_new_tokens=4, do_sample=False)
    _assert_restored(model)
    torch.testing.assert_close(model.generate(ids, max_new_tokens=4, do_sample=False), plain, rtol=0, atol=0)

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, **{ev.cache_argument(model): cache})
        with pytest.raises(KvcError, match=f"^kvc.compressing: the cache already holds {PROMPT} tokens "
                                           "that were not compressed"):
            with compressing(model, "fp16"):
                model(input_ids=ids[:, :1], **{ev.cache_argument(model): cache})
    with pytest.raises(KvcError, match="^unknown method 'nope'"):
        with compressing(model, "nope"):
            pass
    with pytest.raises(KvcError, match="^turboquant: --variant must be one of mse, prod, got 'nope'$"):
        with compressing(model, "turboquant", variant="nope"):
            pass
    encoder = transformers.BertModel(transformers.BertConfig(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(KvcError, match="^kvc.compressing compresses the cache of a causal LM's generation; "
                                       "BertModel is not one$"):
        with compressing(encoder, "fp16"):
            pass
    _assert_restored(model)
