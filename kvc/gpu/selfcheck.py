"""Self-check of every kernel configuration against the torch reference, once per device, before use.

:func:`verified` runs the check of a kernel family for one configuration key the first time it is
asked on a (backend, device), on small fresh random inputs (outputs poisoned before the launch), and
caches the answer. On a disagreement or an error (compile failure, launch failure, NaN) it warns
once per (family, device) and answers False, so the caller runs the torch reference instead. Set
``KVC_GPU_SELFCHECK=0`` to skip the checks (benchmarks of a configuration already checked).

The comparison rules (also used by tests/test_gpu_parity.py) are in :func:`compare_tq_encode`,
:func:`compare_close` and :func:`compare_equal`: they return None when the outputs agree, else a
short description of the first disagreement.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings

import torch
from torch import Tensor

from ..quant.packing import unpack_codes
from ..quant.rotation import make_rotation
from ..quant.turboquant import tq_codebook
from . import kernels
from .runtime import Backend

ENV_SELFCHECK = "KVC_GPU_SELFCHECK"
BOUNDARY_TOL = 1e-6  # |y - midpoint| under which a one-step code difference is a rounding tie

_RESULTS: dict[tuple, bool] = {}
_PROBLEMS: dict[tuple, str] = {}
_WARNED: set[tuple] = set()
_LOCK = threading.RLock()


def verified(be: Backend, device, family: str, key: tuple) -> bool:
    """True when the ``family`` kernel agrees with the reference on ``device`` for ``key``."""
    if os.environ.get(ENV_SELFCHECK, "1") == "0":
        return True
    cache_key = (be.name, str(device), family, key)
    with _LOCK:
        if cache_key not in _RESULTS:
            try:
                problem = CHECKS[family](be, torch.device(device), key)
            except Exception as err:  # compile or launch failure: the torch path still works
                problem = f"{type(err).__name__}: {err}"
            _RESULTS[cache_key] = problem is None
            if problem is not None:
                _PROBLEMS[cache_key] = problem
                once = (be.name, str(device), family)
                if once not in _WARNED:
                    _WARNED.add(once)
                    warnings.warn(f"kvc.gpu: the {family} kernel disagrees with the torch reference on "
                                  f"{device} for {key} ({problem}); using the torch path",
                                  RuntimeWarning, stacklevel=3)
        return _RESULTS[cache_key]


def results() -> dict[tuple, str | None]:
    """Every self-check run so far: (backend, device, family, key) -> None (passed) or the problem."""
    with _LOCK:
        return {k: _PROBLEMS.get(k) for k in _RESULTS}


def reset() -> None:
    """Forget all self-check results (tests)."""
    with _LOCK:
        _RESULTS.clear()
        _PROBLEMS.clear()
        _WARNED.clear()


# ----------------------------------------------------------------------------- comparisons


def _first_bad(mask: Tensor) -> int:
    return int(mask.reshape(-1).nonzero()[0, 0])


def compare_equal(name: str, got: Tensor, want: Tensor) -> str | None:
    """Bit-identical (same shape, dtype and bytes; NaN never passes)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{name}: shape/dtype {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}"
    if got.is_floating_point() and bool(torch.isnan(got).any()):
        return f"{name}: NaN at flat index {_first_bad(torch.isnan(got))}"
    a, b = got.reshape(-1), want.reshape(-1)
    if got.is_floating_point():
        itype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
        a, b = a.contiguous().view(itype), b.contiguous().view(itype)
    diff = a != b
    if bool(diff.any()):
        i = _first_bad(diff)
        return (f"{name}: {int(diff.sum())} of {diff.numel()} differ, first at {i}: "
                f"{got.reshape(-1)[i].item()!r} != {want.reshape(-1)[i].item()!r}")
    return None


def compare_close(name: str, got: Tensor, want: Tensor, atol: Tensor | float, rtol: float = 0.0) -> str | None:
    """|got - want| <= atol + rtol |want| everywhere (atol may be a broadcastable tensor); no NaN."""
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if bool(torch.isnan(got).any()):
        return f"{name}: NaN at flat index {_first_bad(torch.isnan(got))}"
    g, w = got.double(), want.double()
    limit = torch.as_tensor(atol, dtype=torch.float64, device=g.device) + rtol * w.abs()
    bad = (g - w).abs() > limit
    if bool(bad.any()):
        i = _first_bad(bad)
        return (f"{name}: {int(bad.sum())} of {bad.numel()} outside tolerance, worst |diff| "
                f"{float((g - w).abs().max()):.3g}; first at {i}: {g.reshape(-1)[i].item():.9g} vs "
                f"{w.reshape(-1)[i].item():.9g}")
    return None


def fp16_ulps(a: Tensor, b: Tensor) -> Tensor:
    """Distance in float16 ulps between two non-negative float16 tensors."""
    return (a.view(torch.int16).to(torch.int32) - b.view(torch.int16).to(torch.int32)).abs()


def rotated_units(x: Tensor, rotation) -> Tensor:
    """The reference's rotated unit rows y = Pi(x / |x|) (float32), where the codes are decided."""
    xw = x.to(torch.float32)
    norms = torch.linalg.vector_norm(xw, dim=-1, keepdim=True)
    unit = xw / torch.where(norms > 0, norms, torch.ones_like(norms))
    return rotation.to(x.device, torch.float32).apply(unit)


def compare_tq_encode(x: Tensor, bits: int, rotation, codebook: Tensor, got: tuple[Tensor, Tensor],
                      want: tuple[Tensor, Tensor], strict: bool) -> str | None:
    """Compare (packed, norms) of the kernel with the reference.

    strict (same norms given to the kernel): bit-identical bytes and norms. Otherwise (norms computed
    by the kernel): norms within one float16 ulp, and every code equal except one-step differences
    at entries whose reference rotated value lies within BOUNDARY_TOL of the decision midpoint
    between the two codes. (No cap on their number: a constant row rotates to coordinates that are
    0 up to rounding, and 0 is a midpoint, so one such row alone can flip up to d - 1 codes.)
    """
    packed, norms = got
    packed_ref, norms_ref = want
    if strict:
        return compare_equal("packed codes", packed, packed_ref) or compare_equal("norms", norms, norms_ref)
    if norms.shape != norms_ref.shape or bool(torch.isnan(norms).any()):
        return "norms: wrong shape or NaN"
    far = fp16_ulps(norms, norms_ref) > 1
    if bool(far.any()):
        i = _first_bad(far)
        return f"norms: {int(far.sum())} rows off by more than one float16 ulp (first row {i})"
    if packed.shape != packed_ref.shape:
        return f"packed codes: {packed.numel()} bytes != {packed_ref.numel()}"
    codes = unpack_codes(packed, bits, x.shape)
    codes_ref = unpack_codes(packed_ref, bits, x.shape)
    flip = codes != codes_ref
    if not bool(flip.any()):
        return None
    y = rotated_units(x, rotation)
    mids = kernels.midpoints(codebook, x.device)
    lower = torch.minimum(codes, codes_ref).clamp(max=mids.numel() - 1)
    near = (y - mids[lower]).abs() <= BOUNDARY_TOL * torch.clamp(y.abs(), min=1.0)
    unexplained = flip & ~(((codes - codes_ref).abs() == 1) & near)
    if bool(unexplained.any()):
        i = _first_bad(unexplained)
        return (f"codes: {int(unexplained.sum())} entries differ away from a decision boundary (first at "
                f"{i}: {int(codes.reshape(-1)[i])} vs {int(codes_ref.reshape(-1)[i])}, y = "
                f"{float(y.reshape(-1)[i]):.9g})")
    return None


# ----------------------------------------------------------------------------- inputs


def _gen(key: tuple) -> torch.Generator:
    digest = hashlib.sha256(repr(("kvc.gpu.selfcheck",) + tuple(key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (2**62))


def sample_rows(shape: tuple[int, ...], gen: torch.Generator, device) -> Tensor:
    """Random rows with the awkward cases: a zero row, tiny and large rows, a constant row, outliers."""
    x = torch.randn(*shape, generator=gen)
    flat = x.view(-1, shape[-1])
    flat[0] = 0.0
    if flat.shape[0] > 4:
        flat[1] *= 1e-6
        flat[2] *= 300.0
        flat[3] = 0.25
        flat[4, :: max(1, shape[-1] // 4)] *= 40.0
    return x.to(device)


def _tq_rotation(d: int, mode: str, seed: int):
    return make_rotation("hadamard" if mode == "fused" else "haar", d, seed)


# ----------------------------------------------------------------------------- checks per family


def check_tq_encode(be: Backend, device: torch.device, key: tuple) -> str | None:
    d, bits, mode = key
    gen = _gen(key)
    rot = _tq_rotation(d, mode, 17 + d)
    cb = tq_codebook(d, bits)
    x = sample_rows((2, 3, 41, d), gen, device)
    want = kernels.reference_tq_mse_encode_packed(x, bits, rot, cb)
    norm32 = torch.linalg.vector_norm(x.to(torch.float32), dim=-1)
    got = kernels.tq_encode_kernel(be, x, bits, rot, cb, mode, norm_in=norm32 if mode == "fused" else None,
                                   poison=True)
    problem = compare_tq_encode(x, bits, rot, cb, got, want, strict=True)
    if problem is None and mode == "fused":
        got = kernels.tq_encode_kernel(be, x, bits, rot, cb, mode, poison=True)
        problem = compare_tq_encode(x, bits, rot, cb, got, want, strict=False)
        # a strided piece (the outlier split's half of the channels), as the method passes it
        wide = sample_rows((2, 3, 41, 2 * d), gen, device)
        piece = wide[..., d:]
        problem = problem or compare_tq_encode(
            piece, bits, rot, cb, kernels.tq_encode_kernel(be, piece, bits, rot, cb, mode, poison=True),
            kernels.reference_tq_mse_encode_packed(piece, bits, rot, cb), strict=False)
    return problem


def check_tq_decode(be: Backend, device: torch.device, key: tuple) -> str | None:
    d, bits, mode = key
    gen = _gen(key)
    rot = _tq_rotation(d, mode, 29 + d)
    cb = tq_codebook(d, bits).to(torch.float32)
    shape = (2, 3, 37, d)
    x = sample_rows(shape, gen, device)
    packed, norms = kernels.reference_tq_mse_encode_packed(x, bits, rot, cb)
    want = kernels.reference_tq_mse_decode_packed(packed, bits, shape, norms, rot, cb)
    got = kernels.tq_decode_kernel(be, packed, bits, shape, norms, rot, cb, mode, poison=True)
    atol = 8 * torch.finfo(torch.float32).eps * norms.to(torch.float32)[..., None]
    return compare_close("decoded", got, want, atol)


def _attention_inputs(key: tuple, device, kind: str):
    d, bits = key
    gen = _gen(key + (kind,))
    rot = make_rotation("hadamard" if d & (d - 1) == 0 else "haar", d, 41 + d)
    cb = tq_codebook(d, bits).to(torch.float32)
    S, H, G, Tq, T = 2, 2, 3, 5, 150  # T not a multiple of the kernels' tiles
    shape = (S, H, T, d)
    k = sample_rows(shape, gen, device)
    packed, norms = kernels.reference_tq_mse_encode_packed(k, bits, rot, cb)
    return rot, cb, shape, packed, norms, (S, H * G, Tq, T), gen


def check_tq_score(be: Backend, device: torch.device, key: tuple) -> str | None:
    rot, cb, shape, packed, norms, (S, Hq, Tq, T), gen = _attention_inputs(key, device, "score")
    q = torch.randn(S, Hq, 20, shape[-1], generator=gen).to(device)  # 20 * 3 queries: several tiles
    want = kernels.reference_tq_score_packed(q, packed, key[1], shape, norms, rot, cb)
    got = kernels.tq_score_kernel(be, q, packed, key[1], shape, norms, rot, cb, poison=True)
    scale = q.norm(dim=-1, keepdim=True) * norms.to(torch.float32).repeat_interleave(Hq // shape[1], 1)[:, :, None]
    return compare_close("logits", got, want, 1e-4 * scale + 1e-30)


def check_tq_value(be: Backend, device: torch.device, key: tuple) -> str | None:
    rot, cb, shape, packed, norms, (S, Hq, Tq, T), gen = _attention_inputs(key, device, "value")
    w = torch.softmax(torch.randn(S, Hq, 7, T, generator=gen) * 3, dim=-1).to(device)
    want = kernels.reference_tq_value_packed(w, packed, key[1], shape, norms, rot, cb)
    got = kernels.tq_value_kernel(be, w, packed, key[1], shape, norms, rot, cb, poison=True)
    nrm = norms.to(torch.float32).repeat_interleave(Hq // shape[1], 1)  # [S, Hq, T]
    scale = (w * nrm[:, :, None, :]).sum(-1, keepdim=True)
    return compare_close("attention output", got, want, 1e-4 * scale + 1e-30)


def check_minmax_quantize(be: Backend, device: torch.device, key: tuple) -> str | None:
    bits, g, word_mode, layout = key
    gen = _gen(key)
    L = 3 * g
    halves = torch.arange(g) % (2 * ((1 << bits) - 1) + 1) / 2.0  # (x - z) / s = k + 1/2
    if layout == "cols":  # KIVI keys: groups along tokens of each channel, read through a transpose
        base = sample_rows((2, 2, L + 5, 24), gen, "cpu")
        base[0, 0, :g, 5] = 0.5  # a constant group (scale 0)
        base[1, 1, :g, 3] = halves  # exact halves: round half to even
        x = base.to(device)[..., :L, :].transpose(-1, -2)
    else:
        x = sample_rows((2, 2, 24, L), gen, "cpu")
        x[0, 0, 5, :g] = 0.5
        x[1, 1, 3, :g] = halves
        x = x.to(device)
    want = kernels.reference_minmax_quantize_packed(x, bits, g)
    got = kernels.minmax_quantize_kernel(be, x, bits, g, poison=True)
    for name, a, b in zip(("packed codes", "scale", "zero"), got, want):
        problem = compare_equal(name, a, b)
        if problem:
            return problem
    return None


def check_minmax_dequantize(be: Backend, device: torch.device, key: tuple) -> str | None:
    (bits,) = key
    gen = _gen(key)
    g = 8
    shape = (2, 3, 5, 4 * g)
    x = sample_rows(shape, gen, device)
    packed, scale, zero = kernels.reference_minmax_quantize_packed(x, bits, g)
    want = kernels.reference_minmax_dequantize_packed(packed, bits, shape, scale, zero)
    got = kernels.minmax_dequantize_kernel(be, packed, bits, shape, scale, zero, poison=True)
    return compare_equal("dequantized", got, want)


CHECKS = {
    "tq_encode": check_tq_encode,
    "tq_decode": check_tq_decode,
    "tq_score": check_tq_score,
    "tq_value": check_tq_value,
    "minmax_quantize": check_minmax_quantize,
    "minmax_dequantize": check_minmax_dequantize,
}

__all__ = ["verified", "results", "reset", "compare_equal", "compare_close", "compare_tq_encode",
           "fp16_ulps", "rotated_units", "sample_rows", "CHECKS"]
