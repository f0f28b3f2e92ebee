"""The kvc capture file, format v1 (docs/format.md): one safetensors file of per-layer K, V, Q.

Tensors: ``layers.{L}.k|k_pre|v`` [S, H_kv, T, D]; ``layers.{L}.q|q_pre`` [S, H_q, Tq, D];
``q_positions`` int64 [Tq]; ``input_ids`` int64 [S, T]. Metadata values are strings, JSON where
structured. Readers check which tensors are present: ``k_pre``/``q_pre`` are absent on models
without RoPE.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

from typing import TYPE_CHECKING


from ..attention import AttentionSpec
from ..errors import KvcError
from ..selection import parse_layers
from . import schema
from .header import ITEM_BYTES, read_header

if TYPE_CHECKING:
    import torch

FORMAT = "kvc-capture"
FORMAT_VERSION = 1
KV_TENSORS = ("k", "k_pre", "v")
Q_TENSORS = ("q", "q_pre")
TENSOR_NAMES = KV_TENSORS + Q_TENSORS
_LAYER_KEY = re.compile(r"^layers\.(0|[1-9][0-9]*)\.(\w+)$")

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
        """The attention of ``layer``; files without the ``attention`` key (or without an entry for
        the layer): causal, full, 1/sqrt(D)."""
        if self.attention is None or self.attention[layer] is None:
            return AttentionSpec()
        return AttentionSpec.from_json(self.attention[layer])

    @classmethod
    def from_strings(cls, raw: dict[str, str], source: str) -> "CaptureMeta":
        """Parse and validate the metadata strings (docs/format.md, "Validation")."""
        if raw.get("format") != FORMAT:
            raise KvcError(f"{source} is not a kvc capture file (metadata 'format' is "
                           f"{schema.show(raw.get('format'))}, expected {FORMAT!r})")
        version = raw.get("format_version")
        if version != str(FORMAT_VERSION):
            raise KvcError(f"{source} has capture format version {str(version)[:40]}; this kvc reads "
                           f"version {FORMAT_VERSION}")
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise KvcError(f"{source} lacks metadata keys: {', '.join(missing)}")
        where = f"{source}: metadata"
        for key in _STR_KEYS:
            if key in raw:
                schema.string(raw[key], f"metadata {key}", source)
        values = {k: schema.loads(schema.string(raw[k], f"metadata {k}", source), f"{where} {k}")
                  for k in _JSON_KEYS if k in raw}
        for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "seq_len", "num_seqs"):
            schema.integer(values[key], f"metadata {key}", source, minimum=1)
        if values["num_heads"] % values["num_kv_heads"]:
            raise KvcError(f"{where}: num_heads {values['num_heads']} is not a multiple of num_kv_heads "
                           f"{values['num_kv_heads']}")
        num_layers = values["num_layers"]
        types = values["layer_types"]
        if not isinstance(types, list) or len(types) != num_layers or not all(isinstance(t, str) for t in types):
            raise KvcError(f"{where}: layer_types must be a list of {num_layers} strings (num_layers), "
                           f"got {schema.show(types)}")
        schema.optional(schema.integer, values.get("sliding_window"), "metadata sliding_window", source, minimum=1)
        schema.optional(schema.mapping, values.get("special_tokens"), "metadata special_tokens", source)
        _check_rope(values["rope"], num_layers, values["head_dim"], source)
        _check_attention(values.get("attention"), num_layers, source)
        values.update({k: raw[k] for k in _STR_KEYS if k in raw})
        known = set(_JSON_KEYS) | set(_STR_KEYS) | {"format", "format_version"}
        return cls(**values, extra={k: v for k, v in raw.items() if k not in known})


@dataclass(frozen=True)
class RopeLayer:
    """The RoPE of one layer: stored ``inv_freq`` (None: derived from ``theta``), rotary dims, scaling."""

    inv_freq: list[float] | None
    theta: float | None
    rotary_dims: int
    attention_scaling: float


def _positive(value, what: str, layer: int) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise KvcError(f"rope metadata, layer {layer}: {what} must be a positive number, got {schema.show(value)}")
    return float(value)


def rope_layer(rope: dict, layer: int) -> RopeLayer:
    """The validated RoPE of one layer (docs/format.md): a ``per_layer`` entry overrides the top level.

    inv_freq is the stored list when the layer's override holds one, or when the override changes
    neither theta nor rotary_dims and the top level holds one; otherwise it is derived from theta and
    rotary_dims (:func:`kvc.rope.default_inv_freq`).
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
        raise KvcError(f"rope metadata, layer {layer}: unsupported rope style {schema.show(entry['style'])} "
                       "(kvc reads rotate_half)")
    stored = "inv_freq" in override or ("inv_freq" in rope and not {"theta", "rotary_dims"} & override.keys())
    inv_freq = theta = None
    if stored:
        inv_freq = entry["inv_freq"]
        if not isinstance(inv_freq, list) or not inv_freq or not all(
                isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in inv_freq):
            raise KvcError(f"rope metadata, layer {layer}: inv_freq must be a non-empty list of numbers")
        rotary_dims = entry.get("rotary_dims", 2 * len(inv_freq))
    else:
        if "rotary_dims" not in entry or "theta" not in entry:
            raise KvcError(f"rope metadata, layer {layer}: needs inv_freq, or theta and rotary_dims")
        rotary_dims = entry["rotary_dims"]
    if isinstance(rotary_dims, bool) or not isinstance(rotary_dims, int) or rotary_dims < 2 or rotary_dims % 2:
        raise KvcError(f"rope metadata, layer {layer}: rotary_dims must be a positive even integer, "
                       f"got {schema.show(rotary_dims)}")
    if not stored:
        theta = _positive(entry["theta"], "theta", layer)
    elif len(inv_freq) != rotary_dims // 2:
        raise KvcError(f"rope metadata, layer {layer}: inv_freq has {len(inv_freq)} entries, "
                       f"rotary_dims {rotary_dims} needs {rotary_dims // 2}")
    scaling = _positive(entry.get("attention_scaling", 1.0), "attention_scaling", layer)
    return RopeLayer([float(v) for v in inv_freq] if stored else None, theta, rotary_dims, scaling)


def _check_rope(rope, num_layers: int, head_dim: int, source: str) -> None:
    """``rope`` is null or an object that every layer can be rotated with (kvc.rope.rope_params):
    the top level and each ``per_layer`` override, whose keys are layer indices."""
    if rope is None:
        return
    where = f"{source}: metadata"
    schema.mapping(rope, "metadata rope", source, "an object or null")
    per_layer = schema.optional(schema.mapping, rope.get("per_layer"), "metadata rope.per_layer", source) or {}
    layers = []
    for key in per_layer:
        if not (key.isdigit() and str(int(key)) == key and int(key) < num_layers):
            raise KvcError(f"{where}: rope.per_layer key {schema.show(key)} is not a layer index "
                           f"below num_layers {num_layers}")
        layers.append(int(key))
    plain = next((L for L in range(num_layers) if str(L) not in per_layer), None)
    for layer in layers + ([plain] if plain is not None else []):
        try:
            rotary_dims = rope_layer(rope, layer).rotary_dims
        except KvcError as err:
            raise KvcError(f"{where}: {err}") from None
        if rotary_dims > head_dim:
            raise KvcError(f"{where}: rope metadata, layer {layer}: rotary_dims {rotary_dims} exceeds "
                           f"head_dim {head_dim}")


def _check_attention(attention, num_layers: int, source: str) -> None:
    """``attention`` is null or one entry per model layer: null or {causal, sliding_window, scaling,
    softcap} (docs/format.md)."""
    if attention is None:
        return
    if not isinstance(attention, list) or len(attention) != num_layers:
        raise KvcError(f"{source}: metadata: attention must be null or a list of {num_layers} entries "
                       f"(num_layers), got {schema.show(attention)}")
    for layer, entry in enumerate(attention):
        if entry is None:
            continue
        key = f"metadata attention[{layer}]"
        schema.mapping(entry, key, source, "an object or null")
        schema.boolean(entry.get("causal", True), f"{key}.causal", source)
        schema.optional(schema.integer, entry.get("sliding_window"), f"{key}.sliding_window", source, minimum=1)
        for name in ("scaling", "softcap"):
            schema.optional(schema.number, entry.get(name), f"{key}.{name}", source, positive=True)


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
INT_DTYPES = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")


class CaptureFile:
    """Read access to a capture file, validated on opening; tensors are loaded lazily, one at a time.

    Opening checks the metadata and every tensor's shape and dtype against it and against the
    others (docs/format.md, "Validation") from the safetensors header alone, so a bad file is one
    KvcError naming the key before anything is loaded.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._header = read_header(self.path)
        self.meta = CaptureMeta.from_strings(self._header.metadata, str(self.path))
        keys = set(self._header.tensors)
        self._keys = keys
        self._shapes = {k: (info.shape, info.dtype) for k, info in self._header.tensors.items()}
        self._names: dict[int, set[str]] = {}
        for key in keys:
            match = _LAYER_KEY.match(key)
            if match and match.group(2) in TENSOR_NAMES + ("keep",):
                self._names.setdefault(int(match.group(1)), set()).add(match.group(2))
        self.layers = sorted(self._names)
        self._validate()

    def _validate(self) -> None:
        where, meta = str(self.path), self.meta
        if not self.layers:
            raise KvcError(f"{where} holds no layer tensors")
        if self.layers[-1] >= meta.num_layers:
            raise KvcError(f"{where}: tensors of layer {self.layers[-1]} exceed the metadata's num_layers "
                           f"{meta.num_layers}")
        first = self.layers[0]
        for layer in self.layers:
            names = self._names[layer]
            for name in ("k", "v"):
                if name not in names:
                    raise KvcError(f"{where}: layer {layer} lacks {name} (tensor {tensor_key(layer, name)}); "
                                   "every layer needs k and v")
            lacks, extra = self._names[first] - names, names - self._names[first]
            if lacks or extra:
                name, other = (min(lacks), first) if lacks else (min(extra), layer)
                raise KvcError(f"{where}: layer {layer if lacks else first} lacks {name}, which layer "
                               f"{other} holds; every layer must hold the same tensors")
        S, H, T, D = meta.num_seqs, meta.num_kv_heads, meta.seq_len, meta.head_dim
        kv = (("metadata num_seqs", S), ("metadata num_kv_heads", H), ("metadata seq_len", T),
              ("metadata head_dim", D))
        has_q = any(n in self._names[first] for n in Q_TENSORS)
        if has_q and "q_positions" not in self._shapes:
            raise KvcError(f"{where}: holds queries but no q_positions tensor")
        if "q_positions" in self._shapes:
            self._check("q_positions", INT_DTYPES, (("a 1-D tensor of positions", None),))
        Tq = self._shapes["q_positions"][0][0] if "q_positions" in self._shapes else 0
        q = (kv[0], ("metadata num_heads", meta.num_heads), ("the length of q_positions", Tq), kv[3])
        for layer in self.layers:
            for name in sorted(self._names[layer], key=(TENSOR_NAMES + ("keep",)).index):
                dims, dtypes = {"q": (q, FLOAT_DTYPES), "q_pre": (q, FLOAT_DTYPES),
                                "keep": (kv[:3], ("BOOL",))}.get(name, (kv, FLOAT_DTYPES))
                self._check(tensor_key(layer, name), dtypes, dims)
        if "input_ids" in self._shapes:
            self._check("input_ids", INT_DTYPES, kv[:1] + kv[2:3])
        largest = max(math.prod(shape) * 4 for shape, _ in self._shapes.values())
        schema.check_allocation(largest, "one tensor in float32", where)
        if Tq:
            positions = self._integers("q_positions")
            if min(positions) < 0 or max(positions) >= T:
                raise KvcError(f"{where}: q_positions must lie in 0..{T - 1} (metadata seq_len {T}), got "
                               f"{min(positions)}..{max(positions)}")

    def _integers(self, key: str) -> list[int]:
        """A small integer tensor's values, read from the file's bytes (no torch needed)."""
        info = self._header.tensors[key]
        with open(self.path, "rb") as f:
            f.seek(self._header.data_start + info.begin)
            data = f.read(info.nbytes)
        width = ITEM_BYTES[info.dtype]
        signed = info.dtype.startswith("I")
        return [int.from_bytes(data[i:i + width], "little", signed=signed) for i in range(0, len(data), width)]

    def _check(self, key: str, dtypes: tuple[str, ...], dims: tuple[tuple[str, int | None], ...]) -> None:
        """Tensor ``key`` has a dtype in ``dtypes`` and one dimension per (source, size) of ``dims``
        (size None: any)."""
        shape, dtype = self._shapes[key]
        if dtype not in dtypes:
            raise KvcError(f"{self.path}: tensor {key} has dtype {dtype}; expected {' or '.join(dtypes)}")
        if len(shape) != len(dims):
            raise KvcError(f"{self.path}: tensor {key} has shape {list(shape)}; expected {len(dims)} "
                           f"dimensions ({', '.join(source for source, _ in dims)})")
        for i, (size, (source, want)) in enumerate(zip(shape, dims)):
            if want is not None and size != want:
                raise KvcError(f"{self.path}: tensor {key} has shape {list(shape)}, but its dimension {i} "
                               f"must be {source} = {want}")

    @property
    def has_rope(self) -> bool:
        return self.meta.rope is not None

    def select_layers(self, spec: str | None) -> list[int]:
        """``--layers``: 'all' (every layer the file holds) or a list like '0,2,5-9' of held layers."""
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
        """A tensor as stored (then converted); floating-point data must be finite.

        Read with plain file reads at the validated header's offsets, not through a memory map: the
        pages of the file read so far would count in the process's resident memory, which then
        grew with the file instead of staying at one layer.
        """
        import torch

        from .safetensors import SAFETENSORS_DTYPES

        info = self._header.tensors[key]
        stored = {name: dt for dt, name in SAFETENSORS_DTYPES.items()}.get(info.dtype)
        if stored is None:
            raise KvcError(f"{self.path}: tensor {key} has dtype {info.dtype}, which kvc does not read")
        t = torch.empty(info.shape, dtype=stored)
        try:
            with open(self.path, "rb") as f:
                f.seek(self._header.data_start + info.begin)
                got = f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) if info.nbytes else 0
        except OSError as err:
            raise KvcError(f"{self.path}: cannot read tensor {key} ({err.strerror or err})") from err
        if got != info.nbytes:
            raise KvcError(f"{self.path}: cannot read tensor {key} (the file ends after {got} of its "
                           f"{info.nbytes} bytes)")
        if dtype is not None:
            t = t.to(dtype)
        if t.is_floating_point() and not t.sum().isfinite():  # one pass when all is finite (overflow: checked)
            bad = ~t.isfinite()
            if bad.any():  # per head for [S, H, T, D] tensors
                counts = bad.sum((0, 2, 3)).tolist() if t.dim() == 4 else [int(bad.sum())]
                found = ", ".join(f"head {h} ({c} entries)" if t.dim() == 4 else f"{c} entries"
                                  for h, c in enumerate(counts) if c)
                raise KvcError(f"{self.path}: tensor {key} holds NaN/Inf values: {found}")
        return t.to(device) if device is not None else t

    @property
    def q_positions(self) -> torch.Tensor:
        if "q_positions" not in self._keys:
            raise KvcError(f"{self.path} holds no queries (no q_positions tensor)")
        return self._load("q_positions", None, None)

    @property
    def input_ids(self) -> torch.Tensor | None:
        return self._load("input_ids", None, None) if "input_ids" in self._keys else None

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Tensor name -> (shape, dtype) for every tensor in the file, without loading data."""
        return dict(sorted(self._shapes.items()))


def open_capture(path) -> CaptureFile:
    return CaptureFile(path)
