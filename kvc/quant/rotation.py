"""Random rotations of R^d, rebuilt from an integer seed (the seed is what a compressed file stores).

Two kinds, both orthogonal (``invert(apply(x)) == x``) and batched over any leading dimensions; they
act on the last axis of row vectors: ``apply(x) = x @ Pi^T`` (y = Pi x for each row x).

- ``haar``: Pi = Q of the QR factorisation of a d x d i.i.d. N(0, 1) matrix with the sign fix
  Q <- Q diag(sign(diag R)), which makes Q exactly Haar-distributed (Mezzadri 2007, sec. 5).
  TurboQuant Alg. 1 (arXiv:2504.19874) uses this rotation.
- ``hadamard``: randomized Hadamard transform Pi = (H_p / sqrt(p)) D, D = diag of i.i.d. random
  signs, H_p the Sylvester-Hadamard matrix, applied by the fast Walsh-Hadamard transform in
  O(d log d) (Ailon & Chazelle 2009; QuaRot / community TurboQuant engines).
  General d = p * m with p the largest power-of-two factor and m odd: Pi = (H_p / sqrt(p) kron Q_m) D
  with Q_m a Haar m x m rotation (coordinate j = i * m + a, i < p, a < m). For a power of two this is
  the plain randomized Hadamard transform; for odd d it degenerates to Haar (after the signs).
  Example: the 96-channel half of a TurboQuant fractional split is H_32 kron Q_3.

Seeds are expanded with a CPU ``torch.Generator`` in float64, so a rotation is identical on every
device; it is then cast to the working dtype and device.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvc.errors import KvcError

KINDS = ("haar", "hadamard")


def draw_seed(generator: torch.Generator) -> int:
    """A fresh non-negative 62-bit seed from ``generator`` (deterministic under the generator's seed)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def _cpu_gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def haar_matrix(d: int, generator: torch.Generator) -> Tensor:
    """A Haar-distributed d x d orthogonal matrix (float64, CPU) drawn with a CPU ``generator``."""
    # Mezzadri 2007 (arXiv:math-ph/0609050) sec. 5: Q R = G, Q <- Q diag(sign(diag R)) is Haar
    g = torch.randn(d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def fwht(x: Tensor) -> Tensor:
    """Orthonormal fast Walsh-Hadamard transform along the last axis (length a power of two).

    Returns x @ (H_p / sqrt(p)) with H_p the Sylvester-Hadamard matrix (symmetric, so this is also
    its own inverse)."""
    # Sylvester construction H_2p = [[H_p, H_p], [H_p, -H_p]]; butterflies of width h = 1, 2, 4, ...
    shape = x.shape
    p = shape[-1]
    if p & (p - 1):
        raise KvcError(f"fast Walsh-Hadamard transform needs a power-of-two length, got {p}")
    src = x.reshape(-1, p).contiguous()
    work = [torch.empty((src.shape[0], p), dtype=x.dtype, device=x.device) for _ in range(2 if p > 2 else 1)]
    h, stage = 1, 0
    while h < p:  # each stage writes both halves of every butterfly into a work buffer (no stack copy)
        dst = work[stage % len(work)]
        y, o = src.view(-1, p // (2 * h), 2, h), dst.view(-1, p // (2 * h), 2, h)
        torch.add(y[:, :, 0], y[:, :, 1], out=o[:, :, 0])
        torch.sub(y[:, :, 0], y[:, :, 1], out=o[:, :, 1])
        src, h, stage = dst, h * 2, stage + 1
    return src.reshape(shape) / math.sqrt(p)


def _power_of_two_part(d: int) -> int:
    return d & -d


@dataclass
class Rotation:
    """A random rotation of R^d of one ``kind``, determined by ``seed``; see the module docstring."""

    kind: str
    d: int
    seed: int
    matrix: Tensor | None = None  # haar: Pi [d, d]
    signs: Tensor | None = None  # hadamard: the diagonal of D [d]
    mix: Tensor | None = None  # hadamard with an odd factor m > 1: Q_m [m, m]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Rotation":
        def cast(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return Rotation(self.kind, self.d, self.seed, cast(self.matrix), cast(self.signs), cast(self.mix))

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.d:
            raise KvcError(f"rotation of dimension {self.d} applied to vectors of length {x.shape[-1]}")

    def apply(self, x: Tensor) -> Tensor:
        """y = Pi x for every row x (last axis)."""
        self._check(x)
        if self.kind == "haar":
            return x @ self.matrix.to(x.dtype).T
        z = x * self.signs.to(x.dtype)
        return self._mix(z, forward=True)

    def invert(self, y: Tensor) -> Tensor:
        """x = Pi^T y for every row y (last axis)."""
        self._check(y)
        if self.kind == "haar":
            return y @ self.matrix.to(y.dtype)
        return self._mix(y, forward=False) * self.signs.to(y.dtype)

    def _mix(self, z: Tensor, forward: bool) -> Tensor:
        p = _power_of_two_part(self.d)
        m = self.d // p
        if m == 1:
            return fwht(z)
        # (H_p kron Q_m): coordinate i * m + a; H acts on i, Q on a (the two commute)
        mix = self.mix.to(z.dtype)
        z = z.reshape(*z.shape[:-1], p, m) @ (mix.T if forward else mix)
        z = fwht(z.transpose(-1, -2)).transpose(-1, -2)
        return z.reshape(*z.shape[:-2], self.d)

    def dense(self) -> Tensor:
        """The matrix Pi itself [d, d] (for tests and small d)."""
        eye = torch.eye(self.d, dtype=torch.float64)
        return self.to(dtype=torch.float64).apply(eye).T


@functools.lru_cache(maxsize=256)
def _build(kind: str, d: int, seed: int) -> Rotation:
    gen = _cpu_gen(seed)
    if kind == "haar":
        return Rotation(kind, d, seed, matrix=haar_matrix(d, gen))
    signs = torch.randint(0, 2, (d,), generator=gen).to(torch.float64) * 2 - 1
    m = d // _power_of_two_part(d)
    return Rotation(kind, d, seed, signs=signs, mix=haar_matrix(m, gen) if m > 1 else None)


def make_rotation(kind: str, d: int, seed: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Rotation:
    """The rotation of ``kind`` ('haar' | 'hadamard') on R^d defined by ``seed``."""
    if kind not in KINDS:
        raise KvcError(f"unknown rotation {kind!r}; valid: {', '.join(KINDS)}")
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise KvcError(f"rotation dimension must be a positive integer, got {d!r}")
    return _build(kind, d, int(seed)).to(device=device, dtype=dtype)
