"""A plan as one compressor: each (K or V, KV head) of a layer goes through its own method
(docs/plan.md), so ``kvc compress --plan``, ``kvc eval --plan`` and ``kvc.compressing`` run a plan
through the one audited path (``engine.encode_decode``).

Every (layer, tensor, head) is encoded on its own, as a one-head layer (the head's query group and
RoPE), with a generator seeded by (seed, layer, tensor, head). Its stored arrays (``k.{h}.*``,
``v.{h}.*``) and its error therefore do not depend on what the other heads chose: the bits and
errors measured per head on uniform plans add up exactly to those of any mixed plan, which is what
makes the allocation a knapsack (docs/methods.md#plan). A method's shared tables (codebooks, seeds)
are stored once per head, and counted there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ..errors import KvcError
from ..compression.protocol import Compressor, Decoded, Encoded, LayerKV, TensorCompressor, rotate_keys
from ..compression.registry import build
from .planfile import TENSORS, PlanSpec


def head_layer(layer: LayerKV, head: int) -> LayerKV:
    """KV head ``head`` of a layer as a one-head layer [S, 1, T, D], with its query group."""
    H = layer.shape[1]
    G = layer.q.shape[1] // H
    one = slice(head, head + 1)
    return dataclasses.replace(layer, k=layer.k[:, one], v=layer.v[:, one],
                               k_pre=None if layer.k_pre is None else layer.k_pre[:, one],
                               q=layer.q[:, head * G:(head + 1) * G])


class PlanCompressor(Compressor):
    """Dispatches every (K or V, KV head) of a layer to the method its plan names."""

    name = "plan"
    summary = "a kvc plan: a method and bit width per (layer, K or V, KV head)"

    def __init__(self, plan: PlanSpec, source: str = "", options: Compressor.Options | None = None):
        super().__init__(options)
        self.plan, self.source = plan, source
        self._parts: dict[str, TensorCompressor] = {}
        self._table = {}
        for a in plan.heads:
            if a.config not in self._parts:
                self._parts[a.config] = build(a.method, **a.options)
            self._table[a.key] = self._parts[a.config]

    def reseeded(self, seed: int) -> "PlanCompressor":
        if self.options.seed == seed:
            return self
        return PlanCompressor(self.plan, self.source, dataclasses.replace(self.options, seed=seed))

    def part(self, layer: int, tensor: str, head: int) -> TensorCompressor:
        return self._table[(layer, tensor, head)]

    def params(self) -> dict[str, Any]:
        return {"seed": self.options.seed, "plan": self.source,
                "plan_bits_per_entry": self.plan.bits_per_entry, "plan_budget": self.plan.budget}

    def validate(self, layer: LayerKV) -> None:
        super().validate(layer)
        S, H, T, D = layer.shape
        self.plan.check_geometry(H, D, f"layer {layer.layer} ({H} KV heads of dim {D})")
        if (layer.layer, "k", 0) not in self._table:
            raise KvcError(f"the plan covers layers {_span(self.plan.layers)}, not layer {layer.layer}")
        for h in range(H):
            one = head_layer(layer, h)
            for t in TENSORS:
                self.part(layer.layer, t, h).validate(one)

    def _generator(self, layer: int, tensor: str, head: int, device: torch.device) -> torch.Generator:
        index = (layer * len(TENSORS) + TENSORS.index(tensor)) * self.plan.num_kv_heads + head
        return torch.Generator(device=device).manual_seed(self.options.seed * 1_000_003 + index)

    def encode(self, layer: LayerKV) -> Encoded:
        arrays: dict[str, Tensor] = {}
        meta: dict[str, list] = {t: [] for t in TENSORS}
        for h in range(layer.shape[1]):  # one head at a time: its bits and error stay its own
            one = head_layer(layer, h)
            for t in TENSORS:
                part = self.part(layer.layer, t, h)
                x = part._keys_source(one) if t == "k" else one.v
                a, m, _ = part.encode_tensor(x, t, one, self._generator(layer.layer, t, h, x.device))
                arrays.update({f"{t}.{h}.{n}": v for n, v in a.items()})
                meta[t].append(m)
        return Encoded(arrays, meta)

    def decode(self, encoded: Encoded, layer: LayerKV) -> Decoded:
        S, H, T, D = layer.shape
        out = {}
        for t in TENSORS:
            heads = []
            for h in range(H):
                part, prefix = self.part(layer.layer, t, h), f"{t}.{h}."
                arrays = {n[len(prefix):]: a for n, a in encoded.arrays.items() if n.startswith(prefix)}
                x = part.decode_tensor(arrays, encoded.meta[t][h], t, (S, 1, T, D))
                if t == "k" and part.options.keys == "pre":
                    x = rotate_keys(x, layer)
                heads.append(x)
            out[t] = torch.cat(heads, dim=1)
        return Decoded(out["k"], out["v"])

    def head_bits(self, encoded: Encoded, layer: LayerKV) -> dict[str, Tensor]:
        """Each head's own arrays."""
        H = layer.shape[1]
        return {t: torch.tensor([float(encoded.nbits(f"{t}.{h}.")) for h in range(H)], dtype=torch.float64)
                for t in TENSORS}


def _span(layers: list[int]) -> str:
    return ",".join(map(str, layers)) if len(layers) <= 8 else f"{layers[0]}..{layers[-1]} ({len(layers)} layers)"
