"""kvc records and scores what the model really computes, on tiny random models of every family.

Each family comes with a tokenizer of its own kind that adds the special tokens its real
checkpoints add (BOS for Llama/Mistral/Phi-3/Gemma, none for Qwen and GPT-2, [CLS] ... [SEP] for
BERT). Checked against transformers itself: the windows' framing, the attention output of every
layer (sliding-window layers with contexts longer than the window, and a bidirectional encoder),
and the perplexity that ``kvc eval`` reports for an uncompressed cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import string

import pytest
import torch
import transformers

from kvc.attention import AttentionSpec
from kvc.io.capture import CaptureFile
from kvc.metrics.fidelity import attention_output, layer_metrics
from kvc.model.text import Corpus
from kvc.eval.evaluate import Settings, continuation_logprobs, evaluate, prefill, uncompressed_cache
from kvc.compression.registry import build

TOKENS, SEQS, WINDOW = 24, 2, 8  # contexts three times the sliding window
COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=256, attn_implementation="sdpa")
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
TEXT = ("The keys and values of every earlier token stay in the cache. " * 40).strip()


def _vocab(specials: list[str], space: str) -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(specials)}
    for c in [*CHARS, space]:
        vocab.setdefault(c, len(vocab))
    return vocab


def _llama_tokenizer():  # sentencepiece-style BPE, BOS added like Llama/Mistral/Phi-3 checkpoints
    return transformers.LlamaTokenizer(vocab=_vocab(["<unk>", "<s>", "</s>"], "▁"), merges=[],
                                       add_bos_token=True)


def _gemma_tokenizer():
    return transformers.GemmaTokenizer(vocab=_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], "▁"),
                                       merges=[], add_bos_token=True)


def _byte_level_tokenizer(cls):  # Qwen2 and GPT-2 add no special token
    return lambda: cls(vocab=_vocab(["<|endoftext|>"], "Ġ"), merges=[])


def _bert_tokenizer():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits,
             *string.punctuation, "the", "keys", "and", "values", "of", "every", "token", "cache"]
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(words))})


def _model(name):
    if name == "llama":  # GQA 4:2
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32))
    if name == "mistral":  # MQA, sliding window on every layer, shorter than the context
        return transformers.MistralForCausalLM(transformers.MistralConfig(
            **COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=WINDOW))
    if name == "qwen2":  # sliding layers above max_window_layers
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **COMMON, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
            sliding_window=WINDOW, max_window_layers=1))
    if name == "qwen3":  # QK-norm
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **COMMON, num_attention_heads=2, num_key_value_heads=1, head_dim=64))
    if name == "gemma3":  # QK-norm, sliding + global layers, logit scale from query_pre_attn_scalar
        return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=WINDOW,
            query_pre_attn_scalar=48, layer_types=["sliding_attention", "full_attention"]))
    if name == "phi3":  # partial rotary
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(
            **COMMON, num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5,
            pad_token_id=0))
    if name == "gpt2":  # no RoPE
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=160, n_embd=64, n_layer=2, n_head=4, n_positions=256, attn_implementation="sdpa"))
    if name == "bert":  # encoder: bidirectional attention, absolute positions
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, attn_implementation="sdpa"),
            add_pooling_layer=False)
    raise KeyError(name)


TOKENIZERS = {"llama": _llama_tokenizer, "mistral": _llama_tokenizer, "phi3": _llama_tokenizer,
              "gemma3": _gemma_tokenizer, "qwen2": _byte_level_tokenizer(transformers.Qwen2Tokenizer),
              "qwen3": _byte_level_tokenizer(transformers.Qwen2Tokenizer),
              "gpt2": _byte_level_tokenizer(transformers.GPT2Tokenizer), "bert": _bert_tokenizer}
FRAMING = {"llama": (["<s>"], []), "mistral": (["<s>"], []), "phi3": (["<s>"], []), "gemma3": (["<bos>"], []),
           "qwen2": ([], []), "qwen3": ([], []), "gpt2": ([], []), "bert": (["[CLS]"], ["[SEP]"])}
# where each family's attention output (before the output projection) enters the model again
ATTENTION_OUT = {"gpt2": "attn.c_proj", "bert": "attention.output.dense"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> directory holding the family's tiny model and tokenizer, as a user would have it."""
    cache = {}
    transformers.utils.logging.disable_progress_bar()

    def _saved(name):
        if name not in cache:
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(name)
            _model(name).save_pretrained(path)
            TOKENIZERS[name]().save_pretrained(path)
            cache[name] = path
        return cache[name]

    return _saved


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def _capture(run, saved, text_file, tmp_path, name, *extra, file=None):
    path = tmp_path / (file or f"{name}.safetensors")
    code, _, err = run("capture", "--model", saved(name), "--text", text_file, "--seq-len", TOKENS,
                       "--num-seqs", SEQS, "--device", "cpu", "-o", path, *extra)
    assert code == 0, err
    return CaptureFile(path)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_windows_framed_like_the_tokenizer(name, run, saved, text_file, tmp_path):
    tokenizer = TOKENIZERS[name]()
    prefix, suffix = (tokenizer.convert_tokens_to_ids(t) for t in FRAMING[name])
    cap = _capture(run, saved, text_file, tmp_path, name)
    ids = cap.input_ids
    bare = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    body = TOKENS - len(prefix) - len(suffix)
    expected = torch.tensor([prefix + bare[i * body:(i + 1) * body] + suffix for i in range(SEQS)])
    torch.testing.assert_close(ids, expected, rtol=0, atol=0)
    assert cap.meta.special_tokens == {"added": True, "prefix": prefix, "suffix": suffix,
                                       "text": cap.meta.special_tokens["text"]}
    assert all(t in cap.meta.special_tokens["text"] for t in FRAMING[name][0] + FRAMING[name][1])
    plain = _capture(run, saved, text_file, tmp_path, name, "--no-special-tokens", file="bare.safetensors")
    torch.testing.assert_close(plain.input_ids, torch.tensor(bare[:SEQS * TOKENS]).view(SEQS, TOKENS))
    assert plain.meta.special_tokens["added"] is False


def _model_attention_outputs(model, ids, name) -> dict[int, torch.Tensor]:
    """Each layer's attention output [S, H_q, T, D] as the model computes it: the input of the
    projection that follows attention."""
    suffix = ATTENTION_OUT.get(name, "self_attn.o_proj")
    modules = [(n, m) for n, m in model.named_modules() if n.endswith(suffix)]
    outputs, handles = {}, []
    for layer, (_, module) in enumerate(modules):
        handles.append(module.register_forward_pre_hook(
            lambda _, args, layer=layer: outputs.__setitem__(layer, args[0].detach().clone())))
    with torch.inference_mode():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return outputs


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_attention_output_equals_the_model(name, run, saved, text_file, tmp_path):
    cap = _capture(run, saved, text_file, tmp_path, name)
    auto = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(saved(name), attn_implementation="sdpa").eval()
    own = _model_attention_outputs(model, cap.input_ids, name)
    positions = cap.q_positions
    for layer in cap.layers:
        spec = cap.meta.layer_attention(layer)
        assert spec.causal == (name != "bert")
        q, k, v = (cap.tensor(layer, t) for t in ("q", "k", "v"))
        ours = attention_output(q, k, v, positions, spec)
        S, Hq, T, D = ours.shape
        theirs = own[layer].view(S, T, Hq, D).transpose(1, 2)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        # the metrics measure against this same output: shifting V by c moves every output by c
        shift = torch.full((D,), 0.01)
        metrics = layer_metrics(k, k, v, v + shift, q, positions, spec=spec)["kv"]
        rows_per_head = S * (Hq // k.shape[1]) * T
        reference = theirs.double().square().reshape(S, k.shape[1], -1, T, D).sum((0, 2, 3, 4))
        expected = (rows_per_head * shift.double().square().sum() / reference).sqrt()
        torch.testing.assert_close(metrics["attn_out_rel"], expected, rtol=1e-4, atol=0)


def test_sliding_and_scaled_layers_recorded(run, saved, text_file, tmp_path):
    cap = _capture(run, saved, text_file, tmp_path, "gemma3")
    sliding, full = cap.meta.layer_attention(0), cap.meta.layer_attention(1)
    assert sliding == AttentionSpec(causal=True, sliding_window=WINDOW, scaling=48 ** -0.5)
    assert full == AttentionSpec(causal=True, sliding_window=None, scaling=48 ** -0.5)
    qwen = _capture(run, saved, text_file, tmp_path, "qwen2")
    assert [qwen.meta.layer_attention(L).sliding_window for L in (0, 1)] == [None, WINDOW]


@pytest.mark.parametrize("queries,window,exact", [("last:1", WINDOW, True), ("last:4", WINDOW + 3, True),
                                                  ("last:1", WINDOW - 1, False)])
def test_evicting_outside_the_window_is_lossless(queries, window, exact, run, saved, text_file, tmp_path):
    # a float16 model: the evicted cache keeps K and V in float16, so what it keeps is exact
    cap = _capture(run, saved, text_file, tmp_path, "mistral", "--query-positions", queries, "--dtype", "float16")
    out = tmp_path / "result.json"
    code, _, err = run("compress", cap.path, "--method", "streamingllm", "--sinks", 0, "--window", window,
                       "--json", out)
    assert code == 0, err
    kv = json.loads(out.read_text())["summary"]["kv"]
    if exact:
        assert kv["attn_out_rel"] == 0 and kv["attn_kl"] == 0
    else:  # one key the window still shows is gone
        assert kv["attn_out_rel"] > 1e-3 and kv["attn_kl"] > 1e-3


def test_encoder_analyzed_and_compressed_but_not_evicted(run, saved, text_file, tmp_path):
    cap = _capture(run, saved, text_file, tmp_path, "bert")
    code, _, err = run("analyze", cap.path, "--json", tmp_path / "analysis.json")
    assert code == 0, err
    assert json.loads((tmp_path / "analysis.json").read_text())["summary"]["layers"] == [0, 1]
    code, _, err = run("compress", cap.path, "--method", "snapkv")
    assert code == 2 and "bidirectional" in err and len(err.strip().splitlines()) == 1
    code, _, err = run("compress", cap.path, "--method", "turboquant", "--bits", 3)
    assert code == 0, err


@pytest.mark.parametrize("name", ["gemma3", "mistral", "qwen2"])
def test_eval_uncompressed_cache_is_the_models_own(name, saved):
    model = transformers.AutoModelForCausalLM.from_pretrained(saved(name), attn_implementation="sdpa").eval()
    tokenizer = TOKENIZERS[name]()
    context, continuation = 3 * WINDOW, 10  # sliding layers keep WINDOW - 1 of the context's tokens
    prefix = tokenizer.convert_tokens_to_ids(FRAMING[name][0])
    body = context + continuation + 1 - len(prefix)
    bare = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    windows = torch.tensor([prefix + bare[i * body:(i + 1) * body] for i in range(2)])
    with torch.inference_mode():
        own = model(input_ids=windows).logits[:, context:-1].float().log_softmax(-1)
    layers = prefill(model, windows[:, :context])
    fed = windows[:, context:-1]
    ours = continuation_logprobs(model, uncompressed_cache(layers, torch.float32), fed)
    torch.testing.assert_close(ours, own, rtol=0, atol=1e-5)
    # the check can fail: the same cache with full instead of sliding masks is far off
    full = [dataclasses.replace(l, attention=dataclasses.replace(l.attention, sliding_window=None)) for l in layers]
    assert (continuation_logprobs(model, uncompressed_cache(full, torch.float32), fed) - own).abs().max() > 1e-2

    settings = Settings(contexts=(context,), windows=2, continuation=continuation, retrieval=False)
    result = evaluate(model, tokenizer, Corpus(TEXT, "test"), [build("fp16")], settings)[0]
    targets = windows[:, context + 1:]
    own_ppl = math.exp(-float(own.gather(-1, targets[..., None]).sum()) / targets.numel())
    assert result["perplexity"]["ppl_base"] == pytest.approx(own_ppl, rel=1e-6)
    assert result["perplexity"]["ppl"] == pytest.approx(own_ppl, rel=1e-4)  # K, V stored in float16


def test_position_limits_checked_before_the_forward_pass(run, saved, text_file, monkeypatch):
    import kvc.model.capture

    monkeypatch.setattr(kvc.model.capture, "capture", lambda *a, **k: pytest.fail("capture ran"))
    code, _, err = run("capture", "--model", saved("bert"), "--text", text_file, "--seq-len", 65)
    assert code == 2 and "64 positions" in err and "max_position_embeddings" in err
    code, _, err = run("capture", "--model", saved("llama"), "--text", text_file, "--seq-len", 100000)
    assert code == 2 and "256 positions" in err


def test_eval_refuses_an_encoder_before_loading_it(run, saved, monkeypatch):
    import kvc.model.load

    monkeypatch.setattr(kvc.model.load, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    code, _, err = run("eval", "--model", saved("bert"), "--method", "fp16", "--contexts", "32")
    assert code == 2 and "encoder" in err and len(err.strip().splitlines()) == 1
    code, _, err = run("eval", "--model", saved("llama"), "--method", "fp16", "--contexts", "1024")
    assert code == 2 and "256 positions" in err
