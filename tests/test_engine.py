"""kvc compress / decompress / methods / sweep: round trips, audited bits, loud failures, bad input."""

import dataclasses
import json
import math
import re
import struct

import pytest
import torch

from kvc.io.capture import CaptureFile
from kvc.compression import registry
from kvc.compression.protocol import Compressor, Evictor, TensorCompressor, option
from kvc.compression.registry import available
from kvc.compression.engine import CompressedFile
from kvc.metrics.fidelity import mse_rel
from kvc.metrics.pareto import bit_saving, pareto_front

EVICTORS = ("adakv", "expected_attention", "gvote", "h2o", "keydiff", "knorm", "pyramidkv", "snapkv", "streamingllm",
            "tova")
TENSOR_COMPRESSORS = ("eoptshrinkq", "fp16", "fp8", "int", "kivi", "kvquant", "qjl", "svdq", "think", "turboquant")
LAYER_MERGERS = ("minicache",)  # methods that store arrays shared by adjacent layers (Compressor.groups)
METHODS = tuple(sorted(EVICTORS + TENSOR_COMPRESSORS + LAYER_MERGERS))
WITH_BITS = ("eoptshrinkq", "int", "kivi", "kvquant", "svdq", "turboquant")
WITH_GROUP_SIZE = ("kivi", "qjl")
# options that make each evictor drop tokens of the spiked capture (gvote's default nucleus 0.95 keeps them all)
EVICTING = {"gvote": ("--nucleus", "0.5")}
SMALL = dict(num_layers=2, num_kv_heads=2, num_heads=4, head_dim=64, seq_len=512)


@pytest.fixture
def capture(synth_capture):
    return synth_capture(**SMALL)


def layer_spans(path):
    """Bytes on disk of the ``layers.*`` tensors, and the file's header size, from the raw header."""
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    spans = sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k.startswith("layers."))
    return spans, 8 + n


def keep_of(path, layer):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor(f"layers.{layer}.keep")


def compress(run, capture, tmp_path, method, *options):
    out, js = tmp_path / f"{method}.kvcz", tmp_path / f"{method}.json"
    code, stdout, stderr = run("compress", capture, "--method", method, *options, "--out", out,
                               "--json", js, "--device", "cpu")
    assert code == 0, stderr
    return out, json.loads(js.read_text())


def check_round_trip(run, capture, tmp_path, method, *options):
    """compress --out, then decompress: bits agree with the bytes on disk, and the decoded file gives
    back exactly the reconstruction the metrics saw."""
    out, report = compress(run, capture, tmp_path, method, *options)
    src = CaptureFile(capture)
    entries = 2 * len(src.layers) * SMALL["num_kv_heads"] * SMALL["seq_len"] * SMALL["head_dim"]
    spans, _ = layer_spans(out)
    assert math.isclose(report["bits_per_entry"] * entries / 8, spans, rel_tol=0.01)
    dec = tmp_path / f"{method}.dec.safetensors"
    code, _, stderr = run("decompress", out, "-o", dec, "--queries", capture, "--device", "cpu")
    assert code == 0, stderr
    back = CaptureFile(dec)
    for L in src.layers:
        for t in ("k", "v"):
            measured = [r["mse_rel"] for r in report["heads"] if r["layer"] == L and r["tensor"] == t]
            again = mse_rel(src.tensor(L, t), back.tensor(L, t)).tolist()
            assert again == pytest.approx(measured, rel=1e-4, abs=1e-9), (method, L, t)
        assert back.has(L, "k_pre") and back.has(L, "q")
    return report, back


def test_fp16_round_trip_and_file_size(run, capture, tmp_path):
    report, back = check_round_trip(run, capture, tmp_path, "fp16")
    assert report["bits_per_entry"] == 16 and report["bits_per_entry_paper"] is None
    assert {"k", "v", "kv"} <= set(report["summary"])
    assert len(report["heads"]) == 2 * 2 * 3
    row = report["heads"][0]
    assert {"layer", "head", "tensor", "mse_rel", "bits_per_entry"} <= set(row)
    assert report["summary"]["k"]["mse_rel"] < 1e-6 and report["summary"]["k"]["ip_slope"] == pytest.approx(1, abs=1e-4)
    # the whole file, header included, is within 1% of the counted bits
    size = (tmp_path / "fp16.kvcz").stat().st_size
    assert math.isclose(size, report["bits_per_entry"] * 2 * 2 * 2 * 512 * 64 / 8, rel_tol=0.01)
    assert CompressedFile(tmp_path / "fp16.kvcz").source.model == "synthetic:spiked"


def _with(option_name):
    """Registered methods that take the option ``option_name``."""
    return tuple(n for n, c in sorted(available().items())
                 if option_name in {f.name for f in dataclasses.fields(c.Options)})


def test_registry_holds_the_expected_methods():
    """The lists the tests below run over are the registry's, so no method drops out of them unseen."""
    registry = available()
    assert tuple(sorted(registry)) == METHODS
    assert tuple(n for n in METHODS if issubclass(registry[n], Evictor)) == EVICTORS
    assert tuple(n for n in METHODS if issubclass(registry[n], TensorCompressor)) == TENSOR_COMPRESSORS
    assert tuple(n for n in METHODS if registry[n].groups is not Compressor.groups) == LAYER_MERGERS
    assert _with("bits") == WITH_BITS and _with("group_size") == WITH_GROUP_SIZE


@pytest.mark.parametrize("method", METHODS)
def test_every_method_round_trips(run, capture, tmp_path, method):
    check_round_trip(run, capture, tmp_path, method)


@pytest.mark.parametrize("evictor", EVICTORS)
def test_combination_round_trips(run, capture, tmp_path, evictor):
    report, back = check_round_trip(run, capture, tmp_path, f"{evictor}+turboquant", "--keys", "pre",
                                    *EVICTING.get(evictor, ()))
    keep = keep_of(back.path, 0)
    assert 0 < keep.float().mean() < 1
    assert torch.all(back.tensor(0, "v")[~keep] == 0)


@pytest.mark.parametrize("evictor", EVICTORS)
def test_combination_of_fp16_keeps_kept_tokens_at_true_positions(run, capture, tmp_path, evictor):
    _, back = check_round_trip(run, capture, tmp_path, f"{evictor}+fp16", "--keys", "pre", *EVICTING.get(evictor, ()))
    src, keep = CaptureFile(capture), keep_of(back.path, 0)
    assert 0 < keep.float().mean() < 1
    err = (back.tensor(0, "k") - src.tensor(0, "k"))[keep]
    assert err.abs().max() < 2e-2 * src.tensor(0, "k").abs().max()  # fp16 error only: RoPE at true positions


def test_options_parse_by_flag_and_opt(run, capture, tmp_path):
    _, a = compress(run, capture, tmp_path, "fp16", "--keys", "pre")
    _, b = compress(run, capture, tmp_path, "fp16", "--opt", "keys=pre", "--force")
    assert a["params"]["keys"] == b["params"]["keys"] == "pre"


def test_unknown_method_and_option_list_valid_ones(run, capture):
    code, _, err = run("compress", capture, "--method", "nosuch")
    assert code == 2 and "fp16" in err and len(err.strip().splitlines()) == 1
    code, _, err = run("compress", capture, "--method", "fp16", "--bogus", "3")
    assert code == 2 and "--keys" in err and "--bogus" in err
    code, _, err = run("compress", capture, "--method", "fp16", "--keys", "sideways")
    assert code == 2 and "pre" in err


@pytest.mark.parametrize("method", WITH_BITS)
def test_zero_bits_is_a_one_line_error(run, capture, method):
    code, _, err = run("compress", capture, "--method", method, "--bits", "0", "--device", "cpu")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1
    assert re.fullmatch(rf"kvc: error: {method}: --bits must be in \[1, [48]\], got 0", err.strip()), err


@pytest.mark.parametrize("method", WITH_GROUP_SIZE)
def test_group_larger_than_head_dim_is_a_one_line_error(run, capture, method):
    code, _, err = run("compress", capture, "--method", method, "--group-size", "100000", "--device", "cpu")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1
    assert err == f"kvc: error: {method}: --group-size must divide head_dim 64, got 100000\n"


def test_methods_lists_options(run):
    code, out, _ = run("methods", "--json")
    assert code == 0
    listed = {m["name"]: m for m in json.loads(out)["methods"]}
    assert set(listed) == set(METHODS)
    assert {"name", "flag", "default", "valid", "help"} <= set(listed["fp16"]["options"][0])


class _Cheat(TensorCompressor):
    """Claims --bits but stores 1 bit per entry, or produces NaN."""

    name = "cheat"
    summary = "test double"

    @dataclasses.dataclass
    class Options(TensorCompressor.Options):
        bits: int = option(4, "bits asked")
        nan: bool = option(False, "decode NaN")

    def encode_tensor(self, x, kind, layer, generator):
        return {"signs": torch.zeros(x.numel() // 8, dtype=torch.uint8)}, {}, None

    def decode_tensor(self, arrays, meta, kind, shape):
        return torch.full(shape, float("nan") if self.options.nan else 0.0)


def test_methods_that_cheat_fail_loudly(run, capture, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "cheat", _Cheat)
    code, _, err = run("compress", capture, "--method", "cheat", "--device", "cpu")
    assert code == 2 and "asked for 4" in err
    code, _, err = run("compress", capture, "--method", "cheat", "--bits", "1", "--nan", "--device", "cpu")
    assert code == 2 and "NaN" in err


def test_pareto_and_bit_saving():
    tq = [(1.0, 0.4, 1), (2.0, 0.1, 2), (3.0, 0.025, 3), (3.5, 0.05, 3.5)]
    assert pareto_front(tq) == tq[:3]
    rows = bit_saving([(1.5, 0.1, 1), (2.5, 0.05, 2), (0.5, 0.9, 0)], tq)
    assert rows[0]["saving"] == pytest.approx(0.5)
    assert rows[1]["reference_bits_per_entry"] == pytest.approx(2.5)  # halfway in log mse
    assert rows[2]["saving"] is None and rows[2]["outside"] == "higher"


def test_sweep_writes_json_and_plots(run, synth_capture, tmp_path):
    capture = synth_capture(num_layers=1, num_kv_heads=1, num_heads=2, head_dim=64, seq_len=256)
    methods = ["eoptshrinkq", "turboquant", "fp16"]
    out_dir = tmp_path / "sweep"
    code, out, err = run("sweep", capture, "--methods", ",".join(methods), "--bits", "2,3",
                         "--out-dir", out_dir, "--device", "cpu", "--query-stride", "4")
    assert code == 0, err
    report = json.loads((out_dir / "sweep.json").read_text())
    assert (out_dir / "pareto_mse_rel.png").stat().st_size > 0
    assert any(s["method"] == "fp16" for s in report["skipped"]) and "fp16 has no --bits" in err
    savings = report["savings"]["eoptshrinkq_vs_turboquant"]
    assert set(savings) == {"k_pre", "k", "v"}
    printed = " ".join(out.split())
    for rows in savings.values():
        for row in rows:
            if row["saving"] is None:
                assert row["outside"] in ("lower", "higher")
            else:
                assert row["saving"] == pytest.approx(row["reference_bits_per_entry"] - row["bits_per_entry"])
                assert f"saving {row['saving']:+.3f} bits per entry" in printed
    assert savings["k_pre"][0]["saving"] > 0  # spiked keys: eoptshrinkq's low-rank part pays at 2 bits
