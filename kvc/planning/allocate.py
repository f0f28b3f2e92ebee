"""Rate-distortion points per (layer, K or V, KV head) measured on a capture, and the allocation
of a budget over them (docs/methods.md#plan, docs/plan.md).

Each candidate (a per-tensor method at one bit width) runs over every layer as a uniform plan
(:class:`PlanCompressor`), so a head's stored bits are counted exactly as ``kvc compress --plan``
counts them. Its error is the relative squared attention-output error of the head with only that
tensor compressed, e_K = ||o(K_hat, V) - o||^2 / ||o||^2 and e_V likewise (the squared
``attn_out_rel`` of docs/methods.md#metrics), pooled over the captured queries; the plan minimizes
sum over (layer, head) of e_K + e_V, the first-order (independent errors) total of the model's
squared attention-output errors, subject to the fully counted bits. :func:`predict` predicts the
errors of the candidates with a closed form instead (docs/methods.md#plan-predict).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..compression import engine
from ..compression.options import method_options
from ..compression.protocol import TensorCompressor
from ..compression.registry import build, get
from ..errors import KvcError
from ..io.capture import CaptureFile
from ..metrics.fidelity import layer_metrics
from . import knapsack
from .compressor import PlanCompressor
from .planfile import TENSORS, Assignment, PlanSpec, config_key

DEFAULT_METHODS = ("eoptshrinkq", "svdq", "turboquant", "kvquant", "fp16")
DEFAULT_BITS = (1, 2, 2.5, 3, 4)
FP16_BITS = 16.0  # the top of every budget: fp16, 16 bits per entry
SIZE_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
              "TIB": 2**40}


@dataclass(frozen=True)
class Candidate:
    """A per-tensor method with every option's value; ``label`` e.g. 'turboquant 2.5'."""

    method: str
    options: dict[str, Any] = dataclasses.field(hash=False)

    @property
    def label(self) -> str:
        bits = self.options.get("bits")
        return self.method if bits is None else f"{self.method} {bits:g}"


def candidates(methods: Sequence[str], bits: Sequence[float], options: dict[str, Any] | None = None
               ) -> tuple[list[Candidate], list[dict]]:
    """The candidate set: every method at every width of ``bits`` it takes (a method without a bits
    option once), with ``options`` ({"[method.]key": value}) where the method has them; and the
    (method, bits) pairs skipped, with the reason."""
    options = options or {}
    out, skipped, used = [], [], set()
    for name in methods:
        cls = get(name)
        if not issubclass(cls, TensorCompressor):
            raise KvcError(f"method {name} does not compress K and V separately; a plan takes per-tensor "
                           "methods (e.g. eoptshrinkq, turboquant, kvquant, fp16)")
        fields = {f.name for f in dataclasses.fields(cls.Options)}
        mine = {}
        for key, value in options.items():
            owner, _, option = key.rpartition(".")
            if (owner in ("", name)) and option in fields:
                mine[option] = value
                used.add(key)
            elif owner == name:
                raise KvcError(f"--opt {key}: method {name} has no option {option}")
        for b in (bits if "bits" in fields else [None]):
            try:
                extra = {} if b is None else {"bits": int(b) if float(b).is_integer() else float(b)}
                compressor = build(cls.name, **method_options(cls, {**mine, **extra}))
            except KvcError as err:
                skipped.append({"method": name, "bits": b, "reason": str(err)})
                continue
            out.append(Candidate(cls.name, compressor.params()))
    unused = sorted(set(options) - used)
    if unused:
        raise KvcError(f"--opt {unused[0]}: no candidate method has this option")
    if not out:
        raise KvcError("no candidate method takes these bit widths")
    return out, skipped


def uniform_plan(meta, layers: Sequence[int], candidate: Candidate) -> PlanSpec:
    """Every (layer, tensor, KV head) of ``layers`` on one candidate."""
    return PlanSpec(meta.model, meta.num_layers, meta.num_kv_heads, meta.head_dim,
                [Assignment(L, t, h, candidate.method, candidate.options)
                 for L in layers for t in TENSORS for h in range(meta.num_kv_heads)])


@dataclass
class RateDistortion:
    """Measured points: ``bits`` and ``errors`` [C, L, 2, H] (stored bits of one tensor of one head;
    its relative squared attention-output error), ``entries`` per head and tensor (S T D)."""

    candidates: list[Candidate]
    layers: list[int]
    bits: torch.Tensor
    errors: torch.Tensor
    entries: int
    predicted: list[str] = dataclasses.field(default_factory=list)  # labels whose errors are predicted

    def uniform(self) -> list[dict[str, float]]:
        """Per candidate applied everywhere: bits per entry and the predicted total error."""
        n = self.bits[0].numel() * self.entries
        return [{"label": c.label, "bits_per_entry": float(self.bits[i].sum()) / n,
                 "error": float(self.errors[i].sum()), "attn_out_rel": float(head_rel(self.errors[i]).mean())}
                for i, c in enumerate(self.candidates)]


def head_rel(errors: torch.Tensor) -> torch.Tensor:
    """Predicted attn_out_rel per (layer, head) [L, H] from e_K + e_V ([L, 2, H])."""
    return errors.sum(-2).sqrt()


def measure(capture: CaptureFile, cands: Sequence[Candidate], layers: Sequence[int],
            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, query_stride: int = 1,
            progress: Callable[[], None] | None = None) -> RateDistortion:
    """Bits and errors of every candidate on every (layer, tensor, head) of the capture."""
    meta = capture.meta
    H = meta.num_kv_heads
    bits = torch.zeros(len(cands), len(layers), 2, H, dtype=torch.float64)
    errors = torch.zeros_like(bits)
    for i, L in enumerate(layers):
        layer = engine.load_layer(capture, L, device, dtype)
        for c, cand in enumerate(cands):
            bits[c, i], errors[c, i] = measure_layer(PlanCompressor(uniform_plan(meta, [L], cand)), layer, query_stride)
            if progress:
                progress()
    return RateDistortion(list(cands), list(layers), bits, errors,
                          meta.num_seqs * meta.seq_len * meta.head_dim)


def measure_layer(comp: PlanCompressor, layer, query_stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored bits and relative squared attention-output errors [2, H] (K, V) of a plan on one layer,
    each tensor compressed alone."""
    q, qp = layer.q[:, :, ::query_stride], layer.q_positions[::query_stride]
    with torch.inference_mode():
        _, decoded, head_bits = engine.encode_decode(comp, layer)
        only_k = layer_metrics(layer.k, decoded.k, layer.v, layer.v, q, qp, None, layer.attention)
        only_v = layer_metrics(layer.k, layer.k, layer.v, decoded.v, q, qp, None, layer.attention)
    bits = torch.stack([head_bits["k"].cpu(), head_bits["v"].cpu()]).double()
    errors = torch.stack([only_k["kv"]["attn_out_rel"].cpu(), only_v["kv"]["attn_out_rel"].cpu()]).double().square()
    return bits, torch.nan_to_num(errors, nan=0.0)  # nan: a head whose attention output is all zero


def predicted_mse(comp: TensorCompressor, x: torch.Tensor) -> torch.Tensor | None:
    """Predicted relative squared error per KV head [H] of ``comp`` on x [S, H, T, D], or None where
    there is no closed form (docs/methods.md#plan-predict): TurboQuant-mse at whole bits D_b, eoptshrinkq
    and svdq their spectral prediction (docs/methods.md#error-decomposition), the fp16 tail exact."""
    from ..compression.lowrank import LowRankQuant
    from ..quant.lloyd_max import distortion
    from ..quant.turboquant import tq_codebook

    S, H, T, D = x.shape
    energy = x.double().square().sum((0, 2, 3))
    o = comp.options
    if comp.name == "turboquant" and o.variant == "mse" and float(o.bits).is_integer():
        # TurboQuant Thm. 1 (arXiv:2504.19874): E||x - x_hat||^2 = D_b ||x||^2 per row
        return torch.full((H,), distortion(tq_codebook(D, int(o.bits)), D), dtype=torch.float64)
    if isinstance(comp, LowRankQuant):
        nb = T // o.block
        if nb == 0:
            return None
        blocks = x[..., : nb * o.block, :].reshape(S, H, nb, o.block, D).float()
        return comp.predict(blocks).error.double().sum((0, 2)).cpu() / energy.cpu()
    return None


def predict(capture: CaptureFile, cands: Sequence[Candidate], layers: Sequence[int],
            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, query_stride: int = 1,
            progress: Callable[[], None] | None = None) -> RateDistortion:
    """Points with predicted errors (docs/methods.md#plan-predict): bits counted from the encoding;
    the error of a candidate with a closed-form relative squared error m_c (:func:`predicted_mse`)
    is f m_c, f = e_anchor / m_anchor per (layer, tensor, head) from the anchor, the first such
    candidate, measured (a turboquant one if any); the others are measured."""
    meta = capture.meta
    H = meta.num_kv_heads
    bits = torch.zeros(len(cands), len(layers), 2, H, dtype=torch.float64)
    errors = torch.zeros_like(bits)
    predicted: set[str] = set()
    for i, L in enumerate(layers):
        layer = engine.load_layer(capture, L, device, dtype)
        comps = [PlanCompressor(uniform_plan(meta, [L], cand)) for cand in cands]
        with torch.inference_mode():
            built = [build(c.method, **c.options) for c in cands]
            mse = [[predicted_mse(b, t) for t in (b._keys_source(layer), layer.v)] for b in built]
        able = [c for c, m in enumerate(mse) if m[0] is not None and m[1] is not None]
        anchor = next((c for c in able if cands[c].method == "turboquant"), able[0] if able else None)
        if anchor is None:
            raise KvcError("--predict needs a candidate with a predicted error (turboquant at whole bits, "
                           "eoptshrinkq or svdq) to calibrate on")
        bits[anchor, i], errors[anchor, i] = measure_layer(comps[anchor], layer, query_stride)
        factor = errors[anchor, i] / torch.stack(mse[anchor]).clamp_min(1e-30)
        for c, comp in enumerate(comps):
            if c != anchor and (mse[c][0] is None or mse[c][1] is None):
                bits[c, i], errors[c, i] = measure_layer(comp, layer, query_stride)
            elif c != anchor:
                with torch.inference_mode():
                    comp.validate(layer)
                    head_bits = engine.head_bits(comp, comp.encode(layer), layer)
                bits[c, i] = torch.stack([head_bits["k"].cpu(), head_bits["v"].cpu()]).double()
                errors[c, i] = factor * torch.stack(mse[c])
                predicted.add(cands[c].label)
            if progress:
                progress()
    return RateDistortion(list(cands), list(layers), bits, errors, meta.num_seqs * meta.seq_len * meta.head_dim,
                          [c.label for c in cands if c.label in predicted])


def prediction_error(capture: CaptureFile, spec: PlanSpec, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, query_stride: int = 1) -> dict[str, float]:
    """The plan's predicted points against the measured ones (docs/methods.md#plan-predict): totals of
    bits and error, their relative errors, and Spearman's rank correlation of the per-point errors."""
    from scipy import stats

    H = spec.num_kv_heads
    predicted = torch.tensor([a.error for a in spec.heads], dtype=torch.float64).view(len(spec.layers), 2, H)
    pred_bits = torch.tensor([a.bits_per_entry for a in spec.heads], dtype=torch.float64).view_as(predicted)
    bits, errors = torch.zeros_like(predicted), torch.zeros_like(predicted)
    entries = capture.meta.num_seqs * capture.meta.seq_len * capture.meta.head_dim
    for i, L in enumerate(spec.layers):
        layer = engine.load_layer(capture, L, device, dtype)
        only = dataclasses.replace(spec, heads=[a for a in spec.heads if a.layer == L])
        bits[i], errors[i] = measure_layer(PlanCompressor(only), layer, query_stride)
    bits /= entries
    return {"predicted_error": float(predicted.sum()), "measured_error": float(errors.sum()),
            "error_rel": float(predicted.sum() / errors.sum() - 1),
            "predicted_bits_per_entry": float(pred_bits.mean()), "measured_bits_per_entry": float(bits.mean()),
            "bits_rel": float(pred_bits.mean() / bits.mean() - 1),
            "spearman": float(stats.spearmanr(predicted.flatten().numpy(), errors.flatten().numpy()).statistic)}


def check_budget(budget: float) -> None:
    """KvcError unless 0 < budget <= 16 (fp16, the top of every plan)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise KvcError(f"--budget must be a number of bits per entry, got {budget!r}")
    if budget > FP16_BITS:
        raise KvcError(f"--budget {budget:g} bits per entry is above fp16's {FP16_BITS:g}: nothing to plan")
    if budget <= 0:
        raise KvcError(f"--budget must be > 0 bits per entry, got {budget:g}")


def allocate(rd: RateDistortion, budget: float, meta, capture: str = "") -> PlanSpec:
    """The plan of least predicted error within ``budget`` average bits per entry (exact MCKP over
    the measured points, :func:`knapsack.allocate`); KvcError outside [cheapest plan, fp16]."""
    check_budget(budget)
    C, L, T, H = rd.bits.shape
    n = L * T * H
    costs = rd.bits.permute(1, 2, 3, 0).reshape(n, C)
    errs = rd.errors.permute(1, 2, 3, 0).reshape(n, C)
    cheapest = float(costs.min(1).values.sum()) / (n * rd.entries)
    choice = knapsack.allocate(costs.tolist(), errs.tolist(), budget * n * rd.entries)
    if choice is None:
        raise KvcError(f"--budget {budget:g} bits per entry is below the cheapest plan of these candidates "
                       f"({cheapest:.4f} bits per entry)")
    heads, index = [], 0
    for i, layer in enumerate(rd.layers):
        for t, tensor in enumerate(TENSORS):
            for h in range(H):
                cand = rd.candidates[choice[index]]
                heads.append(Assignment(layer, tensor, h, cand.method, cand.options,
                                        float(costs[index, choice[index]]) / rd.entries,
                                        float(errs[index, choice[index]])))
                index += 1
    bits = sum(a.bits_per_entry for a in heads) / len(heads)
    return PlanSpec(meta.model, meta.num_layers, meta.num_kv_heads, meta.head_dim, heads, budget=float(budget),
                bits_per_entry=bits, error=sum(a.error for a in heads), capture=capture)


def memory_budget(memory: str, geometry, context: int, batch: int) -> float:
    """Average bits per entry that fit ``memory`` ('40GB'; KB/MB/GB = 10^3/10^6/10^9 bytes, KiB/MiB/GiB
    powers of 2) for ``batch`` sequences of ``context`` tokens: 16 memory / fp16 bytes, the fp16 bytes
    by ``kvc budget``'s arithmetic (kvc.ci.budget.sequence_bytes)."""
    from ..ci.budget import sequence_bytes

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", memory, re.IGNORECASE)
    if not match:
        raise KvcError(f"--memory {memory!r}: expected a size like 40GB or 512MiB")
    nbytes = float(match.group(1)) * SIZE_UNITS[match.group(2).upper()]
    if batch < 1 or context < 1:
        raise KvcError("--context and --batch must be positive")
    return FP16_BITS * nbytes / (sequence_bytes(geometry, context) * batch)


def report(spec: PlanSpec, rd: RateDistortion, skipped: list[dict], capture: str) -> dict[str, Any]:
    """The JSON of a plan (``kvc plan --json``): totals, per layer, per head, the uniform candidates."""
    labels = {config_key(c.method, c.options): c.label for c in rd.candidates}
    heads = [{"layer": a.layer, "tensor": a.tensor, "head": a.head, "method": a.method,
              "label": labels[a.config], "options": a.options, "bits_per_entry": a.bits_per_entry,
              "error": a.error} for a in spec.heads]
    per_layer = []
    for L in spec.layers:
        mine = [a for a in spec.heads if a.layer == L]
        row = {"layer": L}
        for t in TENSORS:
            row[f"{t}_bits"] = sum(a.bits_per_entry for a in mine if a.tensor == t) / spec.num_kv_heads
        row["bits"] = (row["k_bits"] + row["v_bits"]) / 2
        per_layer.append(row)
    errors = torch.tensor([a.error for a in spec.heads], dtype=torch.float64).view(len(spec.layers), 2, -1)
    counts: dict[str, int] = {}
    for h in heads:
        counts[h["label"]] = counts.get(h["label"], 0) + 1
    return {"budget": spec.budget, "bits_per_entry": spec.bits_per_entry, "error": spec.error,
            "attn_out_rel": float(head_rel(errors).mean()), "capture": capture,
            "candidates": [c.label for c in rd.candidates], "skipped": skipped, "choices": counts,
            "per_layer": per_layer, "uniform": rd.uniform(), "heads": heads}
