"""Rotary position embedding from a capture's ``rope`` metadata, without the model.

kvc stores, per layer, the exact inverse frequencies and attention scaling the model's rotary
module used (so every rope type, scaled or not, is reproduced), the number of rotated channels
(partial rotary) and the layout (``rotate_half``: channel i pairs with i + r/2). A file from
another writer may give only ``theta`` and ``rotary_dims``: the standard inverse frequencies are
derived from them (`default_inv_freq`), with ``attention_scaling`` 1 when absent.
"""

from __future__ import annotations


import torch

from .errors import KvcError
from .io.capture import rope_layer


def default_inv_freq(theta: float, rotary_dims: int) -> torch.Tensor:
    """theta^(-2i/r), i = 0..r/2-1, float32 [r/2], computed as transformers' default rope init does."""
    # RoFormer (Su et al. 2021) eq. 15; transformers' _compute_default_rope_parameters
    return 1.0 / (theta ** (torch.arange(0, rotary_dims, 2, dtype=torch.float32) / rotary_dims))


def rope_params(rope: dict, layer: int) -> tuple[torch.Tensor, float, int]:
    """(inv_freq [r/2] float32, attention_scaling, rotary_dims) for one layer of validated rope
    metadata (:func:`kvc.io.capture.rope_layer`)."""
    entry = rope_layer(rope, layer)
    inv_freq = (torch.tensor(entry.inv_freq, dtype=torch.float32) if entry.inv_freq is not None
                else default_inv_freq(entry.theta, entry.rotary_dims))
    return inv_freq, entry.attention_scaling, entry.rotary_dims


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float):
    """cos, sin [..., T, r] for positions [..., T], in float32 as transformers' rotary modules do."""
    # RoFormer (Su et al. 2021) eq. 34; transformers' LlamaRotaryEmbedding.forward
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, rope: dict, layer: int,
               inverse: bool = False) -> torch.Tensor:
    """Rotate x [..., T, D] at ``positions`` [T] or broadcastable [..., T] (``inverse``: undo it)."""
    inv_freq, scaling, rotary_dims = rope_params(rope, layer)
    if rotary_dims > x.shape[-1]:
        raise KvcError(f"rope metadata, layer {layer}: rotary_dims {rotary_dims} exceeds head_dim {x.shape[-1]}")
    cos, sin = cos_sin(positions, inv_freq, scaling)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot, rest = x[..., :rotary_dims], x[..., rotary_dims:]
    if inverse:  # R(θ)^-1 = R(-θ) / s² for the scaled rotation s·R(θ)
        rotated = (rot * cos - _rotate_half(rot) * sin) / (scaling * scaling)
    else:
        rotated = rot * cos + _rotate_half(rot) * sin
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated
