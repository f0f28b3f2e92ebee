"""Combinations ``evictor+compressor`` (e.g. ``snapkv+turboquant``): eviction, then quantization of
the kept tokens.

The evictor's kept tokens of each (sequence, KV head) are gathered in position order and padded to
the largest kept count m by repeating the last kept token, so the tensor compressor sees one
[S, H, m, D] tensor: a layer of the kept tokens, with the layer's queries and RoPE, which the
compressor's ``validate`` checks before it is encoded. The padding is stored, hence counted. Stored
arrays: the compressor's own (``k.*``, ``v.*``) plus the kept positions (``index``) and counts
(``count``) as ``Evictor`` stores them. Keys compressed before RoPE are rotated at their true
positions after decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

import torch
from torch import Tensor

from ..errors import KvcError
from .protocol import Compressor, Decoded, Encoded, Evictor, LayerKV, TensorCompressor, eviction_side_bits, keep_arrays, keep_mask, rotate_keys
from .fields import typed_fields

SHARED = ("seed",)


def kept_slots(keep: Tensor) -> tuple[Tensor, Tensor]:
    """(positions [S, H, m], valid [S, H, m]): kept positions in order, padded with the last kept one."""
    count = keep.sum(-1)
    m = int(count.max())
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :m]
    valid = torch.arange(m, device=keep.device) < count[..., None]
    last = order.gather(-1, (count - 1).clamp(min=0)[..., None])
    return torch.where(valid, order, last), valid


class Composite(Compressor):
    """An ``Evictor`` followed by a ``TensorCompressor`` on the kept tokens (built by ``combine``)."""

    evictor_cls: typing.ClassVar[type[Evictor]]
    quant_cls: typing.ClassVar[type[TensorCompressor]]
    routes: typing.ClassVar[dict[str, dict[str, str]]]  # part -> {composite option: part option}

    def __init__(self, options=None):
        super().__init__(options)
        values = dataclasses.asdict(self.options)
        self.evictor = self.evictor_cls(self.evictor_cls.Options(
            **{own: values[public] for public, own in self.routes["evict"].items()}))
        self.quant = self.quant_cls(self.quant_cls.Options(
            **{own: values[public] for public, own in self.routes["quant"].items()}))

    def validate(self, layer: LayerKV) -> None:
        super().validate(layer)
        self.evictor.validate(layer)
        self.quant.validate(layer)

    def _sub_layer(self, layer: LayerKV, positions: Tensor, data: bool) -> LayerKV:
        """The kept tokens as a layer [S, H, m, D] (zeros when only the shape is needed)."""
        S, H, T, D = layer.shape
        index = positions[..., None].expand(-1, -1, -1, D)

        def take(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            return x.gather(2, index) if data else x.new_zeros(index.shape)

        return dataclasses.replace(layer, k=take(layer.k), v=take(layer.v), k_pre=take(layer.k_pre))

    def encode(self, layer: LayerKV) -> Encoded:
        keep = self.evictor.select(layer)
        if not bool(keep.any()):
            raise KvcError(f"{self.name}: the eviction kept no token in layer {layer.layer}")
        positions, _ = kept_slots(keep)
        kept = self._sub_layer(layer, positions, data=True)
        self.quant.validate(kept)  # the compressor's checks on the data it sees (e.g. enough tokens)
        inner = self.quant.encode(kept)
        return Encoded({**inner.arrays, **keep_arrays(keep)}, inner.meta)

    def decode(self, encoded: Encoded, layer: LayerKV) -> Decoded:
        S, H, T, D = layer.shape
        keep = keep_mask(encoded.arrays["index"], encoded.arrays["count"], T)
        positions, valid = kept_slots(keep)
        inner = Encoded({n: a for n, a in encoded.arrays.items() if n not in ("index", "count")},
                        encoded.meta)
        dec = self.quant.decode(inner, self._sub_layer(layer, positions, data=False))
        k = dec.k if dec.k_pre is None else rotate_keys(dec.k_pre, layer, positions=positions)
        owner = torch.arange(S * H, device=keep.device).view(S, H, 1).expand_as(positions)[valid]

        def scatter(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            full = x.new_zeros(S * H, T, D)
            full[owner, positions[valid]] = x[valid]
            return full.view(S, H, T, D)

        return Decoded(scatter(k), scatter(dec.v), keep=keep, k_pre=scatter(dec.k_pre))

    def head_bits(self, encoded: Encoded, layer: LayerKV) -> dict[str, Tensor]:
        H = layer.shape[1]
        side = eviction_side_bits(encoded.arrays["index"], encoded.arrays["count"]) / 2
        # the compressor sees m tokens in every head, so its bits are the same in every head
        return {kind: side + encoded.nbits(f"{kind}.") / H for kind in ("k", "v")}


@functools.cache
def combine(evictor: type[Compressor], quant: type[Compressor]) -> type[Composite]:
    """The class of ``evictor.name + "+" + quant.name``; options of both, clashing names prefixed."""
    if not (issubclass(evictor, Evictor) and issubclass(quant, TensorCompressor)):
        raise KvcError(f"a combination is an eviction method then a tensor compressor (e.g. "
                       f"snapkv+turboquant); {evictor.name}+{quant.name} is not")
    parts = {"evict": (evictor, typed_fields(evictor.Options)), "quant": (quant, typed_fields(quant.Options))}
    specs, routes = {}, {"evict": {}, "quant": {}}
    for part, (cls, fields) in parts.items():
        other = parts["quant" if part == "evict" else "evict"][1]
        for name, (kind, f) in fields.items():
            public = f"{cls.name}_{name}" if name in other and name not in SHARED else name
            routes[part][public] = name
            default = ({"default": f.default} if f.default is not dataclasses.MISSING
                       else {"default_factory": f.default_factory})
            specs.setdefault(public, (public, kind, dataclasses.field(metadata=f.metadata, **default)))
    options = dataclasses.make_dataclass("Options", list(specs.values()))
    return type(f"{evictor.__name__}Then{quant.__name__}", (Composite,), {
        "name": f"{evictor.name}+{quant.name}", "Options": options, "routes": routes,
        "evictor_cls": evictor, "quant_cls": quant, "__module__": __name__,
        "summary": f"{evictor.summary}; then {quant.summary}, on the kept tokens",
        "paper": "; ".join(p for p in (evictor.paper, quant.paper) if p)})
