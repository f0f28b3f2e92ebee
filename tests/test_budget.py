"""kvc budget: KV bytes from geometry (explicit, config.json, GGUF), window caps, bit rules, CLI."""

import json

import pytest

from kvc.ci.budget import FP16, budget, compression_from_json, compression_rule, geometry_from_dims, geometry_from_model, sequence_bytes, sliding_layers

OPT_30B = {"model_type": "opt", "num_hidden_layers": 48, "hidden_size": 7168, "num_attention_heads": 56,
           "ffn_dim": 28672, "vocab_size": 50272}


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_opt30b_batch128_1k_is_180GB(tmp_path):
    # seeds' example: 2 (K,V) * 48 layers * 7168 * 2 bytes * 1024 tokens * 128 sequences = 180.4e9
    report = budget(geometry_from_dims(48, 56, 128), [1024], batch=128)
    assert report["contexts"][0]["fp16"]["total"] == 2 * 48 * 7168 * 2 * 1024 * 128
    assert report["contexts"][0]["fp16"]["total"] == pytest.approx(180e9, rel=0.01)
    # the same from an OPT config.json (no num_key_value_heads: full multi-head attention)
    config = _write(tmp_path / "config.json", OPT_30B)
    assert geometry_from_model(str(config)) == geometry_from_dims(48, 56, 128, name=str(config))


def test_cli_opt30b_json(tmp_path, run):
    out = tmp_path / "budget.json"
    args = ["budget", "--layers", "48", "--kv-heads", "56", "--head-dim", "128", "--batch", "128",
            "--context", "1024", "--json", out]
    code, stdout, _ = run(*args)
    assert code == 0 and "180.4 GB" in stdout
    row = json.loads(out.read_text())["contexts"][0]
    assert row["fp16"]["total"] == pytest.approx(180.4e9, rel=1e-3)
    code, _, stderr = run(*args)  # exists, no --force
    assert code == 2 and "--force" in stderr
    assert run(*args, "--force")[0] == 0


def test_default_gguf_is_gqa():
    geometry = geometry_from_model(None)  # SmolLM2-135M: 30 layers, 3 KV heads (of 9), head_dim 64
    assert (geometry.num_layers, set(geometry.kv_heads), geometry.key_dim) == (30, {3}, 64)
    assert set(geometry.windows) == {None}
    assert sequence_bytes(geometry, 1) == 30 * 2 * 3 * 64 * 2 == 23040


@pytest.mark.parametrize("config, sliding", [
    ({"model_type": "mistral", "sliding_window": 256}, [True] * 6),
    ({"model_type": "gemma3_text", "sliding_window": 256,
      "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}, [True] * 5 + [False]),
])
def test_sliding_window_capped(tmp_path, config, sliding):
    dims = {"num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
            "hidden_size": 128, "head_dim": 32}
    path = _write(tmp_path / "config.json", {**config, **dims})
    geometry = geometry_from_model(str(tmp_path))  # the directory holding config.json
    assert geometry.windows == tuple(256 if s else None for s in sliding)
    per_layer_token = 2 * 2 * 32 * 2  # K and V, 2 KV heads, head_dim 32, fp16
    for n in (100, 256, 4096):
        expected = sum(min(n, 256) if s else n for s in sliding) * per_layer_token
        assert sequence_bytes(geometry, n) == expected
    assert geometry_from_model(str(path)).windows == geometry.windows


def _gguf(path, arch, **keys):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)  # a header with metadata only, no tensors
    writer.add_block_count(6)
    writer.add_head_count(8)
    writer.add_embedding_length(512)
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_gguf_sliding_and_per_layer_heads(tmp_path):
    # gemma3 GGUFs omit the pattern: llama.cpp's default makes every 6th layer full
    gemma = geometry_from_model(_gguf(tmp_path / "g.gguf", "gemma3", head_count_kv=2, key_length=32,
                                      value_length=32, sliding_window=128))
    assert (gemma.kv_heads, gemma.key_dim) == ((2,) * 6, 32)
    assert gemma.windows == (128,) * 5 + (None,)
    # per-layer KV heads (0: a layer without a KV cache) and an explicit per-layer pattern
    hybrid = geometry_from_model(_gguf(tmp_path / "h.gguf", "llama", head_count_kv=[0, 2, 0, 2, 0, 2],
                                       sliding_window=64, sliding_window_pattern=[True, False] * 3))
    assert (hybrid.kv_heads, hybrid.key_dim) == ((0, 2, 0, 2, 0, 2), 64)  # 512 / 8 heads
    assert hybrid.windows == (64, None) * 3
    assert sequence_bytes(hybrid, 1000) == 3 * 1000 * 2 * 2 * 64 * 2


def test_explicit_sliding_layers(run):
    assert sliding_layers("pattern:3", 6) == [True, True, False, True, True, False]
    assert sliding_layers("0-1,4", 6) == [True, True, False, False, True, False]
    geometry = geometry_from_dims(6, 1, 8, 16, sliding_layers("pattern:3", 6))
    assert sequence_bytes(geometry, 1000) == (4 * 16 + 2 * 1000) * 2 * 8 * 2
    args = ["budget", "--layers", "6", "--kv-heads", "1", "--head-dim", "8", "--context", "1000"]
    code, stdout, _ = run(*args, "--sliding-window", "16", "--sliding-layers", "pattern:3", "--json", "-")
    assert code == 0
    assert json.loads(stdout)["contexts"][0]["fp16"]["per_sequence"] == (4 * 16 + 2 * 1000) * 32


def test_bit_rules():
    # docs/methods.md#oracle-bits: KIVI-2 at g32 with a 128-token fp16 window at 32K = 3.05 bits per entry
    kivi = compression_rule("kivi", 2, 128)
    geometry = geometry_from_dims(1, 1, 128)
    n = 32 * 1024
    assert 8 * sequence_bytes(geometry, n, kivi) / (2 * 128 * n) == pytest.approx(3.05, abs=0.005)
    assert compression_rule("int", 4, 128, group_size=128).k_bits == 4.25
    assert compression_rule("turboquant", 2, 128).k_bits == 2.125  # + fp16 norm / d
    assert compression_rule("turboquant", 2.5, 128).k_bits == 2.75  # two split instances, two norms
    assert compression_rule("eoptshrinkq", 2, 128).k_bits == pytest.approx(2.33, abs=0.005)  # readers' formula
    assert compression_rule("fp16", None, 64) == FP16


def test_from_json(tmp_path, run):
    result = {"method": "turboquant", "params": {"bits": 2}, "bits_per_entry": 2.2,
              "summary": {"k": {"bits_per_entry": 2.4, "mse_rel": 0.1}, "v": {"bits_per_entry": 2.0}},
              "heads": []}
    comp = compression_from_json(_write(tmp_path / "tq.json", result))
    assert (comp.method, comp.k_bits, comp.v_bits) == ("turboquant", 2.4, 2.0)
    bare = compression_from_json(_write(tmp_path / "bare.json", {"method": "x", "bits_per_entry": 3}))
    assert (bare.k_bits, bare.v_bits) == (3.0, 3.0)
    args = ["budget", "--layers", "2", "--kv-heads", "1", "--head-dim", "64", "--context", "100"]
    code, stdout, _ = run(*args, "--from-json", tmp_path / "tq.json", "--json", "-")
    assert code == 0
    row = json.loads(stdout)["contexts"][0]
    assert row["compressed"]["per_sequence"] == round(2 * 100 * 64 * (2.4 + 2.0) / 8) == 7040
    assert row["ratio"] == pytest.approx(32 / 4.4)


@pytest.mark.parametrize("extra, needle", [
    (["--model", "./no/such/model"], "model not found"),
    (["--method", "int", "--bits", "0"], "--bits must be positive"),
    (["--method", "kivi", "--bits", "2.5"], "integer --bits"),
    (["--method", "nope", "--bits", "2"], "known: fp16"),
    (["--bits", "2"], "--bits needs --method"),
    (["--context=-5"], "must be positive"),
    (["--context", "1k,abc"], "comma-separated"),
    (["--batch", "0"], "--batch"),
    (["--layers", "4"], "needs all of"),
    (["--from-json", "missing.json"], "--from-json missing.json: cannot read it"),
])
def test_bad_input_one_line_exit_2(run, extra, needle):
    args = ["budget", *extra]
    if "--model" not in extra and "--layers" not in extra:
        args += ["--layers", "2", "--kv-heads", "1", "--head-dim", "8"]
    code, _, stderr = run(*args)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], stderr
