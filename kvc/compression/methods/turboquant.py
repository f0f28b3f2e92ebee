"""TurboQuant: random rotation + exact Beta(d) Lloyd-Max scalar codebook per coordinate
(docs/methods.md#turboquant).

Every token vector (row of K or V per sequence and head) is quantized on its own (online, data
oblivious). ``--variant mse`` is Algorithm 1, ``--variant prod`` Algorithm 2 (mse at b - 1 bits plus a
1-bit QJL sketch of the residual, unbiased inner products). Fractional ``--bits`` use the
outlier-channel split of kvc.quant.turboquant.split_bits (per sequence and head the f*d channels
with the largest energy over the tokens get b_lo + 1 bits, the others b_lo; two independent
instances). Note: the paper's "2.5-bit" example (32 channels at 3 + 96 at 2 bits) is really 2.25
bits; here 2.5 means 64 + 64 at d = 128 and 2.25 reproduces the paper's split.

Stored arrays per tensor (k., v.) and part p0 (and p1 when split):
  p*.codes   uint8 packed (b or b - 1 bits per entry)      p*.norm  float16 ||x|| per row
  p*.signs   uint8 packed sign bits of S r (prod)          p*.gamma float16 ||r|| per row (prod)
  p*.codebook float32 [2^b] (the cached Beta codebook)     p*.seed  int64 (rotation[, sketch])
  channels   uint8 packed 1-bit mask [S, H, d] of the high-bit channels (split only)
Paper bits per entry = b (it excludes norms, seeds, codebooks and the channel mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ... import gpu
from ...quant.packing import check_code_bits, pack_codes, seed_array, unpack_codes
from ...quant.rotation import KINDS, draw_seed, make_rotation
from ...quant.qjl import qjl_sketch
from ...quant.turboquant import (channel_permutation, outlier_channels, split_bits,
                                 tq_codebook, tq_prod_decode,
                                 tq_prod_encode)
from ..protocol import LayerKV, Nominal, TensorCompressor, option


class TurboQuant(TensorCompressor):
    name = "turboquant"
    summary = "random rotation + Beta(d) Lloyd-Max codebook per coordinate; mse or unbiased prod"
    paper = "Zandieh, Daliri, Hadian, Mirrokni 2025, arXiv:2504.19874"

    @dataclass
    class Options(TensorCompressor.Options):
        variant: str = option("mse", "mse (Algorithm 1) or prod (mse at b-1 bits + 1-bit QJL residual)",
                              choices=("mse", "prod"))
        bits: float = option(3.0, "bits per coordinate; fractional (e.g. 2.5, 3.5) splits the channels: "
                             "f*d high-energy channels at ceil(b), the rest at floor(b)", low=1, high=4)
        rotation: str = option("haar", "random rotation: haar (QR of a Gaussian) or hadamard "
                               "(random signs + fast Walsh-Hadamard)", choices=KINDS)

    def check_options(self, head_dim: int | None = None) -> None:
        super().check_options(head_dim)
        if head_dim is not None:
            split_bits(self.options.bits, head_dim)  # a fractional width must split d into whole channels

    @classmethod
    def nominal_bits(cls, options: Options, key_dim: int, value_dim: int) -> Nominal:
        """b + 16/d per channel-split part for the fp16 norm of each row (when it has mse bits), and
        another 16/d for the residual norm gamma of ``prod``; codebooks, seeds and the split's channel
        mask are left out."""
        def rate(d: int) -> float:
            prod = options.variant == "prod"
            parts = split_bits(options.bits, d)
            return options.bits + sum(16 * ((b - prod > 0) + prod) for _, b in parts) / d

        return Nominal(rate(key_dim), rate(value_dim))

    def encode_tensor(self, x: Tensor, kind: str, layer: LayerKV, generator: torch.Generator
                      ) -> tuple[dict[str, Tensor], dict[str, Any], float | None]:
        split = split_bits(self.options.bits, x.shape[-1])
        prod = self.options.variant == "prod"
        arrays: dict[str, Tensor] = {}
        if len(split) == 2:
            mask = outlier_channels(x, split[0][0])  # [S, H, d]
            arrays["channels"] = pack_codes(mask, 1)
            perm = channel_permutation(mask)[..., None, :].expand_as(x)
            xp = x.gather(-1, perm)
            pieces = [xp[..., :split[0][0]], xp[..., split[0][0]:]]
        else:
            pieces = [x]
        packed = []
        for i, ((ch, b), piece) in enumerate(zip(split, pieces)):
            p = f"p{i}."
            rot_seed = draw_seed(generator)
            rot = make_rotation(self.options.rotation, ch, rot_seed, x.device)
            mse_bits = b - 1 if prod else b
            cb = tq_codebook(ch, mse_bits) if mse_bits > 0 else None
            if prod:
                sk_seed = draw_seed(generator)
                arrays[p + "seed"] = seed_array(rot_seed, sk_seed)
                parts = tq_prod_encode(piece, b, rot, qjl_sketch(ch, ch, sk_seed, device=x.device), cb)
                arrays[p + "signs"] = pack_codes(parts["signs"], 1)
                arrays[p + "gamma"] = parts["gamma"]
                packed.append(arrays[p + "signs"])
                if mse_bits > 0:
                    codes, norms = pack_codes(parts["codes"], mse_bits), parts["norms"]
            else:
                arrays[p + "seed"] = seed_array(rot_seed)
                codes, norms = gpu.tq_mse_encode_packed(piece, b, rot, cb)  # fused kernel on CUDA
            if mse_bits > 0:
                arrays[p + "codes"] = codes
                arrays[p + "norm"] = norms
                arrays[p + "codebook"] = cb.to(device=x.device, dtype=torch.float32)
                packed.append(arrays[p + "codes"])
        check_code_bits(f"turboquant {self.options.bits:g}-bit", packed, x.numel(), float(self.options.bits))
        meta = {"split": [list(s) for s in split], "variant": self.options.variant,
                "rotation": self.options.rotation}
        return arrays, meta, float(self.options.bits)

    def decode_tensor(self, arrays: dict[str, Tensor], meta: dict[str, Any], kind: str,
                      shape: tuple[int, ...]) -> Tensor:
        S, H, T, d = shape
        prod = meta["variant"] == "prod"
        pieces = []
        for i, (ch, b) in enumerate(meta["split"]):
            p = f"p{i}."
            seeds = arrays[p + "seed"].reshape(-1).tolist()
            device = arrays[p + "seed"].device
            rot = make_rotation(meta["rotation"], ch, seeds[0], device)
            mse_bits = b - 1 if prod else b
            cb = arrays.get(p + "codebook")
            if not prod:
                pieces.append(gpu.tq_mse_decode_packed(arrays[p + "codes"], mse_bits, (S, H, T, ch),
                                                       arrays[p + "norm"], rot, cb))  # kernel on CUDA
                continue
            parts: dict[str, Tensor] = {}
            if mse_bits > 0:
                parts["codes"] = unpack_codes(arrays[p + "codes"], mse_bits, (S, H, T, ch))
                parts["norms"] = arrays[p + "norm"]
            parts["signs"] = unpack_codes(arrays[p + "signs"], 1, (S, H, T, ch)).bool()
            parts["gamma"] = arrays[p + "gamma"]
            pieces.append(tq_prod_decode(parts, b, rot, qjl_sketch(ch, ch, seeds[1], device=device), cb))
        if len(pieces) == 1:
            return pieces[0]
        mask = unpack_codes(arrays["channels"], 1, (S, H, d)).bool()
        perm = channel_permutation(mask)[..., None, :].expand(S, H, T, d)
        xp = torch.cat(pieces, dim=-1)
        return torch.empty_like(xp).scatter(-1, perm, xp)
