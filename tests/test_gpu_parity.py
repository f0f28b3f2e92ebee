"""Parity of the kernels of kernels/*.cu with the torch reference (kvc.quant), bit for bit where deterministic.

Every parity test runs on two backends:

- ``cuda``: the kernels through cupy on a GPU (``@pytest.mark.gpu``; skipped without a GPU and cupy).
  These are the tests of record: run ``pytest -m gpu tests/test_gpu_parity.py`` on a GPU machine.
- ``emulator``: the same kernel sources compiled for the CPU with g++ (kernels/emulation) on CPU
  tensors. It runs here, without a GPU: it checks the kernels' indexing, bit layout, butterfly
  order and float operations, and every wrapper of kvc.gpu.ops, against the CPU torch reference.

The kernel entry points (``kernels.*_kernel``) are called directly, so a failed self-check cannot hide a
kernel behind the torch fallback. Inputs are fresh random draws each run (the seed is in every
failure message); outputs are poisoned (NaN, 0xA5) before each launch; NaN never compares equal.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import warnings

import pytest
import torch
from rich.console import Console

from kvc.cli.commands.bench import print_report
from kvc.errors import KvcError, MethodFailure
from kvc.gpu import kernels, ops, runtime, selfcheck
from kvc.gpu.bench import BenchResult, Row
from kvc.gpu.selfcheck import compare_close, compare_equal, compare_tq_encode, sample_rows
from kvc.quant.packing import pack_codes, unpack_codes
from kvc.quant.rotation import make_rotation
from kvc.quant.turboquant import channel_permutation, outlier_channels, split_bits, tq_codebook

EPS32 = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------- backends


def _cupy_missing() -> str | None:
    return runtime._cupy_import_error()


@pytest.fixture(scope="session")
def emulator():
    from kvc.gpu.emulator import EmulatorBackend

    if not (os.environ.get("CXX") or shutil.which("g++")):  # a kernel that fails to build fails the tests
        pytest.skip("no C++ compiler (g++ or $CXX) to build the kernel emulator")
    return EmulatorBackend()


@pytest.fixture(params=["emulator", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request, monkeypatch):
    """(backend, device) with poisoned outputs; no self-check may fail during the test."""
    monkeypatch.setenv(kernels.ENV_POISON, "1")
    selfcheck.reset()
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU")
        if _cupy_missing():
            pytest.skip(f"cupy not importable ({_cupy_missing()})")
        monkeypatch.delenv(runtime.ENV_DISABLE, raising=False)
        be = runtime.active_backend()
        assert be is not None and be.name == "cupy"
        yield be, torch.device("cuda")
    else:
        be = request.getfixturevalue("emulator")
        with runtime.use_backend(be):
            yield be, torch.device("cpu")
    failed = {k: v for k, v in selfcheck.results().items() if v is not None}
    assert not failed, f"self-checks failed: {failed}"


@pytest.fixture
def seed():
    return int.from_bytes(os.urandom(4), "little")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- TurboQuant encode / decode


@pytest.mark.parametrize("d", [8, 32, 64, 128, 256])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_tq_fused_encode_decode(backend, seed, d, bits):
    be, device = backend
    gen = _gen(seed)
    rot = make_rotation("hadamard", d, seed)
    cb = tq_codebook(d, bits)
    x = sample_rows((2, 3, 7, d), gen, device) * float(torch.rand(1, generator=gen) * 10 + 0.1)
    want = kernels.reference_tq_mse_encode_packed(x, bits, rot, cb)
    norm32 = torch.linalg.vector_norm(x, dim=-1)
    # given the reference's norms: bit-identical codes and norms
    got = kernels.tq_encode_kernel(be, x, bits, rot, cb, "fused", norm_in=norm32, poison=True)
    assert compare_tq_encode(x, bits, rot, cb, got, want, strict=True) is None, f"seed {seed}"
    # the kernel's own norms: identical except ties at a decision boundary (a float32 reduction order)
    got = kernels.tq_encode_kernel(be, x, bits, rot, cb, "fused", poison=True)
    problem = compare_tq_encode(x, bits, rot, cb, got, want, strict=False)
    assert problem is None, f"seed {seed}: {problem}"
    # decode of the reference codes: float tolerance (and NaN-free)
    packed, norms = want
    cb32 = cb.to(torch.float32)
    x_ref = kernels.reference_tq_mse_decode_packed(packed, bits, x.shape, norms, rot, cb32)
    x_got = kernels.tq_decode_kernel(be, packed, bits, x.shape, norms, rot, cb32, "fused", poison=True)
    atol = 8 * EPS32 * norms.to(torch.float32)[..., None]
    assert compare_close("decoded", x_got, x_ref, atol) is None, f"seed {seed}"


@pytest.mark.parametrize("d", [64, 128])
def test_tq_fused_decode_is_bit_exact(backend, seed, d):
    """The stronger claim of docs/gpu.md: decode repeats torch's float operations exactly."""
    be, device = backend
    rot = make_rotation("hadamard", d, seed)
    cb32 = tq_codebook(d, 3).to(torch.float32)
    x = sample_rows((3, 2, 9, d), _gen(seed), device)
    packed, norms = kernels.reference_tq_mse_encode_packed(x, 3, rot, cb32)
    x_ref = kernels.reference_tq_mse_decode_packed(packed, 3, x.shape, norms, rot, cb32)
    x_got = kernels.tq_decode_kernel(be, packed, 3, x.shape, norms, rot, cb32, "fused", poison=True)
    assert compare_equal("decoded", x_got, x_ref) is None, f"seed {seed}"


@pytest.mark.parametrize("kind,d,bits", [("haar", 64, 2), ("haar", 128, 3), ("hadamard", 96, 2), ("haar", 40, 4)])
def test_tq_rotated_mode(backend, seed, kind, d, bits):
    """Rotation by torch (Haar GEMM, or a Hadamard of a non-power-of-two size); quantize + pack in the
    kernel: the same torch ops up to the rotation, so the codes are bit-identical."""
    be, device = backend
    rot = make_rotation(kind, d, seed)
    assert kernels.tq_plan(d, bits, rot) == "rotated"
    cb = tq_codebook(d, bits)
    x = sample_rows((2, 2, 9, d), _gen(seed), device)
    want = kernels.reference_tq_mse_encode_packed(x, bits, rot, cb)
    got = kernels.tq_encode_kernel(be, x, bits, rot, cb, "rotated", poison=True)
    assert compare_tq_encode(x, bits, rot, cb, got, want, strict=True) is None, f"seed {seed}"
    cb32 = cb.to(torch.float32)
    x_ref = kernels.reference_tq_mse_decode_packed(*want[:1], bits, x.shape, want[1], rot, cb32)
    x_got = kernels.tq_decode_kernel(be, want[0], bits, x.shape, want[1], rot, cb32, "rotated", poison=True)
    assert compare_equal("decoded", x_got, x_ref) is None, f"seed {seed}"


def test_tq_outlier_split_through_the_public_functions(backend, seed):
    """2.5 bits at d = 128 as kvc.compression.methods.turboquant does it: channel split (torch), then
    one call per piece (strided views) through the public seam; reassembled output as the reference."""
    be, device = backend
    gen = _gen(seed)
    S, H, T, d = 1, 2, 11, 128
    x = sample_rows((S, H, T, d), gen, device)
    split = split_bits(2.5, d)
    mask = outlier_channels(x, split[0][0])
    perm = channel_permutation(mask)[..., None, :].expand_as(x)
    xp = x.gather(-1, perm)
    pieces = [xp[..., :split[0][0]], xp[..., split[0][0]:]]
    decoded, decoded_ref = [], []
    for i, ((ch, b), piece) in enumerate(zip(split, pieces)):
        rot = make_rotation("hadamard", ch, seed + i)
        cb = tq_codebook(ch, b)
        launches = len(getattr(be, "launches", []))
        packed, norms = ops.tq_mse_encode_packed(piece, b, rot, cb)
        if hasattr(be, "launches"):
            assert len(be.launches) > launches, "the public function did not use the kernel"
        want = kernels.reference_tq_mse_encode_packed(piece, b, rot, cb)
        assert compare_tq_encode(piece, b, rot, cb, (packed, norms), want, strict=False) is None, f"seed {seed}"
        cb32 = cb.to(torch.float32)
        decoded.append(ops.tq_mse_decode_packed(want[0], b, piece.shape, want[1], rot, cb32))
        decoded_ref.append(kernels.reference_tq_mse_decode_packed(want[0], b, piece.shape, want[1], rot, cb32))
    full = torch.empty_like(x).scatter(-1, perm, torch.cat(decoded, -1))
    full_ref = torch.empty_like(x).scatter(-1, perm, torch.cat(decoded_ref, -1))
    assert compare_close("reassembled", full, full_ref, 8 * EPS32 * x.norm(dim=-1, keepdim=True)) is None


def test_tq_bad_norm_fails_like_the_reference(backend):
    be, device = backend
    rot = make_rotation("hadamard", 64, 1)
    cb = tq_codebook(64, 2)
    x = torch.randn(2, 5, 64)
    x[1, 2, 3] = float("inf")
    x = x.to(device)
    with pytest.raises(MethodFailure, match="float16 range"):
        kernels.reference_tq_mse_encode_packed(x, 2, rot, cb)
    with pytest.raises(MethodFailure, match="float16 range"):
        kernels.tq_encode_kernel(be, x, 2, rot, cb, "fused")


# ----------------------------------------------------------------------------- scoring from packed codes


def _attention_case(seed, device, d, bits, kind="hadamard", Tq=3, T=133):
    gen = _gen(seed)
    rot = make_rotation(kind, d, seed)
    cb32 = tq_codebook(d, bits).to(torch.float32)
    S, H, G = 2, 2, 3
    shape = (S, H, T, d)
    k = sample_rows(shape, gen, device)
    packed, norms = kernels.reference_tq_mse_encode_packed(k, bits, rot, cb32)
    q = torch.randn(S, H * G, Tq, d, generator=gen).to(device)
    w = torch.softmax(torch.randn(S, H * G, Tq, T, generator=gen) * 2, dim=-1).to(device)
    return rot, cb32, shape, packed, norms, q, w


@pytest.mark.parametrize("d,bits", [(64, 2), (128, 4), (32, 3)])
def test_tq_score_from_packed_keys(backend, seed, d, bits):
    be, device = backend
    rot, cb32, shape, packed, norms, q, _ = _attention_case(seed, device, d, bits, Tq=7)
    want = kernels.reference_tq_score_packed(q, packed, bits, shape, norms, rot, cb32)
    got = kernels.tq_score_kernel(be, q, packed, bits, shape, norms, rot, cb32, poison=True)
    G = q.shape[1] // shape[1]
    scale = q.norm(dim=-1, keepdim=True) * norms.float().repeat_interleave(G, 1)[:, :, None]
    assert compare_close("logits", got, want, 1e-5 * scale) is None, f"seed {seed}"


@pytest.mark.parametrize("d,bits,kind", [(64, 2, "hadamard"), (128, 3, "haar"), (96, 2, "haar")])
def test_tq_value_from_packed_values(backend, seed, d, bits, kind):
    be, device = backend
    rot, cb32, shape, packed, norms, _, w = _attention_case(seed, device, d, bits, kind)
    want = kernels.reference_tq_value_packed(w, packed, bits, shape, norms, rot, cb32)
    got = kernels.tq_value_kernel(be, w, packed, bits, shape, norms, rot, cb32, poison=True)
    G = w.shape[1] // shape[1]
    scale = (w * norms.float().repeat_interleave(G, 1)[:, :, None, :]).sum(-1, keepdim=True)
    assert compare_close("attention output", got, want, 1e-5 * scale) is None, f"seed {seed}"


# ----------------------------------------------------------------------------- min/max groups (KIVI, int)


def _minmax_input(layout: str, g: int, gen, device):
    if layout == "kivi-keys":  # per channel, groups of g tokens, read through the transpose
        base = sample_rows((2, 3, 2 * g + 5, 64), gen, device)
        return base[..., : 2 * g, :].transpose(-1, -2), g
    if layout == "kivi-values":  # per token, groups of g channels
        return sample_rows((2, 3, 19, 64), gen, device), g
    if layout == "int-token":  # one group per token
        return sample_rows((2, 3, 19, 64), gen, device), None
    return sample_rows((3, 40, 48), gen, device).transpose(-1, -2), None  # int per channel


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["kivi-keys", "kivi-values", "int-token", "int-channel"])
def test_minmax_quantize_bit_identical(backend, seed, bits, layout):
    be, device = backend
    x, g = _minmax_input(layout, 32 if bits != 3 else 8, _gen(seed), device)
    want = kernels.reference_minmax_quantize_packed(x, bits, g)
    got = kernels.minmax_quantize_kernel(be, x, bits, g, poison=True)
    for name, a, b in zip(("packed codes", "scale", "zero"), got, want):
        assert compare_equal(name, a, b) is None, f"seed {seed}"
    shape = tuple(x.shape)
    x_ref = kernels.reference_minmax_dequantize_packed(want[0], bits, shape, want[1], want[2])
    x_got = kernels.minmax_dequantize_kernel(be, want[0], bits, shape, want[1], want[2], poison=True)
    assert compare_equal("dequantized", x_got, x_ref) is None, f"seed {seed}"


def test_minmax_bad_input_fails_like_the_reference(backend):
    be, device = backend
    x = torch.randn(2, 4, 64)
    x[1, 2, 3] = float("nan")
    x = x.to(device)
    for fn in (kernels.reference_minmax_quantize_packed, lambda *a: kernels.minmax_quantize_kernel(be, *a)):
        with pytest.raises(MethodFailure, match="float16 range"):
            fn(x, 2, 32)


# ----------------------------------------------------------------------------- real data


@pytest.mark.model
def test_real_capture(backend, seed, request):
    """TurboQuant (fused and Haar) and KIVI on K and V of the first and last captured layers of the real
    default model (or $KVC_GPU_TEST_CAPTURE)."""
    from kvc.io.capture import CaptureFile

    be, device = backend
    cap = CaptureFile(os.environ.get("KVC_GPU_TEST_CAPTURE") or request.getfixturevalue("default_capture")[0])
    for layer in (cap.layers[0], cap.layers[-1]):
        for name in ("k", "v"):
            x = cap.tensor(layer, name, torch.float32, device)
            d = x.shape[-1]
            for bits, kind in ((2, "hadamard"), (3, "haar")):
                rot = make_rotation(kind, d, seed)
                cb = tq_codebook(d, bits)
                mode = kernels.tq_plan(d, bits, rot)
                want = kernels.reference_tq_mse_encode_packed(x, bits, rot, cb)
                got = kernels.tq_encode_kernel(be, x, bits, rot, cb, mode, poison=True)
                problem = compare_tq_encode(x, bits, rot, cb, got, want, strict=mode == "rotated")
                assert problem is None, f"layer {layer} {name} {kind}: {problem}"
                x_got = kernels.tq_decode_kernel(be, want[0], bits, x.shape, want[1], rot, cb.float(), mode, poison=True)
                x_ref = kernels.reference_tq_mse_decode_packed(want[0], bits, x.shape, want[1], rot, cb.float())
                assert compare_close("decoded", x_got, x_ref, 8 * EPS32 * want[1].float()[..., None]) is None
            n = (x.shape[-2] // 32) * 32
            for view in (x[..., :n, :].transpose(-1, -2), x):
                want = kernels.reference_minmax_quantize_packed(view, 2, 32)
                got = kernels.minmax_quantize_kernel(be, view, 2, 32, poison=True)
                for what, a, b in zip(("codes", "scale", "zero"), got, want):
                    assert compare_equal(what, a, b) is None, f"layer {layer} {name}"


# ----------------------------------------------------------------------------- dispatch and fallback


def test_cpu_path_is_the_reference_itself(seed):
    """Without a backend for the device, the seam returns exactly the reference (no kernel, no copy)."""
    gen = _gen(seed)
    x = torch.randn(2, 3, 17, 64, generator=gen)
    rot = make_rotation("hadamard", 64, seed)
    assert runtime.backend_for(x) is None
    packed, norms = ops.tq_mse_encode_packed(x, 2, rot)
    ref = kernels.reference_tq_mse_encode_packed(x, 2, rot)
    assert torch.equal(packed, ref[0]) and torch.equal(norms, ref[1])
    codes, scale, zero = ops.minmax_quantize_packed(x, 2, 32)
    assert all(torch.equal(a, b) for a, b in zip((codes, scale, zero), kernels.reference_minmax_quantize_packed(x, 2, 32)))
    x64 = x.double()  # float64 stays on the reference everywhere
    assert kernels.tq_plan(64, 2, rot) == "fused"
    assert torch.equal(ops.tq_mse_encode_packed(x64, 2, rot)[0], kernels.reference_tq_mse_encode_packed(x64, 2, rot)[0])


def test_public_functions_use_the_kernel_after_a_passing_self_check(emulator, seed):
    selfcheck.reset()
    x = torch.randn(2, 2, 9, 64, generator=_gen(seed))
    rot = make_rotation("hadamard", 64, seed)
    with runtime.use_backend(emulator):
        before = len(emulator.launches)
        packed, norms = ops.tq_mse_encode_packed(x, 2, rot)
        ops.minmax_quantize_packed(x, 2, 32)
    launched = [k for k, *_ in emulator.launches[before:]]
    assert "tq_encode" in launched and "minmax_quantize" in launched
    assert all(v is None for v in selfcheck.results().values())


class _BrokenBackend(runtime.Backend):
    """Launches nothing: every output keeps its poison, as a miscompiled or misbehaving kernel would."""

    name = "broken"

    def accepts(self, device):
        return device.type == "cpu"

    def launch(self, kernel, grid, block, args, device):
        pass


def test_failed_self_check_warns_once_and_falls_back(seed):
    selfcheck.reset()
    x = torch.randn(2, 2, 9, 64, generator=_gen(seed))
    rot = make_rotation("hadamard", 64, seed)
    want = kernels.reference_tq_mse_encode_packed(x, 2, rot)
    with runtime.use_backend(_BrokenBackend()):
        with pytest.warns(RuntimeWarning, match="tq_encode kernel disagrees with the torch reference"):
            packed, norms = ops.tq_mse_encode_packed(x, 2, rot)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not again
            packed2, _ = ops.tq_mse_encode_packed(x, 2, rot)
    assert torch.equal(packed, want[0]) and torch.equal(norms, want[1]) and torch.equal(packed2, want[0])
    (key, problem), = selfcheck.results().items()  # the one check ran, and found the poison (0xA5 = 165)
    assert key[:3] == ("broken", "cpu", "tq_encode")
    assert re.fullmatch(r"packed codes: \d+ of \d+ differ, first at \d+: 165 != \d+", problem), problem
    selfcheck.reset()


# ----------------------------------------------------------------------------- --device cuda, kvc bench


def test_require_names_what_is_missing(monkeypatch):
    runtime.require("cpu")  # nothing needed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "_cupy_import_error", lambda: "ModuleNotFoundError: No module named 'cupy'")
    with pytest.raises(KvcError, match="no CUDA GPU") as info:
        runtime.require("cuda")
    text = str(info.value)
    assert "\n" not in text and "no CUDA GPU" in text and "cupy is not installed" in text
    assert not runtime.available()


def test_bench_without_gpu_is_one_line_exit_2(run):
    if not runtime.missing():
        pytest.skip("a GPU and cupy are present")
    code, out, err = run("bench")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvc: error:") and "needs a CUDA GPU and cupy" in lines[0]


def test_bench_on_the_cpu_is_one_line_exit_2(run):
    code, _, err = run("bench", "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--device must be cuda or cuda:N, not 'cpu'" in err, err


def test_bench_report_tables():
    """kvc bench's report (rows, % copy, speedup, goals) from a result, in both formats."""
    result = BenchResult(device="GPU (cuda:0)", date="2026-01-01", versions={"torch": "t", "cupy": "c"},
                         data="synthetic", shape=[2, 1, 1, 1000, 64], copy_gbs=1000.0,
                         rows=[Row("tq encode (2b hadamard)", 10**9, kernel_ms=1.25, torch_ms=10.0, parity="ok"),
                               Row("tq decode (2b hadamard)", 10**9, torch_ms=2.0, note="self-check failed: x")])
    for markdown in (True, False):
        console = Console(record=True, width=400)
        print_report(result, console, markdown=markdown)
        text = console.export_text()
        assert "800" in text and "80%" in text and "8.0x" in text and "self-check failed: x" in text
        assert "encode at 80% of copy bandwidth (goal >= 60%), 8.0x the torch reference (goal >= 5x): met" in text
        if markdown:  # kernel 1 GB in 1.25 ms = 800 GB/s = 80% of copy; torch 100 GB/s
            assert "| tq encode (2b hadamard) | 1000.0 | 800 | 80% | 100 | 8.0x | ok | 1.250 | 10.000 |" in text


@pytest.mark.gpu
def test_bench_runs_on_the_gpu(run, tmp_path):
    if runtime.missing():
        pytest.skip("needs a GPU and cupy: " + "; ".join(runtime.missing()))
    out_json = tmp_path / "bench.json"
    code, out, err = run("bench", "--layers", "2", "--tokens", "1024", "--repeats", "2", "--warmup", "1",
                         "--json", out_json)
    assert code == 0, err
    assert "tq encode" in out and "self-check failed" not in out
    import json

    report = json.loads(out_json.read_text())
    assert report["copy_gbs"] > 0 and all(r["kernel_ms"] for r in report["rows"])


@pytest.mark.gpu
def test_eoptshrink_on_cuda_matches_cpu(seed):
    """kvc.analysis.rmt is batched torch: on a CUDA tensor it runs every block and head at once on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from kvc.analysis.rmt import eoptshrink
    from kvc.model.synth import SpikedSpec, spiked_block

    spec = SpikedSpec(num_kv_heads=4, num_seqs=3, head_dim=64, seq_len=128, strengths=[6.0, 4.0, 3.0], seed=seed)
    X = spiked_block(spec, _gen(seed))  # [3, 4, 128, 64]: every block and head at once
    cpu = eoptshrink(X)
    gpu = eoptshrink(X.to("cuda"))
    assert torch.equal(cpu.rank, gpu.rank.cpu()), f"seed {seed}"
    assert torch.allclose(gpu.phi.cpu(), cpu.phi, rtol=1e-9, atol=1e-9 * float(cpu.phi.abs().max()))
    lr_cpu, lr_gpu = cpu.lowrank(), gpu.lowrank().cpu()
    assert float((lr_gpu - lr_cpu).norm() / lr_cpu.norm()) < 1e-9


def test_scalar_division_semantics_are_detected():
    """The host reproduces torch's `tensor / python_scalar` (true division on CPU; a reciprocal
    multiplication in torch's CUDA kernels)."""
    for s in (math.sqrt(128), math.sqrt(64), 3, 15, 255):
        value, mode = kernels.scalar_div(torch.device("cpu"), s)
        x = torch.randn(1000)
        want = x / s
        got = x / value if mode else x * value
        assert torch.equal(got, want)


def test_pack_layout_matches_the_packing_module(seed):
    """The kernels write code i of a row at stream bit i * bits (kvc.quant.packing); 8 codes of a
    thread are exactly `bits` bytes. Checked here on the reference side for every width."""
    gen = _gen(seed)
    for bits in (1, 2, 3, 4):
        codes = torch.randint(0, 1 << bits, (5, 64), generator=gen)
        packed = pack_codes(codes, bits)
        chunks = packed.reshape(5, 8, bits)  # [row, thread, byte]
        for t in range(8):
            word = sum(int(chunks[2, t, j]) << (8 * j) for j in range(bits))
            assert [(word >> (e * bits)) & ((1 << bits) - 1) for e in range(8)] == codes[2, 8 * t: 8 * t + 8].tolist()
        assert torch.equal(unpack_codes(packed, bits, codes.shape), codes)
