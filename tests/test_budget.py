"""kvc budget: KV bytes from geometry (explicit, config.json, GGUF), window caps, bit rules, CLI."""

import json

import pytest
import torch

from kvc.ci.budget import FP16, budget, compression_from_json, compression_rule, geometry_from_dims, geometry_from_model, sequence_bytes, sliding_layers
from kvc.compression.catalogue import methods
from kvc.compression.protocol import LayerKV, declares_nominal_bits
from kvc.compression.registry import available, build
from kvc.errors import KvcError

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
    code, stdout, stderr = run(*args, "--sliding-window", "16", "--sliding-layers", "pattern:3", "--json", "-")
    assert code == 0 and "fp16 /token" in stderr  # the table goes to stderr, stdout is the JSON
    assert json.loads(stdout)["contexts"][0]["fp16"]["per_sequence"] == (4 * 16 + 2 * 1000) * 32


def _rule(method: str, key_dim: int, value_dim: int | None = None, **options):
    return compression_rule(build(method, **options), key_dim, value_dim)


def test_bit_rules():
    # docs/methods.md#oracle-bits: KIVI-2 at g32 with a 128-token fp16 window at 32K = 3.05 bits per entry
    kivi = _rule("kivi", 128, bits=2)
    assert (kivi.method, kivi.k_bits, kivi.fp16_tokens) == ("kivi2", 3.0, 128)
    geometry = geometry_from_dims(1, 1, 128)
    n = 32 * 1024
    assert 8 * sequence_bytes(geometry, n, kivi) / (2 * 128 * n) == pytest.approx(3.05, abs=0.005)
    assert _rule("kivi", 128, bits=4, group_size=64, residual=0) == compression_rule(
        build("kivi", bits=4, group_size=64, residual=0), 128)
    assert _rule("kivi", 128, group_size=64, residual=0).method == "kivi2 --group-size 64 --residual 0"
    assert _rule("int", 128, bits=4).k_bits == 4.25  # fp16 scale and zero point per token of d = 128
    assert _rule("int", 64, bits=4, symmetric=True).k_bits == 4.25  # fp16 scale per token of d = 64
    assert _rule("int", 64, bits=3, axis="channel").k_bits == 3  # the scale over the tokens vanishes
    assert _rule("turboquant", 128, bits=2).k_bits == 2.125  # + fp16 norm / d
    assert _rule("turboquant", 128, bits=2.5).k_bits == 2.75  # two split instances, two norms
    assert _rule("turboquant", 128, bits=2, variant="prod").k_bits == 2.25  # norm and gamma
    # prod 1.5 bits at d = 128: 64 channels at 2 bits (norm + gamma), 64 at 1 bit (gamma only)
    assert _rule("turboquant", 128, bits=1.5, variant="prod").k_bits == 1.5 + 3 * 16 / 128
    assert _rule("eoptshrinkq", 128, bits=2).k_bits == pytest.approx(2.33, abs=0.005)  # readers' formula
    assert _rule("svdq", 128, bits=2).k_bits == _rule("eoptshrinkq", 128, bits=2).k_bits  # same storage
    qjl = _rule("qjl", 64)  # docs/methods.md#qjl: D = 64, defaults: K 4.25, V 3.0
    assert (qjl.k_bits, qjl.v_bits, qjl.fp16_tokens) == (4.25, 3.0, 0)
    assert _rule("qjl", 64, outliers=8, outlier_sketch_dim=128, residual=128).k_bits == (256 + 16 + 128 + 16) / 64
    kvq = _rule("kvquant", 128)  # nuq3-1%: keys the paper's 3.32; values 3 + 32/128 + 1 outlier (16 + 8)/128
    assert (kvq.k_bits, kvq.v_bits, kvq.fp16_tokens) == (pytest.approx(3.32), 3.4375, 1)
    assert _rule("fp8", 64).k_bits == 8
    assert (_rule("think", 64).k_bits, _rule("think", 64).v_bits) == (16 * 39 / 64, 16)  # 25 of 64 pruned
    assert _rule("fp16", 64) == FP16
    assert _rule("int", 128, 64, bits=4).v_bits == 4.5  # values at their own head dim


# (method, options) whose stored bits on a long random layer differ from the nominal ones only by the
# per-tensor terms the nominal count leaves out (codebooks, seeds, scales over the tokens), see
# docs/methods.md#nominal-bits; eoptshrinkq and svdq assume a typical rank, which noise does not have
MEASURABLE = [("fp16", {}), ("fp8", {}), ("int", {"bits": 4}), ("int", {"bits": 3, "symmetric": True}),
              ("int", {"bits": 2, "axis": "channel"}), ("kivi", {"bits": 2}), ("kivi", {"bits": 4, "group_size": 16}),
              ("kvquant", {}), ("qjl", {"residual": 64}), ("qjl", {"outliers": 4, "outlier_sketch_dim": 64}),
              ("turboquant", {"bits": 3}), ("turboquant", {"bits": 2.5}), ("turboquant", {"bits": 2, "variant": "prod"}),
              ("think", {}), ("think", {"ratio": 0.75})]


@pytest.mark.parametrize("method, options", MEASURABLE)
def test_nominal_bits_match_the_stored_bits(method, options):
    S, H, T, D = 1, 2, 4096, 64
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, S, H, T, D, generator=g)
    layer = LayerKV(0, k, v, torch.randn(S, H, 4, D, generator=g), torch.arange(T - 4, T), k_pre=k)
    compressor = build(method, **options)
    compressor.validate(layer)
    encoded = compressor.encode(layer)
    rule = compression_rule(compressor, D)
    fp16 = min(T, rule.fp16_tokens)  # the tokens that stay in fp16, counted as sequence_bytes does
    for tensor, bits in (("k", rule.k_bits), ("v", rule.v_bits)):
        stored = encoded.nbits(f"{tensor}.") / (S * H * T * D)
        assert stored == pytest.approx((fp16 * 16 + (T - fp16) * bits) / T, abs=0.01), tensor


def test_every_method_declares_nominal_bits_or_is_refused():
    declared = {name for name, cls in available().items() if declares_nominal_bits(cls)}
    assert declared == {"eoptshrinkq", "fp16", "fp8", "int", "kivi", "kvquant", "qjl", "svdq", "think", "turboquant"}
    assert {name for name, m in methods().items() if m["nominal_bits"]} == declared  # kvc methods says so
    assert declared >= {method for method, _ in MEASURABLE}
    for name in set(available()) - declared:
        with pytest.raises(KvcError, match=f"^{name} declares no nominal bits per entry"):
            compression_rule(build(name), 64)


def test_budget_checks_options_as_compress_does(run, synth_capture):
    path = synth_capture(seq_len=64, head_dim=64)
    _, _, compress_err = run("compress", path, "--method", "kivi", "--group-size", "48", "--residual", "0")
    code, _, budget_err = run("budget", "--layers", "2", "--kv-heads", "1", "--head-dim", "64", "--method", "kivi",
                              "--group-size", "48")
    assert code == 2 and budget_err == compress_err == "kvc: error: kivi: --group-size must divide head_dim 64, got 48\n"
    code, stdout, err = run("budget", "--layers", "2", "--kv-heads", "1", "--head-dim", "64", "--context", "1024",
                            "--method", "kivi", "--opt", "group_size=64", "--bits", "4", "--json", "-")
    assert code == 0, err
    compressed = json.loads(stdout)["compressed"]
    assert (compressed["method"], compressed["k_bits"], compressed["fp16_tokens"]) == ("kivi4 --group-size 64", 4.5, 128)


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
    (["--method", "int", "--bits", "0"], "kvc: error: int: --bits must be in [1, 8], got 0"),
    (["--method", "kivi", "--bits", "2.5"], "kvc: error: --bits expects int, got '2.5'"),
    (["--method", "kivi", "--group-size", "3"], "kvc: error: kivi: --group-size must divide head_dim 8, got 3"),
    (["--method", "nope", "--bits", "2"], "kvc: error: unknown method 'nope'; valid methods: adakv, eoptshrinkq, expected_attention, fp16"),
    (["--method", "fp16", "--bits", "16"], "kvc: error: method fp16 has no option --bits"),
    (["--method", "snapkv"], "kvc: error: snapkv declares no nominal bits per entry"),
    (["--method", "snapkv+kivi"], "kvc: error: snapkv+kivi declares no nominal bits per entry"),
    (["--bits", "2"], "kvc: error: --bits needs --method"),
    (["--opt", "bits=2"], "kvc: error: --opt bits=2 needs --method"),
    (["--method", "kivi", "extra"], "kvc: error: unexpected argument 'extra'"),
    (["--method", "kivi", "--from-json", "c.json"], "kvc: error: pass either --from-json or --method, not both"),
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
