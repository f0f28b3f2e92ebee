"""Rotary position embedding from a capture's ``rope`` metadata, without the model.

kvc stores, per layer, the exact inverse frequencies and attention scaling the model's rotary
module used (so every rope type, scaled or not, is reproduced), the number of rotated channels
(partial rotary) and the layout (``rotate_half``: channel i pairs with i + r/2). A file from
another writer may give only ``theta`` and ``rotary_dims``: the standard inverse frequencies are
derived from them (`default_inv_freq`), with ``attention_scaling`` 1 when absent.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from .errors import KvcError


def default_inv_freq(theta: float, rotary_dims: int) -> torch.Tensor:
    """theta^(-2i/r), i = 0..r/2-1, float32 [r/2], computed as transformers' default rope init does."""
    # RoFormer (Su et al. 2021) eq. 15; transformers' _compute_default_rope_parameters
    return 1.0 / (theta ** (torch.arange(0, rotary_dims, 2, dtype=torch.float32) / rotary_dims))


def _number(value, what: str, layer: int) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise KvcError(f"rope metadata, layer {layer}: {what} must be a positive number, got {value!r}")
    return float(value)


def rope_params(rope: dict, layer: int) -> tuple[torch.Tensor, float, int]:
    """(inv_freq [r/2] float32, attention_scaling, rotary_dims) for one layer, validated.

    A ``per_layer`` entry overrides the top level. inv_freq is the stored list when the layer's
    override holds one, or when the override changes neither theta nor rotary_dims and the top
    level holds one; otherwise it is derived from theta and rotary_dims.
    """
    if not isinstance(rope, dict):
        raise KvcError("rope metadata must be a JSON object or null")
    per_layer = rope.get("per_layer")
    per_layer = {} if per_layer is None else per_layer
    if not isinstance(per_layer, dict):
        raise KvcError("rope metadata: 'per_layer' must be an object")
    override = per_layer.get(str(layer), {})
    if not isinstance(override, dict):
        raise KvcError(f"rope metadata, layer {layer}: the per_layer entry must be an object")
    entry = {**rope, **override}
    if entry.get("style", "rotate_half") != "rotate_half":
        raise KvcError(f"rope metadata, layer {layer}: unsupported rope style {entry['style']!r} "
                       "(kvc reads rotate_half)")
    stored = "inv_freq" in override or ("inv_freq" in rope and not {"theta", "rotary_dims"} & override.keys())
    if stored:
        values = entry["inv_freq"]
        if not isinstance(values, list) or not values or not all(
                isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise KvcError(f"rope metadata, layer {layer}: inv_freq must be a non-empty list of numbers")
        inv_freq = torch.tensor(values, dtype=torch.float32)
        rotary_dims = entry.get("rotary_dims", 2 * len(values))
    else:
        if "rotary_dims" not in entry or "theta" not in entry:
            raise KvcError(f"rope metadata, layer {layer}: needs inv_freq, or theta and rotary_dims")
        rotary_dims = entry["rotary_dims"]
    if isinstance(rotary_dims, bool) or not isinstance(rotary_dims, int) or rotary_dims < 2 or rotary_dims % 2:
        raise KvcError(f"rope metadata, layer {layer}: rotary_dims must be a positive even integer, "
                       f"got {rotary_dims!r}")
    if not stored:
        inv_freq = default_inv_freq(_number(entry["theta"], "theta", layer), rotary_dims)
    elif inv_freq.numel() != rotary_dims // 2:
        raise KvcError(f"rope metadata, layer {layer}: inv_freq has {inv_freq.numel()} entries, "
                       f"rotary_dims {rotary_dims} needs {rotary_dims // 2}")
    scaling = _number(entry.get("attention_scaling", 1.0), "attention_scaling", layer)
    return inv_freq, scaling, rotary_dims


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
