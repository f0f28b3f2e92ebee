"""MiniCache (Liu et al., NeurIPS 2024, arXiv:2405.14366): cross-layer merging of adjacent layers'
K/V from the middle of the depth on (docs/methods.md#minicache)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import KvcError
from ..protocol import Compressor, Decoded, Encoded, LayerKV, keep_arrays, keep_mask, option

PARTS = ("k", "v")
FP16_ANGLE = 2.0 ** -11 / math.pi  # fp16's relative precision as an angle, in units of pi


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation of the unit vectors a, b [..., D] at t (0: a, 1: b), MiniCache's
    merge (arXiv:2405.14366, sec. 4): sin((1 - t) W)/sin W a + sin(t W)/sin W b with
    W = arccos <a, b>; the linear weights 1 - t, t where W -> 0 (the limit)."""
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1, 1))
    sin = torch.sin(omega)
    small = sin < 1e-6
    safe = torch.where(small, torch.ones_like(sin), sin)
    wa = torch.where(small, torch.full_like(sin, 1 - t), torch.sin((1 - t) * omega) / safe)
    wb = torch.where(small, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    return wa * a + wb * b


def retained(a: Tensor, b: Tensor, gamma: float) -> Tensor:
    """[S, H, T] bool: the tokens too far apart to merge, MiniCache's token retention (sec. 4):
    angular distance d = arccos(cos(a, b))/pi above d_min + (d_max - d_min) gamma, extremes over
    each (sequence, KV head)'s tokens; a distance within FP16_ANGLE of d_min counts as d_min (the stored fp16
    direction cannot resolve it, and rounding alone would otherwise spread d)."""
    d = torch.arccos(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)) / math.pi
    low, high = d.amin(-1, keepdim=True), d.amax(-1, keepdim=True)
    return d > low + ((high - low) * gamma).clamp_min(FP16_ANGLE)


class MiniCache(Compressor):
    """Pairs (l, l+1) of adjacent layers from layer floor(start * L) on share one fp16 direction per
    token; each layer keeps its fp16 magnitudes, and the tokens whose directions differ most stay
    unmerged (both layers' fp16 rows, their positions once); the layers below ``start`` (the paper's
    shallow layers) and a layer left without a partner stay in fp16.

    Stored, per pair: the shared direction [merged, D] once (in the first layer's arrays), the
    magnitudes [merged] of each layer, the retained rows [retained, D] of each layer, their
    positions and counts (in the first layer's arrays); K and V each. Keys are merged after RoPE,
    as cached: adjacent layers rotate a token by the same angles, which keep norms and the angle
    between them.
    """

    name = "minicache"
    summary = "cross-layer merging: adjacent layers share a direction per token, keep own magnitudes"
    paper = "Liu et al., MiniCache: KV Cache Compression in Depth Dimension for LLMs, arXiv:2405.14366"

    @dataclass
    class Options(Compressor.Options):
        start: float = option(0.5, "first merged layer as a share of the depth (middle: 0.5)", low=0, high=1)
        t: float = option(0.6, "SLERP weight of the deeper layer of a pair", low=0, high=1)
        gamma: float = option(0.05, "retention threshold: tokens with angular distance above "
                                    "d_min + (d_max - d_min) * gamma stay unmerged", low=0, high=1)

    def groups(self, layers: list[int], num_layers: int) -> list[list[int]]:
        first = math.floor(self.options.start * num_layers)
        out: list[list[int]] = []
        for L in layers:
            prev = out[-1] if out else None
            pairs = prev is not None and len(prev) == 1 and prev[0] == L - 1 and (prev[0] - first) % 2 == 0
            if pairs and prev[0] >= first:
                prev.append(L)
            else:
                out.append([L])
        return out

    def encode(self, layer: LayerKV) -> Encoded:
        """A layer outside the pairs: its K and V rows in fp16."""
        D = layer.shape[3]
        return Encoded(_arrays({part: {"rows": getattr(layer, part).reshape(-1, D)} for part in PARTS},
                               layer.shape, kept=False))

    def decode(self, encoded: Encoded, layer: LayerKV) -> Decoded:
        return Decoded(*(encoded.arrays[f"{part}.rows"].float().reshape(layer.shape) for part in PARTS))

    def encode_group(self, layers: list[LayerKV]) -> list[Encoded]:
        if len(layers) == 1:
            return [self.encode(layers[0])]
        a, b = layers
        if a.shape != b.shape or a.offset != b.offset:
            raise KvcError(f"minicache: layers {a.layer} and {b.layer} hold caches of different shapes "
                           f"({list(a.shape)}, {list(b.shape)}; a sliding window?) and cannot be merged")
        first: dict[str, dict[str, Tensor]] = {}
        second: dict[str, dict[str, Tensor]] = {}
        for part in PARTS:
            xa, xb = getattr(a, part), getattr(b, part)
            keep = retained(xa, xb, self.options.gamma)
            merge = ~keep
            na, nb = xa.norm(dim=-1), xb.norm(dim=-1)
            ua = xa / na.clamp_min(1e-30)[..., None]
            ub = xb / nb.clamp_min(1e-30)[..., None]
            first[part] = {"direction": slerp(ua[merge], ub[merge], self.options.t),  # MiniCache sec. 4, SLERP
                           "magnitude": na[merge], "rows": xa[keep], **keep_arrays(keep)}
            second[part] = {"magnitude": nb[merge], "rows": xb[keep]}
        meta = {"pair": [a.layer, b.layer]}
        return [Encoded(_arrays(first, a.shape, kept=True), meta), Encoded(_arrays(second, a.shape, kept=False), meta)]

    def decode_group(self, encoded: list[Encoded], layers: list[LayerKV]) -> list[Decoded]:
        if len(layers) == 1:
            return [self.decode(encoded[0], layers[0])]
        shared = encoded[0].arrays
        S, H, T, D = layers[0].shape
        out = []
        for enc in encoded:
            parts = {}
            for part in PARTS:
                keep = keep_mask(shared[f"{part}.index"], shared[f"{part}.count"], T)
                x = torch.zeros(S, H, T, D, device=keep.device)
                # MiniCache sec. 4, restoration: x = ||x|| * shared direction; retained tokens as stored
                x[~keep] = enc.arrays[f"{part}.magnitude"].float()[:, None] * shared[f"{part}.direction"].float()
                x[keep] = enc.arrays[f"{part}.rows"].float()
                parts[part] = x
            out.append(Decoded(parts["k"], parts["v"]))
        return out


def _arrays(parts: dict[str, dict[str, Tensor]], shape: tuple[int, ...], kept: bool) -> dict[str, Tensor]:
    """Every layer stores the same array names (the compressed file's rule), empty where unused:
    per part, direction [merged, D], magnitude [merged] and rows [retained, D] in fp16, and the
    retained positions and counts (``keep_arrays``; only in a pair's first layer: ``kept``)."""
    S, H, T, D = shape
    empty = keep_arrays(torch.zeros(0, 0, T, dtype=torch.bool))
    out = {}
    for part, arrays in parts.items():
        device = arrays["rows"].device
        out.update({f"{part}.direction": arrays.get("direction", torch.zeros(0, D, device=device)).to(torch.float16),
                    f"{part}.magnitude": arrays.get("magnitude", torch.zeros(0, device=device)).to(torch.float16),
                    f"{part}.rows": arrays["rows"].to(torch.float16)})
        out.update({f"{part}.{n}": arrays[n] if kept else x.to(device) for n, x in empty.items()})
    return out
