"""kvc capture / info on the real default model, the format's round trip, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kvc.model.capture import capture
from kvc.io.capture import FORMAT, CaptureFile, CaptureMeta
from kvc.model.text import load_corpus, token_windows
from kvc.rope import apply_rope


# ----------------------------------------------------------------------------- real default model


@pytest.mark.model
def test_rope_pairing_on_default_model(default_model, tmp_path):
    """RoPE(k_pre) = k and RoPE(q_pre) = q to float32 precision, and k = the model's own cache."""
    model, tokenizer = default_model
    ids = token_windows(tokenizer, load_corpus(None), 128, 2)
    layers = [0, 14, 29]
    path = tmp_path / "cap.safetensors"
    capture(model, ids, path, meta={"model": "SmolLM2-135M-Instruct", "text_source": "pydoc",
                                    "text_sha256": ""}, layers=layers, q_positions=torch.arange(128))
    cap = CaptureFile(path)
    assert (cap.meta.num_layers, cap.meta.num_heads, cap.meta.num_kv_heads, cap.meta.head_dim) == (30, 9, 3, 64)
    assert cap.meta.rope["theta"] == 100000 and cap.meta.rope["rotary_dims"] == 64
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
    cache = out.cache if "cache" in out else out.past_key_values
    positions = torch.arange(128)
    for layer in layers:
        k = cap.tensor(layer, "k")
        assert torch.equal(k, cache.layers[layer].keys)
        assert torch.equal(cap.tensor(layer, "v"), cache.layers[layer].values)
        for pre, post in (("k_pre", "k"), ("q_pre", "q")):
            target = cap.tensor(layer, post)
            rotated = apply_rope(cap.tensor(layer, pre), positions, cap.meta.rope, layer)
            scale = target.abs().max()
            assert (rotated - target).abs().max() <= 4 * torch.finfo(torch.float32).eps * scale


@pytest.mark.model
def test_capture_cli_on_default_model(run, default_capture, tmp_path):
    path, out = default_capture  # tests/conftest.py: kvc capture --layers 0,1,29 ... --query-positions last:16
    assert "SmolLM2" in out and "2 x 128" in out
    cap = CaptureFile(path)
    assert cap.layers == [0, 1, 29]
    assert cap.tensor(29, "q").shape == (2, 9, 16, 64)
    assert cap.meta.text_source == "python:pydoc_data.topics"
    assert cap.meta.model_revision.startswith("sha256:")
    code, out, _ = run("info", path, "--json")
    assert code == 0 and json.loads(out)["metadata"]["format"] == FORMAT
    code, _, err = run("capture", "--layers", "0", "--seq-len", "64", "--num-seqs", "2", "-o", path)
    assert code == 2 and "--force" in err  # no silent overwrite
    code, _, err = run("capture", "--seq-len", "64", "--num-seqs", "2", "-o", tmp_path / "x", "--text",
                       _small_text(tmp_path))
    assert code == 2 and "tokens" in err and "Traceback" not in err


def _small_text(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("Only a few words of text.")
    return text


# ----------------------------------------------------------------------------- format round trip


def test_metadata_round_trip():
    meta = CaptureMeta(model="m", model_revision="r", architecture="LlamaForCausalLM", num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, rope={"theta": 1.0, "rotary_dims": 8}, layer_types=["a", "b"],
                       dtype="float32", seq_len=4, num_seqs=1, text_source="t", text_sha256="s",
                       kvc_version="0", created="now", sliding_window=None, extra={"truth": "{}"})
    strings = meta.to_strings()
    assert all(isinstance(v, str) for v in strings.values())
    assert CaptureMeta.from_strings(strings, "x") == meta


def test_synth_round_trip(run, tmp_path):
    path = tmp_path / "s.safetensors"
    code, out, err = run("synth", "-o", path, "--layers", "2", "--kv-heads", "2", "--heads", "4",
                         "--head-dim", "32", "--seq-len", "64")
    assert code == 0, err
    cap = CaptureFile(path)
    assert cap.layers == [0, 1] and cap.has_rope
    assert cap.tensor(1, "k").shape == (1, 2, 64, 32) and cap.tensor(1, "q").shape == (1, 4, 64, 32)
    truth = json.loads(cap.meta.extra["truth"])
    assert truth["rank"] == len(truth["strengths"])
    rotated = apply_rope(cap.tensor(0, "k_pre"), torch.arange(64), cap.meta.rope, 0)
    torch.testing.assert_close(rotated, cap.tensor(0, "k"), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def _one_line_exit_2(result, *needles):
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_missing_model(run, tmp_path):
    _one_line_exit_2(run("capture", "-m", str(tmp_path / "nope"), "-o", tmp_path / "o"), "not found")


def test_unknown_architecture(run, tmp_path):
    model_dir = tmp_path / "weird"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "foobarformer",
                                                       "architectures": ["FooBarForCausalLM"]}))
    _one_line_exit_2(run("capture", "-m", model_dir, "-o", tmp_path / "o"), "foobarformer")


def test_cuda_without_gpu(run, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _one_line_exit_2(run("capture", "--device", "cuda", "-o", tmp_path / "o"), "no CUDA GPU")


def test_bad_options(run, tmp_path):
    _one_line_exit_2(run("capture", "--batch-size", "0", "-o", tmp_path / "o"), "--batch-size must be >= 1")
    model_dir = tmp_path / "config-only"  # a config and no weights: --dtype is refused before any load
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    _one_line_exit_2(run("capture", "--dtype", "int3", "-m", model_dir, "-o", tmp_path / "o"),
                     "--dtype must be one of auto, float32, bfloat16, float16, not 'int3'")


def test_foreign_truncated_and_versioned_files(run, synth_capture, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign))
    _one_line_exit_2(run("info", foreign), "not a kvc file")
    with pytest.raises(Exception, match="not a kvc capture"):
        CaptureFile(foreign)

    good = synth_capture(seq_len=32, head_dim=16)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    _one_line_exit_2(run("info", truncated), "not a readable safetensors")

    text = tmp_path / "text.safetensors"
    text.write_text("hello")
    _one_line_exit_2(run("info", text), "not a readable")
    _one_line_exit_2(run("info", tmp_path / "missing.safetensors"), "no such file")

    from kvc.io.safetensors import save_safetensors
    from safetensors.torch import load_file
    from safetensors import safe_open

    with safe_open(str(good), "pt") as fh:
        meta = dict(fh.metadata())
    meta["format_version"] = "99"
    future = tmp_path / "future.safetensors"
    save_safetensors(future, load_file(str(good)), meta)
    _one_line_exit_2(run("info", future), "version 99")


def test_existing_output_needs_force(run, synth_capture):
    path = synth_capture(seq_len=32, head_dim=16)
    _one_line_exit_2(run("synth", "-o", path), "--force")
    code, _, err = run("synth", "-o", path, "--force", "--seq-len", "32", "--head-dim", "16")
    assert code == 0, err
