"""TurboQuant (Zandieh, Daliri, Hadian, Mirrokni, arXiv:2504.19874) as pure batched torch functions.

Rows are vectors: every function takes ``x [..., n, d]`` (any leading dims, e.g. [S, H, T, D]) and
quantizes each row on its own.

TQ-mse (Alg. 1), ``bits`` in 1..8::

    rot = make_rotation("haar", d, seed)                       # kvc.quant.rotation
    cb = tq_codebook(d, bits)                                   # exact Beta(d) Lloyd-Max, cached
    codes, norms = tq_mse_encode(x, bits, rot, cb)              # uint8 [..., n, d], float16 [..., n]
    x_hat = tq_mse_decode(codes, norms, rot, cb)                # float32 (float64 if x was) [..., n, d]
    packed = pack_codes(codes, bits)                            # kvc.quant.packing: ceil(n*d*bits/8) bytes

The norm ||x|| of every row is stored in float16 (the paper's rate excludes it: +16/d bits per
entry). Decoding uses the float16 norm, exactly what a reader of the stored arrays would see.
Zero rows give norm 0 and decode to 0. A norm beyond the float16 range raises MethodFailure.

TQ-prod (Alg. 2), ``bits`` in 1..8: TQ-mse at bits - 1 (nothing at bits = 1) plus a 1-bit QJL sketch
of the residual with a d x d Gaussian S (:func:`tq_prod_encode` / :func:`tq_prod_decode`).

Fractional bit widths (paper sec. 4.3; docs/methods.md#turboquant-fractional-bits): :func:`split_bits`
gives the channel split.
General rule used here: for b = b_lo + f (b_lo = floor(b), 0 < f < 1) on d channels, the
``f * d`` channels with the largest energy (sum of squares over the tokens, per sequence and head)
are quantized at b_lo + 1 bits and the other ``(1 - f) * d`` at b_lo bits, by two independent
TurboQuant instances (own rotation, codebook of their own dimension, own norm per row); then the
code rate is exactly (f d (b_lo + 1) + (1 - f) d b_lo) / d = b. ``f * d`` must be an integer,
otherwise the asked rate is not reachable and KvcError is raised. At d = 128: 2.5 bits = 64
channels at 3 + 64 at 2; 3.5 bits = 64 at 4 + 64 at 3; 2.25 bits = 32 at 3 + 96 at 2.
Note: the paper describes its "2.5-bit" setup as 32 outlier channels at 3 bits + 96 at 2 bits and
writes (32*3 + 96*2)/128 = 2.5, but that sum is 288/128 = 2.25; that configuration is ``bits=2.25``
here, and ``bits=2.5`` is the split that really spends 2.5 bits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvc.errors import KvcError

from .fp16 import norms_fp16, work_dtype
from .lloyd_max import beta_codebook, nearest_codes
from .qjl import qjl_decode, qjl_encode
from .rotation import Rotation



def tq_codebook(d: int, bits: int) -> Tensor:
    """Exact Lloyd-Max codebook (2**bits centroids, float64) for one coordinate of a uniform point
    on S^{d-1}; computed once and cached on disk (kvc.quant.lloyd_max)."""
    # TurboQuant Alg. 1 / Lemma 1 (arXiv:2504.19874): codebook minimizing C(f_X, b), f_X the Beta(d) marginal
    return beta_codebook(d, bits)


def tq_mse_encode(x: Tensor, bits: int, rotation: Rotation, codebook: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """TurboQuant_mse of every row of x [..., n, d] -> (codes uint8 [..., n, d], norms float16 [..., n])."""
    d = x.shape[-1]
    cb = tq_codebook(d, bits) if codebook is None else codebook
    if cb.numel() != 1 << bits:
        raise KvcError(f"codebook has {cb.numel()} entries, expected 2**{bits}")
    dt = work_dtype(x)
    xw = x.to(dt)
    norms = torch.linalg.vector_norm(xw, dim=-1, keepdim=True)
    norms16 = norms_fp16(norms[..., 0])
    unit = xw / torch.where(norms > 0, norms, torch.ones_like(norms))
    # TurboQuant Alg. 1 line 5-6: y = Pi x, idx_j = argmin_k |y_j - c_k|
    y = rotation.to(x.device, dt).apply(unit)
    return nearest_codes(y, cb.to(device=x.device, dtype=dt), torch.uint8), norms16


def tq_mse_decode(codes: Tensor, norms: Tensor, rotation: Rotation, codebook: Tensor,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`tq_mse_encode`: ||x|| * Pi^T c[idx] for every row, in ``dtype``."""
    # TurboQuant Alg. 1 line 9-10: y~_j = c_idx_j, x~ = Pi^T y~ (rescaled by the stored norm)
    cb = codebook.to(device=codes.device, dtype=dtype)
    y = cb[codes.long()]
    return rotation.to(codes.device, dtype).invert(y) * norms.to(dtype)[..., None]


def tq_prod_encode(x: Tensor, bits: int, rotation: Rotation, sketch: Tensor,
                   codebook: Tensor | None = None) -> dict[str, Tensor]:
    """TurboQuant_prod of every row of x [..., n, d] with a Gaussian ``sketch`` S [d, d].

    Returns {'codes' uint8 [..., n, d] (absent at bits = 1), 'norms' float16 [..., n] (absent at
    bits = 1), 'signs' bool [..., n, d] (True = +1), 'gamma' float16 [..., n] = ||x - x_mse||}.
    """
    # TurboQuant Alg. 2: idx = Quant_mse(x) at b - 1 bits; r = x - DeQuant_mse(idx); qjl = sign(S r); gamma = ||r||
    dt = work_dtype(x)
    xw = x.to(dt)
    out: dict[str, Tensor] = {}
    if bits > 1:
        codes, norms = tq_mse_encode(xw, bits - 1, rotation, codebook)
        out["codes"], out["norms"] = codes, norms
        resid = xw - tq_mse_decode(codes, norms, rotation, codebook if codebook is not None
                                   else tq_codebook(x.shape[-1], bits - 1), dt)
    else:
        resid = xw
    out["signs"], out["gamma"] = qjl_encode(resid, sketch)
    return out


def tq_prod_decode(parts: dict[str, Tensor], bits: int, rotation: Rotation, sketch: Tensor,
                   codebook: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`tq_prod_encode`: x_mse + (sqrt(pi/2)/d) gamma S^T qjl for every row."""
    # TurboQuant Alg. 2 line 10: x~ = DeQuant_mse(idx) + sqrt(pi/2)/d * gamma * S^T qjl (QJL with m = d)
    qjl = qjl_decode(parts["signs"], parts["gamma"], sketch, dtype)
    if bits > 1:
        return tq_mse_decode(parts["codes"], parts["norms"], rotation, codebook, dtype) + qjl
    return qjl


def split_bits(bits: float, d: int) -> list[tuple[int, int]]:
    """Channel split [(channels, bit width), ...] for a possibly fractional rate, high part first.

    Integer b: [(d, b)]. Fractional b = b_lo + f: [(f d, b_lo + 1), ((1 - f) d, b_lo)] (module doc);
    KvcError when f d is not an integer (the rate would not be exactly b).
    """
    b = float(bits)
    lo = math.floor(b)
    frac = b - lo
    if frac == 0:
        return [(d, int(lo))]
    hi_ch = frac * d
    if abs(hi_ch - round(hi_ch)) > 1e-6 or round(hi_ch) in (0, d):
        raise KvcError(f"{b:g} bits at d = {d} would need {hi_ch:g} channels at {lo + 1} bits; the "
                       f"fractional part times d must be a whole number (e.g. {lo + 0.5:g} bits = "
                       f"{d // 2} channels at {lo + 1} + {d - d // 2} at {lo})")
    hi_ch = int(round(hi_ch))
    return [(hi_ch, lo + 1), (d - hi_ch, lo)]


def outlier_channels(x: Tensor, count: int) -> Tensor:
    """Mask [..., d] (bool) of the ``count`` channels of x [..., n, d] with the largest energy
    sum_t x_tc^2 over the rows (ties: lower channel index first)."""
    energy = x.to(work_dtype(x)).pow(2).sum(dim=-2)
    # stable descending order: sort (-energy) with stable=True keeps lower indices first on ties
    order = torch.sort(-energy, dim=-1, stable=True).indices[..., :count]
    mask = torch.zeros_like(energy, dtype=torch.bool)
    return mask.scatter(-1, order, True)


def channel_permutation(mask: Tensor) -> Tensor:
    """Permutation [..., d] putting the masked channels first, each set in increasing channel order."""
    return torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices
