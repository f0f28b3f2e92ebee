"""The quantization methods through the compressor protocol: round trips, exact bit accounting
(docs/methods.md#oracle-bits and the methods' own formulas), determinism, keys pre/post, loud failures."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from kvc.compression.protocol import LayerKV, TensorCompressor, rotate_keys
from kvc.compression.registry import available, build
from kvc.compression.methods.kivi import quantized_tokens
from kvc.compression.methods.kvquant import paper_bits
from kvc.errors import KvcError, MethodFailure
from kvc.model.synth import _rope_meta

S, H, HQ, T, D = 1, 2, 4, 96, 64
N, ROWS = S * H * T * D, S * H * T
QUANT_METHODS = ["turboquant", "qjl", "kivi", "kvquant", "int", "fp8"]


def _bytes_bits(n_codes: int, bits: int) -> int:
    return math.ceil(n_codes * bits / 8) * 8


@pytest.fixture(scope="module")
def layer() -> LayerKV:
    g = torch.Generator().manual_seed(0)
    chan = torch.linspace(0.3, 4.0, D)  # uneven channel scales and offsets, like real keys
    k_pre = torch.randn(S, H, T, D, generator=g) * chan + torch.randn(S, H, 1, D, generator=g) * 2
    v = torch.randn(S, H, T, D, generator=g)
    q = torch.randn(S, HQ, T, D, generator=g) * chan.flip(0)
    rope = _rope_meta(D)
    base = LayerKV(3, k_pre, v, q, torch.arange(T), k_pre=k_pre, rope=rope, num_layers=4)
    return dataclasses.replace(base, k=rotate_keys(k_pre, base))


def _run(name: str, layer: LayerKV, **opts):
    method = build(name, **opts)
    method.validate(layer)
    enc = method.encode(layer)
    dec = method.decode(enc, layer)
    assert dec.k.shape == dec.v.shape == layer.k.shape
    assert bool(torch.isfinite(dec.k).all()) and bool(torch.isfinite(dec.v).all())
    # Encoded.nbits() is the sum of the real array bytes
    assert enc.nbits() == sum(a.numel() * a.element_size() * 8 for a in enc.arrays.values())
    return method, enc, dec


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@pytest.mark.parametrize("name", QUANT_METHODS)
def test_registry_and_options(name):
    methods = available()
    assert name in methods, sorted(methods)
    cls = methods[name]
    assert issubclass(cls, TensorCompressor) and cls.summary and cls.paper
    assert issubclass(cls.Options, TensorCompressor.Options)
    for f in dataclasses.fields(cls.Options):
        assert f.metadata.get("help"), (name, f.name)
    assert build(name).options.keys == ("pre" if name == "kvquant" else "post")


# ------------------------------------------------------------------ turboquant


def _tq_part_bits(rows: int, ch: int, b: int, variant: str) -> int:
    mse_b = b - 1 if variant == "prod" else b
    bits = 64 * (2 if variant == "prod" else 1)  # seeds
    if mse_b:
        bits += _bytes_bits(rows * ch, mse_b) + 16 * rows + 32 * 2**mse_b
    if variant == "prod":
        bits += _bytes_bits(rows * ch, 1) + 16 * rows
    return bits


@pytest.mark.parametrize("variant,bits,rotation,max_rel", [
    ("mse", 1, "haar", 0.40), ("mse", 3, "hadamard", 0.045), ("mse", 4, "haar", 0.012),
    ("prod", 1, "haar", 1.7), ("prod", 3, "hadamard", 0.20), ("mse", 2.5, "haar", 0.09),
    ("prod", 3.5, "hadamard", 0.12)])
def test_turboquant_round_trip_and_bits(layer, variant, bits, rotation, max_rel):
    method, enc, dec = _run("turboquant", layer, variant=variant, bits=bits, rotation=rotation)
    assert _rel(dec.k, layer.k) < max_rel and _rel(dec.v, layer.v) < max_rel
    split = [(D, int(bits))] if bits == int(bits) else [(D // 2, math.ceil(bits)), (D // 2, math.floor(bits))]
    per_tensor = sum(_tq_part_bits(ROWS, ch, b, variant) for ch, b in split)
    if len(split) == 2:
        per_tensor += _bytes_bits(S * H * D, 1)  # channel mask
    assert enc.nbits() == 2 * per_tensor
    assert enc.bits_paper == bits
    code_bits = sum(a.numel() * 8 for n, a in enc.arrays.items() if n.endswith(("codes", "signs")))
    assert code_bits == pytest.approx(2 * N * bits, abs=64)


def test_turboquant_paper_split_bit_accounting(layer):
    """docs/methods.md#turboquant-bits: 2.5-bit split = 2.5 code bits + one fp16 norm per part and row (here d = 64)."""
    _, enc, _ = _run("turboquant", layer, bits=2.5)
    codes = sum(a.numel() * 8 for n, a in enc.arrays.items() if n.endswith("codes"))
    assert codes / (2 * N) == 2.5
    norms = sum(a.numel() * 16 for n, a in enc.arrays.items() if n.endswith("norm"))
    assert norms / (2 * N) == 2 * 16 / D  # two sub-vector norms (+0.25 at d = 128)
    # the rest: two codebooks (8 + 4 fp32 centroids), two int64 seeds and the 1-bit channel mask
    assert enc.nbits() - codes - norms == 2 * (32 * (8 + 4) + 2 * 64 + S * H * D)


def test_turboquant_deterministic_under_seed(layer):
    a = build("turboquant", bits=2, seed=1).encode(layer)
    b = build("turboquant", bits=2, seed=1).encode(layer)
    c = build("turboquant", bits=2, seed=2).encode(layer)
    assert all(torch.equal(a.arrays[n], b.arrays[n]) for n in a.arrays)
    assert not torch.equal(a.arrays["k.p0.codes"], c.arrays["k.p0.codes"])
    assert a.arrays["k.p0.seed"].dtype == torch.int64 and a.arrays["k.p0.seed"].dim() == 0


@pytest.mark.parametrize("opts,message", [
    (dict(bits=0), "turboquant: --bits must be in [1, 4], got 0"),
    (dict(bits=5), "turboquant: --bits must be in [1, 4], got 5"),
    (dict(bits=4.5), "turboquant: --bits must be in [1, 4], got 4.5"),
    (dict(bits=0.5), "turboquant: --bits must be in [1, 4], got 0.5"),
    (dict(bits=float("nan")), "turboquant: --bits must be in [1, 4], got nan"),
    (dict(bits=2.3), "2.3 bits at d = 64 would need 19.2 channels at 3 bits; the fractional part times d "
                     "must be a whole number (e.g. 2.5 bits = 32 channels at 3 + 32 at 2)"),
    (dict(variant="bad"), "turboquant: --variant must be one of mse, prod, got 'bad'"),
    (dict(rotation="dct"), "turboquant: --rotation must be one of haar, hadamard, got 'dct'")])
def test_turboquant_bad_options(layer, opts, message):
    with pytest.raises(KvcError, match="^" + re.escape(message) + "$"):
        _run("turboquant", layer, **opts)


# ------------------------------------------------------------------ kivi


def test_kivi_round_trip_and_bits(layer):
    B, G, R = 2, 32, 20
    _, enc, dec = _run("kivi", layer, bits=B, group_size=G, residual=R)
    nk, nv = quantized_tokens("k", T, G, R), quantized_tokens("v", T, G, R)
    assert (nk, nv) == (64, 76)
    # the fp16 window is exact (to fp16)
    assert torch.equal(dec.k[..., nk:, :], layer.k[..., nk:, :].half().float())
    assert torch.equal(dec.v[..., nv:, :], layer.v[..., nv:, :].half().float())
    assert _rel(dec.k, layer.k) < 0.1 and _rel(dec.v, layer.v) < 0.15
    k_bits = _bytes_bits(S * H * nk * D, B) + 32 * S * H * nk * D // G + 16 * S * H * (T - nk) * D
    v_bits = _bytes_bits(S * H * nv * D, B) + 32 * S * H * nv * D // G + 16 * S * H * (T - nv) * D
    assert enc.nbits() == k_bits + v_bits
    assert enc.bits_paper == 3.0  # B + 32/G at B = 2, G = 32 (docs/methods.md#kivi)


def test_kivi_2_gs32_r128_at_32k_is_3_05():
    """docs/methods.md#oracle-bits: KIVI-2-gs32-r128 at 32K = 3 + (128/32768) * 13 = 3.05 bits, fully counted."""
    t, d = 32768, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, t, d, generator=g)
    lay = LayerKV(0, x, x.clone(), torch.randn(1, 1, 1, d), torch.tensor([t - 1]))
    enc = build("kivi").encode(lay)
    assert enc.nbits() / (2 * x.numel()) == pytest.approx(3 + 128 / 32768 * 13, abs=1e-4)
    assert enc.nbits() / (2 * x.numel()) == pytest.approx(3.05, abs=0.001)


@pytest.mark.parametrize("opts,error,message", [
    (dict(group_size=128), KvcError, "kivi: --group-size must divide head_dim 64, got 128"),
    (dict(group_size=48), KvcError, "kivi: --group-size must divide head_dim 64, got 48"),
    (dict(residual=128), MethodFailure, "kivi: 96 tokens leave no full group of 32 keys outside the fp16 "
                                        "window of 128; nothing would be quantized (lower --residual)"),
    (dict(bits=0), KvcError, "kivi: --bits must be in [1, 8], got 0"),
    (dict(residual=-1), KvcError, "kivi: --residual must be >= 0, got -1"),
    (dict(group_size=0), KvcError, "kivi: --group-size must be >= 1, got 0")])
def test_kivi_bad_options(layer, opts, error, message):
    with pytest.raises(error, match="^" + re.escape(message) + "$"):
        _run("kivi", layer, **opts)


# ------------------------------------------------------------------ qjl


@pytest.mark.parametrize("opts", [dict(), dict(outliers=4, outlier_sketch_dim=64, residual=10, orthogonal=False)])
def test_qjl_round_trip_and_bits(layer, opts):
    method, enc, dec = _run("qjl", layer, **opts)
    o = method.options
    n = T if not o.outliers else ((T - o.residual) // o.group_size) * o.group_size
    k_bits = _bytes_bits(S * H * n * o.sketch_dim, 1) + 16 * S * H * n + 64 + 16 * S * H * (T - n) * D
    if o.outliers:
        k_bits += _bytes_bits(S * H * n * o.outlier_sketch_dim, 1) + 16 * S * H * n
    v_bits = (_bytes_bits(S * H * n * D, o.value_bits) + 32 * S * H * n * D // o.group_size
              + 16 * S * H * (T - n) * D)
    assert enc.nbits() == k_bits + v_bits and enc.bits_paper is None
    # keys: unbiased inner products with the real queries (slope ~ 1), values: 2-bit groups
    q = layer.q[:, ::2]
    a = (q @ layer.k.transpose(-1, -2)).flatten()
    c = (q @ dec.k.transpose(-1, -2)).flatten()
    assert float((a * c).sum() / (a * a).sum()) == pytest.approx(1.0, abs=0.05)
    assert _rel(dec.v, layer.v) < 0.2  # 2-bit min/max of Gaussian groups of 32: ~0.16


@pytest.mark.parametrize("opts,error,message", [
    (dict(sketch_dim=0), KvcError, "qjl: --sketch-dim must be >= 1, got 0"),
    (dict(group_size=128), KvcError, "qjl: --group-size must divide head_dim 64, got 128"),
    (dict(value_bits=9), KvcError, "qjl: --value-bits must be in [1, 8], got 9"),
    (dict(outliers=64), KvcError, "qjl: --outliers must be < head_dim 64, got 64"),
    (dict(outliers=-1), KvcError, "qjl: --outliers must be >= 0, got -1"),
    (dict(residual=96), MethodFailure, "qjl: no token of 96 is outside the fp16 window (lower --residual)")])
def test_qjl_bad_options(layer, opts, error, message):
    with pytest.raises(error, match="^" + re.escape(message) + "$"):
        _run("qjl", layer, **opts)


# ------------------------------------------------------------------ kvquant


@pytest.mark.parametrize("opts", [dict(), dict(fisher="uniform", keys="post", bits=2, outlier_frac=0.05)])
def test_kvquant_round_trip_and_bits(layer, opts):
    method, enc, dec = _run("kvquant", layer, **opts)
    o = method.options
    X, L = o.bits, T - 1
    assert dec.k_pre is not None if o.keys == "pre" else dec.k_pre is None
    src = layer.k_pre if o.keys == "pre" else layer.k
    got = dec.k_pre if o.keys == "pre" else dec.k
    assert torch.equal(got[..., 0, :], src[..., 0, :].half().float())  # attention sink in fp16
    assert _rel(got, src) < (0.03 if X == 3 else 0.12) and _rel(dec.v, layer.v) < (0.03 if X == 3 else 0.12)
    if o.keys == "pre":
        assert torch.allclose(dec.k, rotate_keys(dec.k_pre, layer), atol=1e-5)
    # outliers are exact (fp16) and there are round(f * L) per vector
    k_out, v_out = round(o.outlier_frac * L), round(o.outlier_frac * D)
    assert enc.arrays["k.out_value"].shape == (S, H, D, k_out)
    assert enc.arrays["v.out_value"].shape == (S, H, L, v_out)
    idx = enc.arrays["k.out_index"].long()
    assert torch.equal(got[..., 1:, :].transpose(-1, -2).gather(-1, idx),
                       src[..., 1:, :].transpose(-1, -2).gather(-1, idx).half().float())
    k_bits = (16 * S * H * D + _bytes_bits(S * H * D * L, X) + 32 * S * H * D + 32 * 2**X
              + S * H * D * k_out * (16 + 8))
    v_bits = (16 * S * H * D + _bytes_bits(S * H * L * D, X) + 32 * S * H * L + 32 * 2**X
              + S * H * L * v_out * (16 + 8))
    assert enc.nbits() == k_bits + v_bits
    assert enc.bits_paper == pytest.approx(paper_bits(X, o.outlier_frac))


def test_kvquant_nuq3_1pct_paper_bits():
    """docs/methods.md#oracle-bits: KVQuant nuq3-1% ~ 3.33 bits (X + fp16 value and 16-bit index per outlier)."""
    assert paper_bits(3, 0.01) == pytest.approx(3.33, abs=0.015)
    assert paper_bits(4, 0.01) == pytest.approx(4.33, abs=0.015)
    assert paper_bits(2, 0.01) == pytest.approx(2.33, abs=0.015)


def test_kvquant_fisher_proxy_changes_the_codebook(layer):
    a = build("kvquant").encode(layer).arrays["k.codebook"]
    b = build("kvquant", fisher="uniform").encode(layer).arrays["k.codebook"]
    assert a.shape == b.shape == (8,) and not torch.equal(a, b)


def test_kvquant_fisher_weights_come_from_the_layer_it_is_given(layer):
    """encode_tensor receives the layer: the Fisher proxy is computed per call, no state on the instance."""
    method = build("kvquant")
    whole = method.encode(layer)
    arrays, _, _ = method.encode_tensor(layer.k_pre, "k", layer, method.generator(layer.layer))
    assert arrays.keys() == {n[2:] for n in whole.arrays if n.startswith("k.")}
    assert all(torch.equal(whole.arrays[f"k.{n}"], a) for n, a in arrays.items())
    other = dataclasses.replace(layer, q=layer.q.flip(-1))  # queries that weight other channels
    moved, _, _ = method.encode_tensor(layer.k_pre, "k", other, method.generator(layer.layer))
    assert not torch.equal(moved["codebook"], arrays["codebook"])
    assert vars(method).keys() == {"options"}


@pytest.mark.parametrize("opts,message", [
    (dict(bits=0), "kvquant: --bits must be in [1, 8], got 0"),
    (dict(outlier_frac=0.6), "kvquant: --outlier-frac must be in [0, 0.5), got 0.6"),
    (dict(outlier_frac=0.5), "kvquant: --outlier-frac must be in [0, 0.5), got 0.5"),
    (dict(fisher="grad"), "kvquant: --fisher must be one of query, uniform, got 'grad'"),
    (dict(keys="mid"), "kvquant: --keys must be one of pre, post, got 'mid'")])
def test_kvquant_bad_options(layer, opts, message):
    with pytest.raises(KvcError, match="^" + re.escape(message) + "$"):
        _run("kvquant", layer, **opts)


def test_kvquant_needs_k_pre_for_pre(layer):
    no_pre = dataclasses.replace(layer, k_pre=None)
    with pytest.raises(KvcError, match=re.escape("--keys pre needs k_pre, which this capture lacks")):
        build("kvquant").encode(no_pre)


# ------------------------------------------------------------------ int, fp8


@pytest.mark.parametrize("opts,scale_count,params", [
    (dict(), ROWS, 2), (dict(axis="channel", bits=3), S * H * D, 2),
    (dict(symmetric=True, bits=8), ROWS, 1), (dict(axis="channel", symmetric=True, bits=2), S * H * D, 1)])
def test_int_round_trip_and_bits(layer, opts, scale_count, params):
    method, enc, dec = _run("int", layer, **opts)
    B = method.options.bits
    assert enc.nbits() == 2 * (_bytes_bits(N, B) + 16 * params * scale_count)
    assert _rel(dec.v, layer.v) < {2: 0.7, 3: 0.06, 4: 0.02, 8: 1e-4}[B]  # 2-bit symmetric: 3 levels


@pytest.mark.parametrize("opts,message", [
    (dict(bits=0), "int: --bits must be in [1, 8], got 0"),
    (dict(bits=9), "int: --bits must be in [1, 8], got 9"),
    (dict(bits=1, symmetric=True), "int: --bits must be in [2, 8] with --symmetric, got 1"),
    (dict(axis="head"), "int: --axis must be one of token, channel, got 'head'")])
def test_int_bad_options(layer, opts, message):
    with pytest.raises(KvcError, match="^" + re.escape(message) + "$"):
        _run("int", layer, **opts)


@pytest.mark.parametrize("fmt,max_rel", [("e4m3", 2e-3), ("e5m2", 6e-3)])
def test_fp8_round_trip_and_bits(layer, fmt, max_rel):
    _, enc, dec = _run("fp8", layer, format=fmt)
    assert enc.nbits() == 2 * (8 * N + 16 * S * H)
    assert _rel(dec.k, layer.k) < max_rel and _rel(dec.v, layer.v) < max_rel
    with pytest.raises(KvcError, match=re.escape("fp8: --format must be one of e4m3, e5m2, got 'e3m4'")):
        build("fp8", format="e3m4")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(KvcError, match="valid options"):
        build("turboquant", group_size=3)


def test_integer_options_accept_integral_floats_only(layer):
    bits = _run("kivi", layer, bits=2.0, residual=16)[0].options.bits  # 2.0 from a --bits 1,2,2.5 grid is fine
    assert bits == 2 and type(bits) is int
    with pytest.raises(KvcError, match=r"^kivi: --bits expects int, got 2\.5$"):
        _run("kivi", layer, bits=2.5, residual=16)
    with pytest.raises(KvcError, match=r"^int: --bits expects int, got True$"):
        _run("int", layer, bits=True)


def test_keys_pre_on_a_post_default_method(layer):
    _, enc, dec = _run("turboquant", layer, bits=4, keys="pre")
    assert dec.k_pre is not None and _rel(dec.k_pre, layer.k_pre) < 0.012
    assert torch.allclose(dec.k, rotate_keys(dec.k_pre, layer), atol=1e-5)
