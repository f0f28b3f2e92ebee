"""Synthetic captures from the spiked random-matrix model, with the ground truth in metadata.

Per (layer, sequence, KV head), K-before-RoPE and V are n x d (tokens x head_dim):
    X = sigma * sqrt(N) * sum_i theta_i u_i v_i^T + Z,      N = max(n, d)
with Haar-random orthonormal u (tokens) and v (channels), and noise Z with entries of variance
sigma^2 (white), or separable Z = sigma * diag(b)^(1/2) G diag(a)^(1/2) (colored: channel
variances a uniform on [1, 10], token variances b a two-point mixture {0.5, 2}, eOptShrink's test
design). In these units the BBP detection threshold is theta = beta^(1/4) (Baik, Ben Arous,
Peche 2005; Benaych-Georges & Nadakuditi 2012), so ``strengths`` read like the tables of
docs/methods.md#oracle-spike-limits. Model and defaults: docs/methods.md#synthetic-captures.
Planted outlier channels multiply chosen channels of K-before-RoPE and V by ``outlier_scale``.
Keys after RoPE are K-before-RoPE rotated with theta_rope = 10000 on all dims; queries are
isotropic Gaussian.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import asdict, dataclass, field

import torch

from .. import __version__
from ..io import schema
from ..io.capture import CaptureMeta, tensor_key
from ..errors import KvcError
from ..rope import apply_rope, default_inv_freq

SYNTH_ROPE_THETA = 10000.0


@dataclass
class SpikedSpec:
    num_layers: int = 2
    num_kv_heads: int = 2
    num_heads: int = 4
    head_dim: int = 64
    seq_len: int = 256
    num_seqs: int = 1
    strengths: list[float] = field(default_factory=lambda: [6.0, 4.0, 3.0])
    sigma: float = 1.0
    noise: str = "white"
    outlier_channels: list[int] = field(default_factory=list)
    outlier_scale: float = 8.0
    rope: bool = True
    seed: int = 0

    def validate(self) -> None:
        if min(self.num_layers, self.num_kv_heads, self.head_dim, self.seq_len, self.num_seqs) < 1:
            raise KvcError("synth: layers, heads, head_dim, seq_len and num_seqs must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise KvcError(f"synth: --heads {self.num_heads} must be a multiple of --kv-heads {self.num_kv_heads}")
        if self.rope and self.head_dim % 2:
            raise KvcError("synth: RoPE needs an even head_dim (or pass --no-rope)")
        if len(self.strengths) > min(self.seq_len, self.head_dim):
            raise KvcError("synth: more spikes than min(seq_len, head_dim)")
        if not all(math.isfinite(x) for x in (*self.strengths, self.sigma, self.outlier_scale)):
            raise KvcError("synth: --strengths, --sigma and --outlier-scale must be finite numbers")
        if any(s < 0 for s in self.strengths) or self.sigma <= 0:
            raise KvcError("synth: strengths must be >= 0 and sigma > 0")
        if self.noise not in ("white", "colored"):
            raise KvcError(f"synth: --noise must be white or colored, not {self.noise!r}")
        bad = [c for c in self.outlier_channels if not 0 <= c < self.head_dim]
        if bad:
            raise KvcError(f"synth: outlier channels {bad} outside 0..{self.head_dim - 1}")
        per_layer = self.num_seqs * self.seq_len * self.head_dim * (3 * self.num_kv_heads + 2 * self.num_heads)
        schema.check_allocation(4 * self.num_layers * per_layer, "the capture in float32", "synth")


def _orthonormal(shape, rank, gen) -> torch.Tensor:
    """Haar-random orthonormal columns [..., m, rank] (QR of a Gaussian with sign fix)."""
    q, r = torch.linalg.qr(torch.randn(*shape, rank, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def spiked_block(spec: SpikedSpec, gen: torch.Generator) -> torch.Tensor:
    """One tensor [S, H_kv, T, D] of the spiked model (float64)."""
    lead = (spec.num_seqs, spec.num_kv_heads)
    n, d = spec.seq_len, spec.head_dim
    noise = torch.randn(*lead, n, d, generator=gen, dtype=torch.float64)
    if spec.noise == "colored":  # separable covariance (docs/methods.md#oracle-colored-noise)
        channel_var = 1 + 9 * torch.rand(*lead, 1, d, generator=gen, dtype=torch.float64)
        token_var = torch.where(torch.rand(*lead, n, 1, generator=gen) < 0.5, 0.5, 2.0).double()
        noise = noise * channel_var.sqrt() * token_var.sqrt()
    x = spec.sigma * noise
    rank = len(spec.strengths)
    if rank:
        u = _orthonormal((*lead, n), rank, gen)
        v = _orthonormal((*lead, d), rank, gen)
        theta = torch.tensor(spec.strengths, dtype=torch.float64) * spec.sigma * math.sqrt(max(n, d))
        x = x + (u * theta) @ v.transpose(-1, -2)
    if spec.outlier_channels:
        x[..., spec.outlier_channels] *= spec.outlier_scale
    return x


def synthesize(spec: SpikedSpec, dtype: torch.dtype = torch.float32):
    """(tensors, CaptureMeta) of a synthetic capture."""
    spec.validate()
    gen = torch.Generator().manual_seed(spec.seed)
    positions = torch.arange(spec.seq_len)
    rope = _rope_meta(spec.head_dim) if spec.rope else None
    tensors = {"q_positions": positions.clone(),
               "input_ids": torch.zeros(spec.num_seqs, spec.seq_len, dtype=torch.int64)}
    for layer in range(spec.num_layers):
        k_pre = spiked_block(spec, gen)
        v = spiked_block(spec, gen)
        q_pre = torch.randn(spec.num_seqs, spec.num_heads, spec.seq_len, spec.head_dim,
                            generator=gen, dtype=torch.float64)
        if rope:
            k = apply_rope(k_pre, positions, rope, layer)
            q = apply_rope(q_pre, positions, rope, layer)
            tensors[tensor_key(layer, "k_pre")] = k_pre.to(dtype)
            tensors[tensor_key(layer, "q_pre")] = q_pre.to(dtype)
        else:
            k, q = k_pre, q_pre
        for name, t in (("k", k), ("v", v), ("q", q)):
            tensors[tensor_key(layer, name)] = t.to(dtype)
    truth = {"model": "spiked", **asdict(spec), "rank": len(spec.strengths),
             "structured_tensors": ["k_pre", "v"] if spec.rope else ["k", "v"],
             "strength_units": "sigma*sqrt(max(n,d)); BBP threshold at beta^(1/4)"}
    meta = CaptureMeta(
        model="synthetic:spiked", model_revision="", architecture="SpikedRandomMatrix",
        num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, rope=rope, layer_types=["full_attention"] * spec.num_layers,
        dtype=str(dtype).removeprefix("torch."), seq_len=spec.seq_len, num_seqs=spec.num_seqs,
        text_source="synthetic", text_sha256="", kvc_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        extra={"truth": json.dumps(truth), "query_positions": json.dumps("all")})
    return tensors, meta


def _rope_meta(head_dim: int) -> dict:
    inv_freq = default_inv_freq(SYNTH_ROPE_THETA, head_dim)
    return {"style": "rotate_half", "theta": SYNTH_ROPE_THETA, "scaling": None,
            "inv_freq": inv_freq.tolist(), "attention_scaling": 1.0, "rotary_dims": head_dim,
            "per_layer": {}}
