"""Rotary position embedding from a capture's ``rope`` metadata, without the model.

The metadata stores, per layer, the exact inverse frequencies and attention scaling the model's
rotary module used (so every rope type, scaled or not, is reproduced), the number of rotated
channels (partial rotary) and the layout (``rotate_half``: channel i pairs with i + r/2).
"""

from __future__ import annotations

import torch


def rope_params(rope: dict, layer: int) -> tuple[torch.Tensor, float, int]:
    """(inv_freq [r/2] float32, attention_scaling, rotary_dims) for one layer."""
    entry = {**rope, **rope.get("per_layer", {}).get(str(layer), {})}
    if entry.get("style", "rotate_half") != "rotate_half":
        raise ValueError(f"unsupported rope style {entry['style']!r}")
    return (torch.tensor(entry["inv_freq"], dtype=torch.float32), float(entry["attention_scaling"]),
            int(entry["rotary_dims"]))


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
    cos, sin = cos_sin(positions, inv_freq, scaling)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot, rest = x[..., :rotary_dims], x[..., rotary_dims:]
    if inverse:  # R(θ)^-1 = R(-θ) / s² for the scaled rotation s·R(θ)
        rotated = (rot * cos - _rotate_half(rot) * sin) / (scaling * scaling)
    else:
        rotated = rot * cos + _rotate_half(rot) * sin
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated
