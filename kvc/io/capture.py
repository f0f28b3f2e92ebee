"""The kvc capture file, format v1 (docs/format.md): one safetensors file of per-layer K, V, Q.

Tensors: ``layers.{L}.k|k_pre|v`` [S, H_kv, T, D]; ``layers.{L}.q|q_pre`` [S, H_q, Tq, D];
``q_positions`` int64 [Tq]; ``input_ids`` int64 [S, T]. Metadata values are strings, JSON where
structured. Readers check which tensors are present: ``k_pre``/``q_pre`` are absent on models
without RoPE.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..attention import AttentionSpec
from ..errors import KvcError
from .safetensors import open_safetensors

FORMAT = "kvc-capture"
FORMAT_VERSION = 1
KV_TENSORS = ("k", "k_pre", "v")
Q_TENSORS = ("q", "q_pre")
TENSOR_NAMES = KV_TENSORS + Q_TENSORS
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(\w+)$")

# Metadata keys and how each is stored: JSON-encoded (structured or numeric) or a plain string.
# The optional ones are absent from files written before they existed.
_REQUIRED_JSON = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "rope", "layer_types",
                  "seq_len", "num_seqs")
_OPTIONAL_JSON = ("sliding_window", "attention", "special_tokens")
_JSON_KEYS = _REQUIRED_JSON + _OPTIONAL_JSON
_REQUIRED_STR = ("model", "model_revision", "architecture", "dtype", "text_source", "text_sha256",
                 "kvc_version", "created")
_OPTIONAL_STR = ("weights",)
_STR_KEYS = _REQUIRED_STR + _OPTIONAL_STR
REQUIRED_KEYS = _REQUIRED_JSON + _REQUIRED_STR


def tensor_key(layer: int, name: str) -> str:
    return f"layers.{layer}.{name}"


@dataclass
class CaptureMeta:
    """The ``__metadata__`` of a capture file, parsed."""

    model: str
    model_revision: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: dict | None
    layer_types: list[str]
    dtype: str
    seq_len: int
    num_seqs: int
    text_source: str
    text_sha256: str
    kvc_version: str
    created: str
    sliding_window: int | None = None
    attention: list[dict] | None = None  # per model layer: AttentionSpec.to_json()
    special_tokens: dict | None = None  # the framing each window got: {"added", "prefix", "suffix", ...}
    weights: str = ""  # the model's weight format, e.g. "GGUF Q4_1, dequantized to float32"
    extra: dict[str, str] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        out = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        for key in _JSON_KEYS:
            out[key] = json.dumps(getattr(self, key))
        for key in _STR_KEYS:
            out[key] = str(getattr(self, key))
        out.update(self.extra)
        return out

    def layer_attention(self, layer: int) -> AttentionSpec:
        """The attention of ``layer``; files without the ``attention`` key: causal, full, 1/sqrt(D)."""
        if self.attention is None:
            return AttentionSpec()
        return AttentionSpec.from_json(self.attention[layer])

    @classmethod
    def from_strings(cls, raw: dict[str, str], source: str) -> "CaptureMeta":
        if raw.get("format") != FORMAT:
            raise KvcError(f"{source} is not a kvc capture file (metadata 'format' is "
                           f"{raw.get('format')!r}, expected {FORMAT!r})")
        version = raw.get("format_version")
        if version != str(FORMAT_VERSION):
            raise KvcError(f"{source} has capture format version {version}; this kvc reads "
                           f"version {FORMAT_VERSION}")
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise KvcError(f"{source} lacks metadata keys: {', '.join(missing)}")
        try:
            values = {k: json.loads(raw[k]) for k in _JSON_KEYS if k in raw}
        except json.JSONDecodeError as err:
            raise KvcError(f"{source} has malformed JSON metadata: {err}") from err
        values.update({k: raw[k] for k in _STR_KEYS if k in raw})
        known = set(_JSON_KEYS) | set(_STR_KEYS) | {"format", "format_version"}
        return cls(**values, extra={k: v for k, v in raw.items() if k not in known})


class CaptureFile:
    """Read access to a capture file; tensors are loaded lazily, one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle, raw, keys = open_safetensors(self.path)
        self.meta = CaptureMeta.from_strings(raw, str(self.path))
        self._keys = keys
        layers: dict[int, set[str]] = {}
        for key in keys:
            match = _LAYER_KEY.match(key)
            if match and match.group(2) in TENSOR_NAMES:
                layers.setdefault(int(match.group(1)), set()).add(match.group(2))
        if not layers:
            raise KvcError(f"{self.path} holds no layer tensors")
        self.layers = sorted(layers)
        self._names = layers

    @property
    def has_rope(self) -> bool:
        return self.meta.rope is not None

    def select_layers(self, spec: str | None) -> list[int]:
        """``--layers``: 'all' (every layer the file holds) or a list like '0,2,5-9' of held layers."""
        from ..model.capture import parse_layers

        if spec in (None, "", "all"):
            return self.layers
        chosen = parse_layers(spec, self.meta.num_layers)
        missing = sorted(set(chosen) - set(self.layers))
        if missing:
            raise KvcError(f"--layers: {self.path} does not hold layers {missing} (it holds {self.layers})")
        return chosen

    def names(self, layer: int) -> set[str]:
        return set(self._names.get(layer, ()))

    def has(self, layer: int, name: str) -> bool:
        return name in self._names.get(layer, ())

    def tensor(self, layer: int, name: str, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None) -> torch.Tensor:
        """One tensor; a missing one is a clear error naming what the file does hold."""
        if not self.has(layer, name):
            held = ", ".join(sorted(self.names(layer))) or "nothing"
            raise KvcError(f"{self.path} has no '{name}' for layer {layer} (it holds: {held})")
        return self._load(tensor_key(layer, name), dtype, device)

    def _load(self, key, dtype, device) -> torch.Tensor:
        try:
            t = self._handle.get_tensor(key)
        except Exception as err:
            raise KvcError(f"{self.path}: cannot read tensor {key} ({err})") from err
        if dtype is not None:
            t = t.to(dtype)
        return t.to(device) if device is not None else t

    @property
    def q_positions(self) -> torch.Tensor:
        return self._load("q_positions", None, None)

    @property
    def input_ids(self) -> torch.Tensor | None:
        return self._load("input_ids", None, None) if "input_ids" in self._keys else None

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Tensor name -> (shape, dtype) for every tensor in the file, without loading data."""
        out = {}
        for key in sorted(self._keys):
            sl = self._handle.get_slice(key)
            out[key] = (tuple(sl.get_shape()), sl.get_dtype())
        return out


def open_capture(path) -> CaptureFile:
    return CaptureFile(path)
