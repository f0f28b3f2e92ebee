"""``kvc bench``: throughput of the GPU kernels against the copy bandwidth and the torch reference.

One process, one device, side by side: the device's copy bandwidth (a device-to-device
``cudaMemcpyAsync`` through cupy), then for each operation the kernel and its torch reference
(kvc.gpu.kernels.reference_*) on the same input, timed with CUDA events (median of ``repeats`` runs
after ``warmup`` runs). Throughput counts the bytes an operation must move at least (its input
read once and its output written once), so ``% copy`` is the fraction of the copy roofline
(copy: 2 bytes moved per byte copied).

Input: the K and V of every layer of a capture, stacked into one float32 tensor [2L, S, H, T, D]
(one launch over all layers); without a capture, a synthetic spiked capture of ``layers`` layers x
``tokens`` tokens (default 30 x 8192, 3 KV heads of dimension 64: the shape of the default model
SmolLM2-135M at 8k context), drawn with kvc.model.synth.spiked_block.

Before timing, each kernel passes its self-check on the device (kvc.gpu.selfcheck); a kernel that
fails is reported and not timed. The parity column compares the benchmark's own outputs: codes
(exact, or the count of rounding-boundary flips), decoded values (largest relative difference).
"""

from __future__ import annotations

import datetime
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import KvcError
from ..io.capture import CaptureFile
from ..model.load import resolve_device
from ..model.synth import SpikedSpec, spiked_block
from ..quant.packing import unpack_codes
from ..quant.rotation import KINDS, make_rotation
from ..quant.turboquant import tq_codebook
from . import kernels, selfcheck
from .runtime import active_backend, require

ENCODE_COPY_GOAL = 0.60
ENCODE_TORCH_GOAL = 5.0


@dataclass
class BenchOptions:
    capture: Path | None = None
    layers: int = 30
    tokens: int = 8192
    kv_heads: int = 3
    head_dim: int = 64
    q_per_kv: int = 3
    seqs: int = 1
    bits: int = 2
    rotation: str = "hadamard"
    group_size: int = 32
    repeats: int = 10
    warmup: int = 2
    device: str = "cuda"
    seed: int = 0
    attention: bool = True

    def validate(self) -> None:
        for name in ("layers", "tokens", "kv_heads", "head_dim", "q_per_kv", "seqs", "repeats", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KvcError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.warmup < 0:
            raise KvcError("--warmup must be >= 0")
        if not 1 <= self.bits <= 4:
            raise KvcError(f"--bits must be 1..4 (the TurboQuant kernels), got {self.bits}")
        if self.rotation not in KINDS:
            raise KvcError(f"--rotation must be one of {', '.join(KINDS)}, got {self.rotation!r}")
        if self.head_dim % 8 or self.head_dim > 256:
            raise KvcError(f"--head-dim must be a multiple of 8 up to 256, got {self.head_dim}")


@dataclass
class Row:
    op: str
    bytes: int
    kernel_ms: float | None = None
    torch_ms: float | None = None
    parity: str = ""
    note: str = ""

    def gbs(self, ms: float | None) -> float | None:
        return None if ms is None or ms <= 0 else self.bytes / (ms * 1e-3) / 1e9


@dataclass
class BenchResult:
    device: str
    date: str
    versions: dict[str, str]
    data: str
    shape: list[int]
    copy_gbs: float
    rows: list[Row] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            k, t = r.gbs(r.kernel_ms), r.gbs(r.torch_ms)
            rows.append({**asdict(r), "kernel_gbs": k, "torch_gbs": t,
                         "copy_fraction": None if k is None else k / self.copy_gbs,
                         "speedup": None if r.kernel_ms is None or r.torch_ms is None else r.torch_ms / r.kernel_ms})
        return {"device": self.device, "date": self.date, "versions": self.versions, "data": self.data,
                "shape": self.shape, "copy_gbs": self.copy_gbs, "rows": rows, "goals": self.goals()}

    def goals(self) -> dict[str, Any]:
        enc = next((r for r in self.rows if r.op.startswith("tq encode")), None)
        if enc is None or enc.kernel_ms is None or enc.torch_ms is None:
            return {"encode_copy_fraction": None, "encode_speedup": None, "met": None}
        frac = enc.gbs(enc.kernel_ms) / self.copy_gbs
        speedup = enc.torch_ms / enc.kernel_ms
        return {"encode_copy_fraction": frac, "encode_speedup": speedup,
                "goal_copy_fraction": ENCODE_COPY_GOAL, "goal_speedup": ENCODE_TORCH_GOAL,
                "met": bool(frac >= ENCODE_COPY_GOAL and speedup >= ENCODE_TORCH_GOAL)}


# ----------------------------------------------------------------------------- data


def load_data(o: BenchOptions, device: torch.device) -> tuple[torch.Tensor, str]:
    """(X [2L, S, H, T, D] float32 on device: K then V of every layer, description)."""
    if o.capture is not None:
        cap = CaptureFile(o.capture)
        layers = cap.layers[: o.layers]
        parts = [cap.tensor(layer, "k", torch.float32, device) for layer in layers]
        parts += [cap.tensor(layer, "v", torch.float32, device) for layer in layers]
        m = cap.meta
        return torch.stack(parts), (f"{o.capture} ({m.model}; {len(layers)} layers x {m.num_seqs} x "
                                    f"{m.seq_len} tokens, {m.num_kv_heads} KV heads, d = {m.head_dim})")
    spec = SpikedSpec(num_layers=o.layers, num_kv_heads=o.kv_heads, num_heads=o.kv_heads * o.q_per_kv,
                      head_dim=o.head_dim, seq_len=o.tokens, num_seqs=o.seqs, seed=o.seed, rope=False)
    spec.validate()
    gen = torch.Generator().manual_seed(o.seed)
    X = torch.empty(2 * o.layers, o.seqs, o.kv_heads, o.tokens, o.head_dim, device=device)
    for i in range(2 * o.layers):
        X[i] = spiked_block(spec, gen).to(device=device, dtype=torch.float32)
    return X, (f"synthetic spiked capture ({o.layers} layers x {o.seqs} x {o.tokens} tokens, "
               f"{o.kv_heads} KV heads, d = {o.head_dim})")


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    """Median milliseconds of fn() on the current CUDA stream (events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(X: torch.Tensor, repeats: int, warmup: int) -> float:
    """Device copy bandwidth in GB/s (bytes read + written) of a cupy device-to-device memcpy of X."""
    import cupy

    dst = torch.empty_like(X)
    nbytes = X.numel() * X.element_size()
    stream = torch.cuda.current_stream(X.device).cuda_stream

    def copy():
        cupy.cuda.runtime.memcpyAsync(dst.data_ptr(), X.data_ptr(), nbytes,
                                      cupy.cuda.runtime.memcpyDeviceToDevice, stream)

    with cupy.cuda.Device(X.device.index or 0):
        ms = timed(copy, repeats, warmup)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- the benchmark


def run_bench(o: BenchOptions, log: Callable[[str], None] = lambda s: None) -> BenchResult:
    o.validate()
    require(o.device)
    device = resolve_device(o.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    be = active_backend()
    if be is None or not be.accepts(device):
        raise KvcError(f"no kernel backend for {device} (is KVC_GPU_KERNELS=0 set?)")
    import cupy

    X, description = load_data(o, device)
    L2, S, H, T, D = X.shape
    log(f"data: {description}; {_nbytes(X) / 1e9:.2f} GB float32 on {torch.cuda.get_device_name(device)}")
    result = BenchResult(
        device=f"{torch.cuda.get_device_name(device)} ({device})",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions={"torch": torch.__version__, "cupy": cupy.__version__, "cuda (torch)": str(torch.version.cuda)},
        data=description, shape=list(X.shape), copy_gbs=copy_bandwidth(X, o.repeats, o.warmup))
    log(f"copy bandwidth: {result.copy_gbs:.0f} GB/s")
    rot = make_rotation(o.rotation, D, o.seed * 7919 + 1, device)
    cb = tq_codebook(D, o.bits)
    cb32 = cb.to(torch.float32)
    mode = kernels.tq_plan(D, o.bits, rot)
    tag = f"{o.bits}b {o.rotation}{'' if mode == 'fused' else '+torch'}"

    def measure(row: Row, family: str, key: tuple, kernel: Callable[[], Any], reference: Callable[[], Any]):
        if not selfcheck.verified(be, device, family, key):
            row.note = "self-check failed: " + str(selfcheck.results().get((be.name, str(device), family, key)))
        else:
            row.kernel_ms = timed(kernel, o.repeats, o.warmup)
        row.torch_ms = timed(reference, o.repeats, o.warmup)
        result.rows.append(row)
        log(f"{row.op}: kernel {row.kernel_ms} ms, torch {row.torch_ms} ms")

    # TurboQuant-mse encode and decode over every row of every layer
    packed_ref, norms_ref = kernels.reference_tq_mse_encode_packed(X, o.bits, rot, cb)
    packed, norms = (kernels.tq_encode_kernel(be, X, o.bits, rot, cb, mode) if mode else (packed_ref, norms_ref))
    row = Row(f"tq encode ({tag})", _nbytes(X, packed_ref, norms_ref),
              parity=_code_parity(packed, packed_ref, norms, norms_ref, o.bits, X.shape))
    measure(row, "tq_encode", (D, o.bits, mode), lambda: kernels.tq_encode_kernel(be, X, o.bits, rot, cb, mode),
            lambda: kernels.reference_tq_mse_encode_packed(X, o.bits, rot, cb))
    shape = tuple(X.shape)
    want = kernels.reference_tq_mse_decode_packed(packed_ref, o.bits, shape, norms_ref, rot, cb32)
    got = kernels.tq_decode_kernel(be, packed_ref, o.bits, shape, norms_ref, rot, cb32, mode)
    row = Row(f"tq decode ({tag})", _nbytes(packed_ref, norms_ref, want), parity=_value_parity(got, want))
    del got, want
    measure(row, "tq_decode", (D, o.bits, mode),
            lambda: kernels.tq_decode_kernel(be, packed_ref, o.bits, shape, norms_ref, rot, cb32, mode),
            lambda: kernels.reference_tq_mse_decode_packed(packed_ref, o.bits, shape, norms_ref, rot, cb32))

    # KIVI: values per token (groups of G channels), keys per channel (groups of G tokens)
    g = o.group_size
    for name, view, layout in ((f"v/token g{g}", X, "rows"), (f"k/channel g{g}", X.transpose(-1, -2), "cols")):
        plan = kernels.minmax_plan(view, o.bits, g)
        if plan is None:
            result.rows.append(Row(f"kivi encode {name}", 0, note="configuration not supported"))
            continue
        p_ref, s_ref, z_ref = kernels.reference_minmax_quantize_packed(view, o.bits, g)
        p, s, z = kernels.minmax_quantize_kernel(be, view, o.bits, g)
        same = all(torch.equal(a, b) for a, b in ((p, p_ref), (s, s_ref), (z, z_ref)))
        row = Row(f"kivi encode {name} {o.bits}b", _nbytes(view, p_ref, s_ref, z_ref),
                  parity="bit-identical" if same else "DIFFERS")
        measure(row, "minmax_quantize", (o.bits, g, plan[2], layout),
                lambda v=view: kernels.minmax_quantize_kernel(be, v, o.bits, g),
                lambda v=view: kernels.reference_minmax_quantize_packed(v, o.bits, g))
        if layout == "rows":
            want = kernels.reference_minmax_dequantize_packed(p_ref, o.bits, shape, s_ref, z_ref)
            got = kernels.minmax_dequantize_kernel(be, p_ref, o.bits, shape, s_ref, z_ref)
            row = Row(f"kivi decode {name} {o.bits}b", _nbytes(p_ref, s_ref, z_ref, want),
                      parity="bit-identical" if torch.equal(got, want) else _value_parity(got, want))
            del got, want
            measure(row, "minmax_dequantize", (o.bits,),
                    lambda p=p_ref, s=s_ref, z=z_ref: kernels.minmax_dequantize_kernel(be, p, o.bits, shape, s, z),
                    lambda p=p_ref, s=s_ref, z=z_ref: kernels.reference_minmax_dequantize_packed(p, o.bits, shape,
                                                                                                  s, z))
        del p, s, z, p_ref, s_ref, z_ref

    if o.attention:  # decode-time attention from the packed keys and values: one query per head
        L = L2 // 2
        kv_shape = (L * S, H, T, D)
        nk = math.prod(kv_shape[:-1])
        k_packed, k_norms = packed_ref[: nk * D * o.bits // 8], norms_ref[:L].reshape(kv_shape[:-1])
        v_packed, v_norms = packed_ref[nk * D * o.bits // 8:], norms_ref[L:].reshape(kv_shape[:-1])
        gen = torch.Generator().manual_seed(o.seed + 1)
        q = torch.randn(L * S, H * o.q_per_kv, 1, D, generator=gen).to(device)
        w = torch.softmax(torch.randn(L * S, H * o.q_per_kv, 1, T, generator=gen), dim=-1).to(device)
        if kernels.attention_plan("score", kv_shape, o.bits, rot):
            want = kernels.reference_tq_score_packed(q, k_packed, o.bits, kv_shape, k_norms, rot, cb32)
            got = kernels.tq_score_kernel(be, q, k_packed, o.bits, kv_shape, k_norms, rot, cb32)
            row = Row(f"score q.k from packed ({o.q_per_kv} q/head)",
                      _nbytes(k_packed, k_norms, q, want), parity=_value_parity(got, want))
            measure(row, "tq_score", (D, o.bits),
                    lambda: kernels.tq_score_kernel(be, q, k_packed, o.bits, kv_shape, k_norms, rot, cb32),
                    lambda: kernels.reference_tq_score_packed(q, k_packed, o.bits, kv_shape, k_norms, rot, cb32))
        if kernels.attention_plan("value", kv_shape, o.bits, rot):
            want = kernels.reference_tq_value_packed(w, v_packed, o.bits, kv_shape, v_norms, rot, cb32)
            got = kernels.tq_value_kernel(be, w, v_packed, o.bits, kv_shape, v_norms, rot, cb32)
            row = Row(f"value w.v from packed ({o.q_per_kv} q/head)",
                      _nbytes(v_packed, v_norms, w, want), parity=_value_parity(got, want))
            measure(row, "tq_value", (D, o.bits),
                    lambda: kernels.tq_value_kernel(be, w, v_packed, o.bits, kv_shape, v_norms, rot, cb32),
                    lambda: kernels.reference_tq_value_packed(w, v_packed, o.bits, kv_shape, v_norms, rot, cb32))
    return result


def _code_parity(packed, packed_ref, norms, norms_ref, bits, shape) -> str:
    if torch.equal(packed, packed_ref) and torch.equal(norms, norms_ref):
        return "bit-identical"
    flips = int((unpack_codes(packed, bits, shape) != unpack_codes(packed_ref, bits, shape)).sum())
    rows = int((norms != norms_ref).sum())
    return f"{flips} boundary flips, {rows} norms differ"


def _value_parity(got: torch.Tensor, want: torch.Tensor) -> str:
    if torch.equal(got, want):
        return "bit-identical"
    if bool(torch.isnan(got).any()):
        return "NaN"
    scale = float(want.abs().max()) or 1.0
    return f"rel. diff {float((got - want).abs().max()) / scale:.1e}"
