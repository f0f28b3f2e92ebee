"""Shared fixtures: the CLI runner, synthetic captures, the real default model."""

from __future__ import annotations

import os

# One intra-op thread for the whole suite, child processes included, unless the caller chose: the
# tests' tensors are small, and on 2 shared cores two threads ran the suite twice as slowly (the
# barrier of every parallel region waits for a core); set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kvc.cli import main


@pytest.fixture
def run(capsys):
    """run(*args) -> (exit code, stdout, stderr) of ``kvc args``."""

    def _run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return _run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory of a tiny random Llama with its tokenizer, a text file)."""
    import string

    import transformers

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.utils.logging.disable_progress_bar()
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, attn_implementation="sdpa")
    ).save_pretrained(path)
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *string.printable[:95], "▁"])}
    transformers.LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True).save_pretrained(path)
    text = path.parent / "text.txt"
    text.write_text(("The keys and values of every earlier token stay in the cache. " * 60).strip())
    return path, text


@pytest.fixture
def synth_capture(tmp_path):
    """make(**spec) -> path of a synthetic capture written with kvc.model.synth."""
    from kvc.io.safetensors import save_safetensors
    from kvc.model.synth import SpikedSpec, synthesize

    def _make(name="synth.safetensors", **spec):
        tensors, meta = synthesize(SpikedSpec(**spec))
        path = tmp_path / name
        save_safetensors(path, tensors, meta.to_strings())
        return path

    return _make


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the real default model, SmolLM2-135M-Instruct, float32 on CPU."""
    from kvc.model.load import load_model, resolve_model

    torch.manual_seed(0)
    return load_model(resolve_model(None), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def default_capture(tmp_path_factory):
    """(path, stdout) of one ``kvc capture`` of the real default model, shared by the tests that read a
    capture of it: layers 0, 1 and 29, 2 sequences of 128 tokens, the last 16 queries."""
    import contextlib
    import io

    path = tmp_path_factory.mktemp("default-capture") / "real.safetensors"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["capture", "--layers", "0,1,29", "--seq-len", "128", "--num-seqs", "2",
                     "--query-positions", "last:16", "-o", str(path)])
    assert code == 0, err.getvalue()
    return path, out.getvalue()
