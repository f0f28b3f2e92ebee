"""kvc eval --decode-every: the cache recompressed every N continuation tokens, on a tiny random
GQA Llama; exact for a lossless method, StreamingLLM's closed form, every registered method runs."""

from __future__ import annotations

import pytest
import torch
import transformers

from kvc.compression.eviction import keep_count
from kvc.compression.registry import available, build
from kvc.errors import KvcError
from kvc.eval import evaluate as ev

PROMPT, CONTINUATION, EVERY = 40, 12, 4
# options that make a method fit 40-token layers of head_dim 16
FIT = {"kivi": dict(residual=8, group_size=8), "qjl": dict(group_size=8), "snapkv": dict(window=8),
       "pyramidkv": dict(window=8), "minicache": dict(gamma=0.5),
       "eoptshrinkq": dict(block=16), "svdq": dict(block=16)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, attn_implementation="sdpa",
                                      eos_token_id=None, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 128, (2, PROMPT + CONTINUATION), generator=torch.Generator().manual_seed(1))


def _decode(model, ids, compressor, every=EVERY):
    layers = ev.prefill(model, ids[:, :PROMPT])
    cache = ev.compress(compressor, layers, torch.float32).cache()
    res = ev.MethodResult()
    logp = ev.decoding_logprobs(model, compressor, cache, ids[:, PROMPT:], every, layers[0].rope, torch.float32, res)
    return logp, res, layers


def test_lossless_recompression_is_exact(model, ids):
    """Stored in float32 and recompressed every 4 tokens (keys before RoPE: undone and redone at the
    true positions), the continuation scores exactly as with the uncompressed cache in one pass."""
    from test_eval import ExactIdentity  # the float32 identity of the eval tests

    base_layers = ev.prefill(model, ids[:, :PROMPT])
    base = ev.continuation_logprobs(model, ev.uncompressed_cache(base_layers, torch.float32), ids[:, PROMPT:])
    logp, res, _ = _decode(model, ids, ExactIdentity())
    torch.testing.assert_close(logp, base, rtol=0, atol=2e-5)
    assert res.recompressions == CONTINUATION // EVERY - 1
    assert res.bits["decoding"][1] == 2 * 2 * 2 * 16 * 4 * sum(PROMPT + EVERY * i for i in (1, 2))
    # fp16 with keys before RoPE: each pass rounds to fp16 again, close to the baseline
    pre, _, _ = _decode(model, ids, build("fp16", keys="pre"))
    assert (pre - base).abs().max() < 2e-2


def test_streamingllm_recompression_is_streamingllm_on_every_token_seen(model, ids):
    """Re-evicting sinks + recent window at a budget b of the tokens seen keeps, after each block, the
    sinks and the most recent round(b * seen) - sinks tokens of everything seen so far."""
    method = build("streamingllm", budget=0.5, sinks=2)
    layers = ev.prefill(model, ids[:, :PROMPT])
    cache = ev.compress(method, layers, torch.float32).cache()
    seen = PROMPT
    for start in range(0, 8, EVERY):
        recorder = ev.Recorder(set(range(4)))
        block = ids[:, PROMPT + start:PROMPT + start + EVERY]
        with torch.inference_mode(), ev.hooked(model, ev.RecordingMasks(cache, recorder)):
            ev._forward(model, block, cache)
        compressed = ev.recompress(method, cache, recorder, layers[0].rope, torch.float32)
        seen += EVERY
        count = keep_count(seen, 0.5)
        want = list(range(2)) + list(range(seen - (count - 2), seen))
        for layer in compressed.layers:
            assert layer.valid is None and layer.length == seen
            assert layer.slots[0, 0].tolist() == want and layer.slots.eq(layer.slots[0, 0]).all()
        cache = compressed.cache()


@pytest.mark.parametrize("name", sorted(available()) + ["snapkv+turboquant"])
def test_every_method_decodes_with_recompression(model, ids, name):
    """Every registered method (and a combination) runs the recompressing decode through the audited
    engine path: finite scores, each recompression's bits counted."""
    compressor = build(name, **FIT.get(name, {}))
    logp, res, layers = _decode(model, ids, compressor)
    assert logp.shape == (2, CONTINUATION, 128) and torch.isfinite(logp).all()
    assert res.recompressions == 2 and res.bits["decoding"][0] > 0


def test_decode_every_is_checked():
    with pytest.raises(KvcError, match="--decode-every must be a positive integer"):
        ev.check(ev.Settings(decode_every=0))
    ev.check(ev.Settings(decode_every=1))


def test_cli_rejects_bad_decode_every(run):
    code, _, err = run("eval", "--method", "fp16", "--decode-every", "0")
    assert code == 2
    assert err.strip().splitlines() == ["kvc: error: --decode-every must be a positive integer (tokens), not 0"]
