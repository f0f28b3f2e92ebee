"""Rate-distortion points per (layer, K or V, KV head) measured on a capture, and the allocation
of a budget over them (docs/methods.md#plan, docs/plan.md).

Each candidate (a per-tensor method at one bit width) runs over every layer as a uniform plan
(:class:`PlanCompressor`), so a head's stored bits are counted exactly as ``kvc compress --plan``
counts them. Its error is the relative squared attention-output error of the head with only that
tensor compressed, e_K = ||o(K_hat, V) - o||^2 / ||o||^2 and e_V likewise (the squared
``attn_out_rel`` of docs/methods.md#metrics), pooled over the captured queries; the plan minimizes
sum over (layer, head) of e_K + e_V, the first-order (independent errors) total of the model's
squared attention-output errors, subject to the fully counted bits.
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
        q, qp = layer.q[:, :, ::query_stride], layer.q_positions[::query_stride]
        for c, cand in enumerate(cands):
            comp = PlanCompressor(uniform_plan(meta, [L], cand))
            with torch.inference_mode():
                _, decoded, head_bits = engine.encode_decode(comp, layer)
                only_k = layer_metrics(layer.k, decoded.k, layer.v, layer.v, q, qp, None, layer.attention)
                only_v = layer_metrics(layer.k, layer.k, layer.v, decoded.v, q, qp, None, layer.attention)
            bits[c, i, 0], bits[c, i, 1] = head_bits["k"], head_bits["v"]
            errors[c, i, 0] = only_k["kv"]["attn_out_rel"].cpu().square()
            errors[c, i, 1] = only_v["kv"]["attn_out_rel"].cpu().square()
            if progress:
                progress()
    errors = torch.nan_to_num(errors, nan=0.0)  # a head whose attention output is all zero
    return RateDistortion(list(cands), list(layers), bits, errors,
                          meta.num_seqs * meta.seq_len * meta.head_dim)


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
