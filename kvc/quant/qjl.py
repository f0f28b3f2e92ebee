"""QJL: the 1-bit quantized Johnson-Lindenstrauss sketch (Zandieh, Daliri, Han, arXiv:2406.03482).

A key k is stored as sign(S k) in {+-1}^m (m bits) and ||k|| (float16). The inner product with an
unquantized query q is estimated asymmetrically (QJL Lemma 3.2 / TurboQuant Def. 1, Lemma 4):

    <q, k>  ~=  sqrt(pi/2) / m * ||k|| * <S q, sign(S k)>,

unbiased, with variance [(pi/2) ||q||^2 ||k||^2 - <q, k>^2] / m for Gaussian S
(docs/methods.md#qjl-sketch).
:func:`qjl_decode` returns the vector whose inner product with every q is that estimate,
k_hat = sqrt(pi/2)/m * ||k|| * S^T sign(S k), so a decoded key can be used like any other.

S: i.i.d. N(0, 1) rows, or (``orthogonal=True``, as in the authors' code) rows orthogonalized in
chunks of d by QR and scaled by sqrt(d), which keeps E[s s^T] = I and lowers the variance.
Shapes: k [..., n, d], S [..., m, d] (broadcast over the leading dims).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvc.errors import KvcError

from .fp16 import row_norms_fp16

SQRT_PI_2 = math.sqrt(math.pi / 2)


def qjl_sketch(d: int, m: int, seed: int, orthogonal: bool = False, count: int | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """S [m, d] (or [count, m, d]: independent draws) rebuilt from ``seed``; see the module docstring."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise KvcError(f"sketch dimension must be a positive integer, got {m!r}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    lead = () if count is None else (count,)
    s = torch.randn(*lead, m, d, generator=gen, dtype=torch.float64)
    if orthogonal:
        # QJL code (amirzandieh/QJL, QJLSketch init_rot_dir): QR per d-row chunk, rows scaled by sqrt(d)
        chunks = []
        for start in range(0, m, d):  # at most ceil(m / d) chunks, independent of the data size
            block = s[..., start:start + d, :]
            q, r = torch.linalg.qr(block.transpose(-1, -2))  # [.., d, rows], orthonormal columns
            sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
            sign = torch.where(sign == 0, torch.ones_like(sign), sign)
            chunks.append((q * sign[..., None, :]).transpose(-1, -2) * math.sqrt(d))
        s = torch.cat(chunks, dim=-2)
    return s.to(device=device, dtype=dtype)


def qjl_encode(k: Tensor, sketch: Tensor) -> tuple[Tensor, Tensor]:
    """(signs bool [..., n, m] with True = +1 (sign(0) := +1), norms float16 [..., n]) of keys k [..., n, d]."""
    # QJL Def. 3.1: H_S(k) = sign(S k)
    dt = torch.float64 if k.dtype == torch.float64 else torch.float32
    kw = k.to(dt)
    return kw @ sketch.to(device=k.device, dtype=dt).transpose(-1, -2) >= 0, row_norms_fp16(kw)


def qjl_inner(q: Tensor, signs: Tensor, norms: Tensor, sketch: Tensor) -> Tensor:
    """Estimates of <q_i, k_j> [..., nq, n] for queries q [..., nq, d] and encoded keys."""
    m = signs.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    sq = q.to(dt) @ sketch.to(device=q.device, dtype=dt).transpose(-1, -2)  # [..., nq, m]
    # QJL Lemma 3.2: Prod(q, k) = sqrt(pi/2)/m * ||k|| * <S q, H_S(k)>
    return (sq @ (signs.to(dt) * 2 - 1).transpose(-1, -2)) * (SQRT_PI_2 / m) * norms.to(dt)[..., None, :]


def qjl_decode(signs: Tensor, norms: Tensor, sketch: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """k_hat [..., n, d] = sqrt(pi/2)/m * ||k|| * S^T sign(S k): <q, k_hat> is the QJL estimate."""
    m = signs.shape[-1]
    # QJL Lemma 3.2 rewritten as a vector: <S q, z> = <q, S^T z>
    return (signs.to(dtype) * 2 - 1) @ sketch.to(device=signs.device, dtype=dtype) * (
        SQRT_PI_2 / m) * norms.to(dtype)[..., None]
