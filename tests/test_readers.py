"""The validated readers (kvc.io.schema, capture, compressed file, policy, results, baseline):
hostile files are one KvcError naming the key (exit 2, one line on stderr), checked before
anything is allocated or computed; valid files from older kvc versions and other writers still read.

Hostile files are small real captures (kvc.model.synth) and compressed files with their metadata
or tensors changed, or safetensors headers written directly.
"""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kvc.attention import AttentionSpec
from kvc.ci.check import load_policy, parse_baseline, parse_results
from kvc.compression import engine
from kvc.compression.registry import build
from kvc.errors import KvcError
from kvc.io import schema
from kvc.io.capture import CaptureFile, CaptureMeta
from kvc.io.compressed import CompressedFile
from kvc.model.synth import SpikedSpec, synthesize

SMALL = dict(num_layers=2, num_kv_heads=2, num_heads=4, head_dim=16, seq_len=32, strengths=[3.0])


def _capture(path: Path, dtype: torch.dtype = torch.float32, **spec) -> Path:
    tensors, meta = synthesize(SpikedSpec(**{**SMALL, **spec}), dtype)
    save_file(tensors, str(path), metadata=meta.to_strings())
    return path


def _contents(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    return load_file(str(path)), meta


def _mutate(src: Path, dst: Path, meta: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of ``src`` with metadata and tensors replaced (a value None deletes the key)."""
    old_tensors, old_meta = _contents(src)
    new_meta = {**old_meta, **(meta or {})}
    new_tensors = {**old_tensors, **(tensors or {})}
    save_file({k: v.contiguous() for k, v in new_tensors.items() if v is not None}, str(dst),
              metadata={k: v for k, v in new_meta.items() if v is not None})
    return dst


def _raw_file(path: Path, header: dict) -> Path:
    """A safetensors file written byte by byte; the data region is a hole (sparse) of the declared size."""
    size = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + size)
    return path


def _one_line_exit_2(result, *needles):
    code, _, err = result
    assert code == 2, err
    assert err.startswith("kvc: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def capture(tmp_path):
    return _capture(tmp_path / "c.safetensors")


# ----------------------------------------------------------------------------- schema


def test_bounded_json():
    deep = "[" * 200_000 + "]" * 200_000
    with pytest.raises(KvcError, match=re.escape("x: nested deeper than 64 levels")):
        schema.loads(deep, "x")  # json.loads alone raises RecursionError here
    with pytest.raises(KvcError, match=re.escape("x: nested deeper than 64 levels")):
        schema.loads("[" * 65 + "]" * 65, "x")  # parses, but deeper than kvc reads
    assert schema.depth(schema.loads("[" * 64 + "]" * 64, "x")) == 64
    for text in ("NaN", "[Infinity]", '{"a": -Infinity}'):
        with pytest.raises(KvcError, match=r"x: not valid JSON \(.*Infinity|NaN is not a JSON number"):
            schema.loads(text, "x")
    with pytest.raises(KvcError, match=r"x: not valid JSON"):
        schema.loads("9" * 5000, "x")  # beyond Python's int digit limit
    assert schema.loads('{"a": [1, 2.5, null]}', "x") == {"a": [1, 2.5, None]}


def test_typed_values_name_the_key():
    assert schema.integer(3, "n", "w", minimum=1) == 3
    for bad in (True, 3.0, "3", None, 0):
        with pytest.raises(KvcError, match=re.escape("w: n must be an integer >= 1, got ")):
            schema.integer(bad, "n", "w", minimum=1)
    with pytest.raises(KvcError, match=re.escape("w: n must be an integer in 0..7, got 8")):
        schema.integer(8, "n", "w", minimum=0, maximum=7)
    assert schema.number(2, "x", "w") == 2.0
    for bad in (float("nan"), float("inf"), "1", False):
        with pytest.raises(KvcError, match=re.escape("w: x must be a number, got ")):
            schema.number(bad, "x", "w")
    with pytest.raises(KvcError, match=re.escape("w: x must be > 0, got 0")):
        schema.number(0, "x", "w", positive=True)
    with pytest.raises(KvcError, match=re.escape("w: s must be one of a, b, got 'c'")):
        schema.string("c", "s", "w", choices=("a", "b"))
    with pytest.raises(KvcError, match=re.escape("w: b must be true or false, got 'yes'")):
        schema.boolean("yes", "b", "w")
    long = schema.show("z" * 10_000)
    assert len(long) < 80  # values from a file are shown shortened


def test_allocation_bound(monkeypatch):
    monkeypatch.setattr(schema, "physical_memory", lambda: 10**9)
    schema.check_allocation(10**9, "it", "w")
    with pytest.raises(KvcError, match=re.escape("w: it needs 2 GB, more than this machine's 1 GB of memory")):
        schema.check_allocation(2 * 10**9, "it", "w")


# ----------------------------------------------------------------------------- capture metadata


@pytest.mark.parametrize("key, value, message", [
    ("rope", json.dumps("banana"), "metadata rope must be an object or null, got 'banana'"),
    ("rope", "banana", "metadata rope: not valid JSON"),
    ("rope", "[1, 2]", "metadata rope must be an object or null, got [1, 2]"),
    ("rope", "[" * 200_000 + "]" * 200_000, "metadata rope: nested deeper than 64 levels"),
    ("rope", json.dumps({"theta": 1e4, "rotary_dims": 64}), "rope metadata, layer 0: rotary_dims 64 exceeds head_dim 16"),
    ("rope", json.dumps({"inv_freq": ["a"]}), "rope metadata, layer 0: inv_freq must be a non-empty list of numbers"),
    ("rope", json.dumps({"theta": 1e4, "rotary_dims": 16, "per_layer": {"7": {}}}),
     "metadata: rope.per_layer key '7' is not a layer index below num_layers 2"),
    ("num_heads", json.dumps("four"), "metadata num_heads must be an integer >= 1, got 'four'"),
    ("num_heads", "four", "metadata num_heads: not valid JSON"),
    ("num_heads", "3", "metadata: num_heads 3 is not a multiple of num_kv_heads 2"),
    ("head_dim", "NaN", "metadata head_dim: not valid JSON (NaN is not a JSON number"),
    ("head_dim", "16.0", "metadata head_dim must be an integer >= 1, got 16.0"),
    ("num_kv_heads", "0", "metadata num_kv_heads must be an integer >= 1, got 0"),
    ("seq_len", "-32", "metadata seq_len must be an integer >= 1, got -32"),
    ("num_layers", "true", "metadata num_layers must be an integer >= 1, got True"),
    ("layer_types", '["full_attention"]', "metadata: layer_types must be a list of 2 strings (num_layers)"),
    ("sliding_window", '"wide"', "metadata sliding_window must be an integer >= 1, got 'wide'"),
    ("attention", "[{}, {}, {}]", "metadata: attention must be null or a list of 2 entries (num_layers)"),
    ("attention", '[{"causal": "yes"}, null]', "metadata attention[0].causal must be true or false, got 'yes'"),
    ("attention", '[null, {"scaling": -1}]', "metadata attention[1].scaling must be > 0, got -1"),
    ("attention", '[null, {"softcap": "big"}]', "metadata attention[1].softcap must be a number, got 'big'"),
    ("special_tokens", "[1]", "metadata special_tokens must be an object, got [1]"),
    ("num_seqs", None, "lacks metadata keys: num_seqs"),
    ("format_version", "99", "has capture format version 99; this kvc reads version 1"),
])
def test_capture_metadata_names_the_key(capture, tmp_path, key, value, message):
    bad = _mutate(capture, tmp_path / "bad.safetensors", meta={key: value})
    with pytest.raises(KvcError, match=re.escape(message)):
        CaptureFile(bad)


def test_capture_metadata_is_exit_2_in_every_command(run, capture, tmp_path):
    for key, value, needle in (("rope", json.dumps("banana"), "metadata rope"),
                               ("num_heads", json.dumps("four"), "metadata num_heads"),
                               ("rope", "[" * 200_000 + "]" * 200_000, "metadata rope: nested deeper")):
        bad = _mutate(capture, tmp_path / "bad.safetensors", meta={key: value})
        for args in (("info", bad), ("analyze", bad), ("compress", bad, "--method", "int"),
                     ("sweep", bad, "--methods", "int", "--bits", "4", "-o", tmp_path / "sweep")):
            _one_line_exit_2(run(*args), needle)


# ----------------------------------------------------------------------------- capture tensors


def test_seq_len_disagreeing_with_the_tensors(capture, tmp_path):
    bad = _mutate(capture, tmp_path / "bad.safetensors", meta={"seq_len": "64"})
    with pytest.raises(KvcError, match=re.escape("tensor layers.0.k has shape [1, 2, 32, 16], but its "
                                                 "dimension 2 must be metadata seq_len = 64")):
        CaptureFile(bad)


def test_kv_shape_mismatch_names_the_tensor_not_the_method(run, capture, tmp_path):
    tensors, _ = _contents(capture)
    bad = _mutate(capture, tmp_path / "bad.safetensors", tensors={"layers.1.v": tensors["layers.1.v"][:, :, :31]})
    needle = "tensor layers.1.v has shape [1, 2, 31, 16], but its dimension 2 must be metadata seq_len = 32"
    _one_line_exit_2(run("analyze", bad), needle)
    err = _one_line_exit_2(run("compress", bad, "--method", "turboquant"), needle)
    assert "turboquant" not in err and "method" not in err


def test_layer_missing_v_is_refused_naming_the_layer(run, capture, tmp_path):
    bad = _mutate(capture, tmp_path / "bad.safetensors", tensors={"layers.1.v": None})
    _one_line_exit_2(run("analyze", bad), "layer 1 lacks v (tensor layers.1.v); every layer needs k and v")
    without_q = _mutate(capture, tmp_path / "noq.safetensors", tensors={"layers.1.q": None})
    with pytest.raises(KvcError, match=re.escape("layer 1 lacks q, which layer 0 holds")):
        CaptureFile(without_q)


@pytest.mark.parametrize("key, tensor, message", [
    ("layers.0.k", torch.zeros(1, 2, 32, 16, dtype=torch.int32), "tensor layers.0.k has dtype I32; expected F16 or BF16 or F32 or F64"),
    ("layers.1.q", torch.zeros(1, 4, 32, 16, dtype=torch.bool), "tensor layers.1.q has dtype BOOL"),
    ("q_positions", torch.arange(32.0), "tensor q_positions has dtype F32; expected I8 or"),
    ("q_positions", torch.arange(32).reshape(2, 16), "tensor q_positions has shape [2, 16]; expected 1 dimensions"),
    ("q_positions", torch.arange(1, 33), "q_positions must lie in 0..31 (metadata seq_len 32), got 1..32"),
    ("layers.0.q", torch.zeros(1, 4, 31, 16), "tensor layers.0.q has shape [1, 4, 31, 16], but its dimension 2 "
                                             "must be the length of q_positions = 32"),
    ("layers.0.k_pre", torch.zeros(1, 2, 32), "tensor layers.0.k_pre has shape [1, 2, 32]; expected 4 dimensions"),
    ("input_ids", torch.zeros(1, 33, dtype=torch.int64), "tensor input_ids has shape [1, 33], but its dimension 1 "
                                                         "must be metadata seq_len = 32"),
    ("layers.5.k", torch.zeros(1, 2, 32, 16), "tensors of layer 5 exceed the metadata's num_layers 2"),
])
def test_capture_tensors_checked_against_the_metadata(capture, tmp_path, key, tensor, message):
    bad = _mutate(capture, tmp_path / "bad.safetensors", tensors={key: tensor})
    with pytest.raises(KvcError, match=re.escape(message)):
        CaptureFile(bad)


def test_non_finite_values_named_when_loaded(run, capture, tmp_path):
    tensors, _ = _contents(capture)
    v = tensors["layers.1.v"].clone()
    v[0, 1, 5, 3] = float("nan")
    bad = _mutate(capture, tmp_path / "bad.safetensors", tensors={"layers.1.v": v})
    message = "bad.safetensors: tensor layers.1.v holds NaN/Inf values: head 1 (1 entries)"
    with pytest.raises(KvcError, match=re.escape(message)):
        CaptureFile(bad).tensor(1, "v")
    for args in (("analyze", bad), ("compress", bad, "--method", "int")):
        _one_line_exit_2(run(*args), message)
    huge = _mutate(capture, tmp_path / "f64.safetensors", tensors={"q_positions": tensors["q_positions"],
                                                                  "layers.0.k": tensors["layers.0.k"].double() * 1e300})
    with pytest.raises(KvcError, match=re.escape("tensor layers.0.k holds NaN/Inf values: head 0 (")):
        CaptureFile(huge).tensor(0, "k", torch.float32)  # finite as stored, not in the compute dtype


@pytest.mark.parametrize("key, value, message", [
    ("num_kv_heads", "1", "dimension 1 must be metadata num_kv_heads = 1"),
    ("num_heads", "2", "tensor layers.0.q has shape [1, 4, 32, 16], but its dimension 1 must be metadata num_heads = 2"),
    ("head_dim", "8", "dimension 3 must be metadata head_dim = 8"),
    ("num_seqs", "2", "dimension 0 must be metadata num_seqs = 2"),
])
def test_tensors_inconsistent_with_the_geometry(tmp_path, key, value, message):
    capture = _capture(tmp_path / "norope.safetensors", rope=False)
    bad = _mutate(capture, tmp_path / "bad.safetensors", meta={key: value})
    with pytest.raises(KvcError, match=re.escape(message)):
        CaptureFile(bad)


def _huge_header(capture: Path, seq_len: int, meta_seq_len: int) -> dict:
    """The header of ``capture`` with one layer whose K, V hold ``seq_len`` tokens (data not written)."""
    _, meta = _contents(capture)
    meta = {**meta, "num_layers": "1", "layer_types": '["full_attention"]', "rope": "null",
            "seq_len": str(meta_seq_len)}
    nbytes = 2 * seq_len * 16 * 4
    return {"__metadata__": meta,
            "layers.0.k": {"dtype": "F32", "shape": [1, 2, seq_len, 16], "data_offsets": [0, nbytes]},
            "layers.0.v": {"dtype": "F32", "shape": [1, 2, seq_len, 16], "data_offsets": [nbytes, 2 * nbytes]}}


def test_huge_declared_shape_refused_before_reading(run, capture, tmp_path, monkeypatch):
    """A sparse 3 GB file: with metadata that disagrees it is refused from the header alone; with
    metadata that agrees, a tensor larger than the machine's memory is refused before allocating."""
    tokens = 12_000_000  # 2 x 1.5 GB of K and V
    sparse = _raw_file(tmp_path / "sparse.safetensors", _huge_header(capture, tokens, 32))
    assert sparse.stat().st_size > 3e9
    start = time.perf_counter()
    _one_line_exit_2(run("analyze", sparse), "tensor layers.0.k has shape [1, 2, 12000000, 16], but its "
                                             "dimension 2 must be metadata seq_len = 32")
    _one_line_exit_2(run("compress", sparse, "--method", "int", "--out", tmp_path / "o.kvcz"), "metadata seq_len")
    assert time.perf_counter() - start < 10 and not (tmp_path / "o.kvcz").exists()
    agreeing = _raw_file(tmp_path / "agreeing.safetensors", _huge_header(capture, tokens, tokens))
    monkeypatch.setattr(schema, "physical_memory", lambda: 10**9)
    with pytest.raises(KvcError, match=re.escape("one tensor in float32 needs 1.54 GB, more than this "
                                                 "machine's 1 GB of memory")):
        CaptureFile(agreeing)


def test_valid_files_from_older_kvc_and_other_writers(capture, tmp_path):
    tensors, meta = _contents(capture)
    # an older kvc: no attention, special_tokens, sliding_window or weights keys
    old = _mutate(capture, tmp_path / "old.safetensors",
                  meta={"attention": None, "special_tokens": None, "sliding_window": None, "weights": None})
    cap = CaptureFile(old)
    assert cap.meta.attention is None and cap.meta.weights == "" and cap.meta.layer_attention(1) == AttentionSpec()
    # another writer: extra metadata and tensors, half precision, theta-only rope, attention for one layer
    other = _mutate(capture, tmp_path / "other.safetensors",
                    meta={"writer": "someone else", "rope": json.dumps({"theta": 10000.0, "rotary_dims": 16}),
                          "attention": json.dumps([None, {"causal": True, "sliding_window": 8}])},
                    tensors={**{k: v.to(torch.bfloat16 if ".k" in k else torch.float16)
                                for k, v in tensors.items() if k.startswith("layers.")},
                             "extra.table": torch.zeros(3), "q_positions": torch.arange(32, dtype=torch.int32)})
    cap = CaptureFile(other)
    assert cap.meta.extra["writer"] == "someone else" and cap.layers == [0, 1]
    assert cap.tensor(0, "k").dtype == torch.bfloat16 and cap.tensor(0, "v").dtype == torch.float16
    assert cap.meta.layer_attention(0).sliding_window is None and cap.meta.layer_attention(1).sliding_window == 8
    # a decompressed file: no queries, a keep mask per layer
    decompressed = _mutate(capture, tmp_path / "dec.safetensors", tensors={
        **{f"layers.{L}.{n}": None for L in (0, 1) for n in ("q", "q_pre")}, "q_positions": None,
        **{f"layers.{L}.keep": torch.ones(1, 2, 32, dtype=torch.bool) for L in (0, 1)}})
    assert CaptureFile(decompressed).names(0) == {"k", "k_pre", "v", "keep"}


def test_metadata_round_trip_validates():
    _, meta = synthesize(SpikedSpec(**SMALL))
    assert CaptureMeta.from_strings(meta.to_strings(), "x") == meta


# ----------------------------------------------------------------------------- compressed file


@pytest.fixture
def compressed(tmp_path, capture):
    """make(method, **options) -> a compressed file of ``capture``."""

    def _make(method: str = "int", **options) -> Path:
        source = CaptureFile(capture)
        result = engine.run(build(method, **options), source, keep_encoded=True)
        path = tmp_path / f"{method}.kvcz"
        engine.write_compressed(path, result, source, force=True)
        return path

    return _make


def _decompress_fails(run, path: Path, tmp_path: Path, *needles) -> str:
    out = tmp_path / "out.safetensors"
    err = _one_line_exit_2(run("decompress", path, "-o", out, "--device", "cpu"), *needles)
    assert not out.exists()
    return err


@pytest.mark.parametrize("key, value, message", [
    ("params", json.dumps({"bits": "four", "axis": "token", "symmetric": False, "keys": "post", "seed": 0}),
     "metadata params: bits expects int, got 'four'"),
    ("params", json.dumps({"bits": 99, "axis": "token", "symmetric": False, "keys": "post", "seed": 0}),
     "metadata params: int: --bits must be in [1, 8], got 99"),
    ("params", json.dumps({"bits": 4, "axis": "diagonal"}), "metadata params: int: --axis must be one of token, channel"),
    ("params", json.dumps({"bitz": 4}), "metadata params: method int has no option bitz"),
    ("params", "[4]", "metadata params must be an object, got [4]"),
    ("evicts", json.dumps("yes"), "metadata evicts must be true or false, got 'yes'"),
    ("method", "nope", "metadata method: unknown method 'nope'"),
    ("method", "snapkv+" * 3000 + "int", "a combination is one eviction method and one tensor compressor"),
    ("layers", "[0, 1, 2]", "metadata layers[2] must be an integer in 0..1, got 2"),
    ("layers", "[0, 0]", "metadata: layers must be a non-empty list of distinct layer indices"),
    ("layers", "[]", "metadata: layers must be a non-empty list of distinct layer indices"),
    ("layers", '"all"', "metadata layers must be a list, got 'all'"),
    ("layers", "[0]", "metadata: layers.1.bits_paper belongs to a layer that 'layers' does not list"),
    ("bits_per_entry", "NaN", "metadata bits_per_entry: not valid JSON"),
    ("source", "banana", "metadata source: not valid JSON"),
    ("source", json.dumps({"format": "kvc-capture", "format_version": 1}), "metadata source.format_version must be a string, got 1"),
    ("layers.1.meta", None, "metadata: layers.1.meta is missing"),
    ("layers.1.meta", "[]", "metadata layers.1.meta must be an object, got []"),
    ("layers.1.bits_paper", '"x"', "metadata layers.1.bits_paper must be a number, got 'x'"),
    ("layers.7.meta", "{}", "metadata: layers.7.meta belongs to a layer that 'layers' does not list"),
    ("format_version", "2", "has compressed format version 2; this kvc reads version 1"),
])
def test_compressed_metadata_names_the_key(run, compressed, tmp_path, key, value, message):
    bad = _mutate(compressed("int"), tmp_path / "bad.kvcz", meta={key: value})
    _decompress_fails(run, bad, tmp_path, message)


def test_compressed_source_metadata_is_a_capture_s(run, compressed, tmp_path):
    path = compressed("int")
    _, meta = _contents(path)
    source = json.loads(meta["source"])
    for change, message in (({"num_kv_heads": "0"}, "metadata source: metadata num_kv_heads must be an integer >= 1"),
                            ({"rope": '"banana"'}, "metadata source: metadata rope must be an object or null")):
        bad = _mutate(path, tmp_path / "bad.kvcz", meta={"source": json.dumps({**source, **change})})
        _decompress_fails(run, bad, tmp_path, message)


def test_compressed_arrays_removed_or_extra(run, compressed, tmp_path):
    path = compressed("int")
    tensors, meta = _contents(path)
    layer1 = {k: None for k in tensors if k.startswith("layers.1.")}
    _decompress_fails(run, _mutate(path, tmp_path / "a.kvcz", tensors=layer1), tmp_path,
                      "layer 1 holds no arrays (tensors layers.1.*)")
    _decompress_fails(run, _mutate(path, tmp_path / "b.kvcz", tensors={"layers.1.v.zero": None}), tmp_path,
                      "array v.zero is stored as F16 in layer 0 and not at all in layer 1")
    extra = {k.replace("layers.1.", "layers.2."): v for k, v in tensors.items() if k.startswith("layers.1.")}
    _decompress_fails(run, _mutate(path, tmp_path / "c.kvcz", tensors=extra), tmp_path,
                      "tensor layers.2.k.codes belongs to no layer that the metadata's 'layers' lists ([0, 1])")
    _decompress_fails(run, _mutate(path, tmp_path / "d.kvcz", tensors={"extra": torch.zeros(2)}), tmp_path,
                      "tensor extra belongs to no layer")
    retyped = {k: v.to(torch.float32) for k, v in tensors.items() if k == "layers.0.k.scale"}
    _decompress_fails(run, _mutate(path, tmp_path / "e.kvcz", tensors=retyped), tmp_path,
                      "array k.scale is stored as F32 in layer 0 and as F16 in layer 1")


def test_compressed_arrays_that_do_not_decode(run, compressed, tmp_path):
    """Arrays or per-layer metadata altered the same way in every layer: decoding them fails or gives
    the wrong shape, and the error names the layer; no output file appears."""
    path = compressed("int")
    tensors, meta = _contents(path)
    every = lambda suffix, f: {k: f(v) for k, v in tensors.items() if k.endswith(suffix)}  # noqa: E731
    cases = [
        ({"tensors": every(".k.codes", lambda v: v[:-1])}, "layer 0 does not decode with int"),
        ({"tensors": every(".k.codes", lambda v: v.to(torch.int32))}, "packed buffer must be 1-D uint8"),
        ({"tensors": every(".v.scale", lambda v: v[:, :, :5])}, "layer 0 does not decode with int"),
        ({"meta": {f"layers.{L}.meta": json.dumps({"k": {"bits": 99, "axis": "token", "symmetric": False},
                                                   "v": json.loads(meta[f"layers.{L}.meta"])["v"]})
                   for L in (0, 1)}}, "layers.0.meta altered?"),
        ({"meta": {f"layers.{L}.meta": "{}" for L in (0, 1)}}, "KeyError: 'k'"),
    ]
    for change, needle in cases:
        _decompress_fails(run, _mutate(path, tmp_path / "bad.kvcz", **change), tmp_path, "layer 0", needle)
    source = json.loads(meta["source"])
    longer = _mutate(path, tmp_path / "long.kvcz", meta={"source": json.dumps({**source, "seq_len": "33"})})
    _decompress_fails(run, longer, tmp_path, "layer 0 does not decode with int")


def test_compressed_source_geometry_is_bounded(run, compressed, tmp_path):
    path = compressed("int")
    _, meta = _contents(path)
    source = {**json.loads(meta["source"]), "seq_len": str(10**12)}
    bad = _mutate(path, tmp_path / "huge.kvcz", meta={"source": json.dumps(source)})
    _decompress_fails(run, bad, tmp_path, "decoding one layer in float32 needs", "more than this machine's")


def test_eviction_flag_must_match_the_method(run, compressed, tmp_path):
    path = compressed("snapkv")
    _decompress_fails(run, _mutate(path, tmp_path / "bad.kvcz", meta={"evicts": "false"}), tmp_path,
                      "metadata evicts is false, but snapkv evicts tokens in layer 0")
    index = {k: v + 1000 for k, v in _contents(path)[0].items() if k.endswith(".index")}
    _decompress_fails(run, _mutate(path, tmp_path / "index.kvcz", tensors=index), tmp_path,
                      "layer 0 does not decode with snapkv")


def test_valid_compressed_files_still_decode(run, compressed, tmp_path):
    for method in ("int", "snapkv+int", "turboquant"):
        out = tmp_path / f"{method}.safetensors"
        code, _, err = run("decompress", compressed(method), "-o", out, "--device", "cpu")
        assert code == 0, err
        decoded = CaptureFile(out)
        assert decoded.layers == [0, 1] and decoded.tensor(1, "v").shape == (1, 2, 32, 16)
    cf = CompressedFile(compressed("int"))
    assert cf.layers == [0, 1] and cf.params["bits"] == 4 and cf.evicts is False and cf.bits_per_entry > 4


# ----------------------------------------------------------------------------- policy, results, baseline


RESULT = {"method": "int", "params": {"bits": 4}, "bits_per_entry": 4.5,
          "summary": {"k": {"mse_rel": 0.01}, "v": {"mse_rel": 0.02, "attn_kl": None}}}


@pytest.mark.parametrize("text, message", [
    ("[limits]\nmse_rel = nan\n", "policy: limits.mse_rel must be a number, got nan"),
    ("[limits]\nmse_rel = inf\n", "policy: limits.mse_rel must be a number, got inf"),
    ("[budget]\ncontext = 4096\n", "policy: budget.max_gb is missing"),
    ("[budget]\nmax_gb = [1]\ncontext = 4096\n", "policy: budget.max_gb must be a number, got [1]"),
    ("[run]\nmethod = 'int'\nseed = 1.5\n", "policy: run.seed must be an integer >= 0, got 1.5"),
    ("[run]\nmethod = 'int'\n[run.params]\nbits = 'four'\n", "policy: run.params: bits expects int, got 'four'"),
    ("[run]\nmethod = 'int'\n[run.params]\nsymmetric = 1\n", "policy: run.params: symmetric expects bool, got 1"),
    ("[run]\nmethod = 'int'\nextra = 1\n", "policy: unknown key run.extra (expected one of: method,"),
    ("memory = 5\n", "policy: memory must be a table, got 5"),
    ("a = " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper than 64 levels"),
    ("[run]\nmethod = 'int'\n[run.params]\nbits = " + "[" * 70 + "]" * 70 + "\n", "nested deeper than 64 levels"),
])
def test_policy_names_the_key(run, tmp_path, text, message):
    policy = tmp_path / "p.toml"
    policy.write_text(text)
    with pytest.raises(KvcError, match=re.escape(message)):
        load_policy(policy)
    results = tmp_path / "r.json"
    results.write_text(json.dumps(RESULT))
    _one_line_exit_2(run("check", results, "--policy", policy), message)


def test_policy_not_text(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_bytes(b"\xff\xfe[limits]")
    with pytest.raises(KvcError, match=re.escape(f"policy {policy}: not UTF-8 text")):
        load_policy(policy)


def _changed(**changes) -> dict:
    result = json.loads(json.dumps(RESULT))
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = result
        for key in parents:
            node = node[key]
        node[last] = value
    return result


@pytest.mark.parametrize("result, message", [
    (_changed(label=5), "r.json: label must be a string, got 5"),
    (_changed(method=["int"]), "r.json: method must be a non-empty string, got ['int']"),
    (_changed(bits_per_entry=-1), "r.json: bits_per_entry must be >= 0, got -1"),
    (_changed(params=[4]), "r.json: params must be an object, got [4]"),
    (_changed(capture="c.safetensors"), "r.json: capture must be an object, got 'c.safetensors'"),
    (_changed(**{"summary.k.mse_rel": "0.01"}), "r.json: summary.k.mse_rel must be a number, got '0.01'"),
    (_changed(**{"summary.v": [0.02]}), "r.json: summary.v must be an object, got [0.02]"),
    (_changed(memory={"entries": 10, "nominal_bytes": 5, "array_bytes": 5}), "r.json: memory.file_bytes is missing"),
    (_changed(memory={"entries": 10, "nominal_bytes": 5, "array_bytes": 5, "file_bytes": 6, "peak_bytes": 9}),
     "r.json: memory.peak_method is missing"),
    (_changed(memory={"entries": 10, "nominal_bytes": 5, "array_bytes": 5, "file_bytes": "6"}),
     "r.json: memory.file_bytes must be a number, got '6'"),
])
def test_results_name_the_key(run, tmp_path, result, message):
    with pytest.raises(KvcError, match=re.escape(message)):
        parse_results(result, "r.json")
    policy = tmp_path / "p.toml"
    policy.write_text("[limits]\nbits_per_entry = 5\n")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    _one_line_exit_2(run("check", path, "--policy", policy), message)


def test_baseline_names_the_key(run, tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text("[limits]\nbits_per_entry = 5\n")
    results = tmp_path / "r.json"
    results.write_text(json.dumps(RESULT))
    report = {"schema": "kvc-check/1", "results": [RESULT, _changed(label={"x": 1})]}
    with pytest.raises(KvcError, match=re.escape("baseline b.json results[1]: label must be a string, got {'x': 1}")):
        parse_baseline(report, "b.json")
    for text, message in (('{"schema": "kvc-check/1", "results": [' + "[" * 100_000 + "]" * 100_000 + "]}",
                           "nested deeper than 64 levels"),
                          ('{"schema": "kvc-check/1", "results": [{"method": "int", "bits_per_entry": NaN}]}',
                           "not valid JSON (NaN is not a JSON number"),
                          ('{"schema": "kvc-check/1", "results": [{"bits_per_entry": 4, "summary": {}}]}',
                           "results[0]: not kvc results")):
        baseline = tmp_path / "b.json"
        baseline.write_text(text)
        _one_line_exit_2(run("check", results, "--policy", policy, "--baseline", baseline),
                         f"baseline {baseline}", message)


def test_budget_from_json_is_bounded(run, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    _one_line_exit_2(run("budget", "--from-json", deep, "--layers", "2", "--kv-heads", "1", "--head-dim", "8"),
                     f"--from-json {deep}: nested deeper than 64 levels")
