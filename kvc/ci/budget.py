"""KV-cache memory budgets: bytes per token, per sequence and per batch, fp16 against compressed.

Pure functions over a :class:`Geometry` (per-layer KV heads, head dims, sliding windows) read from a
model config, a GGUF header or explicit numbers, and a :class:`Compression` (nominal bits per K and
V entry declared by the method, or measured ones from a ``kvc compress --json`` file). Used by
``kvc budget`` and by ``kvc check``. Rules and formulas: docs/budget.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..compression.fields import flag
from ..compression.protocol import Compressor, declares_nominal_bits
from ..errors import KvcError
from ..io import schema
from ..io.gguf import read_gguf_metadata
from ..model.load import _first_line, resolve_model, text_config

SCHEMA = "kvc-budget/1"
# llama.cpp's set_swa_pattern(n) for architectures whose GGUF omits sliding_window_pattern
GGUF_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "cohere2": 4}


@dataclass(frozen=True)
class Geometry:
    """What sizes a KV cache: per layer, the KV heads (0 = no cache) and the window (None = full)."""

    name: str
    kv_heads: tuple[int, ...]
    key_dim: int
    value_dim: int
    windows: tuple[int | None, ...]

    @property
    def num_layers(self) -> int:
        return len(self.kv_heads)


@dataclass(frozen=True)
class Compression:
    """Stored bits per K and per V entry, and how many most recent tokens stay in fp16."""

    method: str
    k_bits: float
    v_bits: float
    fp16_tokens: int = 0
    source: str = "rule"


FP16 = Compression("fp16", 16.0, 16.0)


# --- geometry ---------------------------------------------------------------------------------

def geometry_from_dims(layers: int, kv_heads: int, head_dim: int, sliding_window: int | None = None,
                       sliding: list[bool] | None = None, name: str = "explicit geometry") -> Geometry:
    """Geometry from explicit numbers; ``sliding`` marks the windowed layers (all when omitted)."""
    for option, value in (("--layers", layers), ("--kv-heads", kv_heads), ("--head-dim", head_dim)):
        if value < 1:
            raise KvcError(f"{option} must be a positive integer, got {value}")
    if sliding_window is not None and sliding_window < 1:
        raise KvcError(f"--sliding-window must be a positive integer, got {sliding_window}")
    sliding = sliding if sliding is not None else [sliding_window is not None] * layers
    return Geometry(name, (kv_heads,) * layers, head_dim, head_dim,
                    tuple(sliding_window if s else None for s in sliding))


def sliding_layers(spec: str, num_layers: int) -> list[bool]:
    """Parse ``all``, indices and ranges (``0-4,6-10``) or ``pattern:N`` into a per-layer mask.

    ``pattern:N``: every N-th layer is full, the others slide (Gemma; llama.cpp set_swa_pattern).
    """
    spec = spec.strip()
    if spec == "all":
        return [True] * num_layers
    if match := re.fullmatch(r"pattern:(\d+)", spec):
        n = int(match.group(1))
        if n < 1:
            raise KvcError(f"--sliding-layers {spec!r}: the pattern period must be >= 1")
        return [i % n < n - 1 for i in range(num_layers)]
    mask = [False] * num_layers
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if not match:
            raise KvcError(f"--sliding-layers {spec!r}: expected 'all', 'pattern:N' or indices and "
                           "ranges like '0-4,6'")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if not first <= last < num_layers:
            raise KvcError(f"--sliding-layers {spec!r}: {part.strip()} is outside layers 0..{num_layers - 1}")
        mask[first:last + 1] = [True] * (last - first + 1)
    return mask


def geometry_from_config(config, name: str) -> Geometry:
    """Geometry of a transformers config (its text config for multimodal models).

    GQA through ``num_key_value_heads`` (MHA when absent); ``layer_types`` marks the sliding layers,
    else every layer slides when ``sliding_window`` is set (the rule of kvc.model.capture).
    """
    text = text_config(config)
    if getattr(text, "kv_lora_rank", None):
        raise KvcError(f"{name}: multi-head latent attention (kv_lora_rank) is not supported; "
                       "pass --layers/--kv-heads/--head-dim for the cache you store")
    missing = [k for k in ("num_hidden_layers", "num_attention_heads") if getattr(text, k, None) is None]
    if missing:
        raise KvcError(f"{name}: the config has no {', '.join(missing)}")
    layers, heads = text.num_hidden_layers, text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or getattr(text, "hidden_size", 0) // heads
    if not head_dim:
        raise KvcError(f"{name}: the config has neither head_dim nor hidden_size")
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * layers
    return Geometry(name, (kv_heads,) * layers, head_dim, head_dim,
                    tuple(window if "sliding" in t else None for t in types))


def geometry_from_gguf(path: Path) -> Geometry:
    """Geometry from a GGUF header (``{arch}.block_count``, ``{arch}.attention.*``); no weights read."""
    fields = read_gguf_metadata(path)

    def get(key: str, default=None):
        return fields.get(key.format(arch=arch), default)

    arch = fields.get("general.architecture")
    layers = get("{arch}.block_count")
    heads = get("{arch}.attention.head_count")
    if arch is None or layers is None or heads is None:
        raise KvcError(f"{path}: GGUF header lacks general.architecture, block_count or head_count")
    if get("{arch}.attention.kv_lora_rank"):
        raise KvcError(f"{path}: multi-head latent attention (kv_lora_rank) is not supported; "
                       "pass --layers/--kv-heads/--head-dim for the cache you store")
    kv_heads = _per_layer(get("{arch}.attention.head_count_kv", heads), layers)  # MHA when absent
    key_dim = get("{arch}.attention.key_length") or get("{arch}.embedding_length", 0) // max(_per_layer(heads, layers))
    if not key_dim:
        raise KvcError(f"{path}: GGUF header has neither attention.key_length nor embedding_length")
    value_dim = get("{arch}.attention.value_length") or key_dim
    window = get("{arch}.attention.sliding_window")
    pattern = get("{arch}.attention.sliding_window_pattern", GGUF_SWA_PATTERN.get(arch, 0))
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern]
    else:  # llama.cpp set_swa_pattern: layer i slides iff n == 0 or i % n < n - 1
        sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(layers)]
    return Geometry(path.name, tuple(kv_heads), key_dim, value_dim,
                    tuple(window if window and s else None for s in sliding))


def geometry_from_model(model: str | None) -> Geometry:
    """Geometry of a hub id, a local HF directory, a config.json file or a GGUF file (None: default)."""
    path = Path(model).expanduser() if model else None
    if path is not None and path.is_file() and path.suffix.lower() == ".json":
        return geometry_from_config(_local_config(path), model)
    source = resolve_model(model)
    if source.kind == "gguf":
        return geometry_from_gguf(Path(source.location))
    if source.kind == "dir":
        return geometry_from_config(_local_config(Path(source.location) / "config.json"), source.name)
    return geometry_from_config(_hub_config(source.location), source.name)


def _per_layer(value, layers: int) -> list[int]:
    values = list(value) if isinstance(value, list) else [value] * layers
    if len(values) != layers:
        raise KvcError(f"per-layer GGUF value has {len(values)} entries for {layers} layers")
    return [int(v) for v in values]


def _local_config(path: Path):
    """A config.json through transformers (its defaults), else as plain attributes."""
    from transformers import AutoConfig, PretrainedConfig

    try:
        json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise KvcError(f"{path}: not a readable JSON file ({_first_line(err)})") from err
    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError):  # a model_type transformers does not know
        return PretrainedConfig.from_json_file(str(path))


def _hub_config(hub_id: str):
    """The config of a hub model: from the local cache first, else downloaded (config.json only)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(hub_id, local_files_only=True)
    except (OSError, ValueError):
        pass
    try:
        return AutoConfig.from_pretrained(hub_id)
    except (OSError, ValueError) as err:
        raise KvcError(f"could not get the config of {hub_id!r}: {_first_line(err)}") from err


# --- compression ------------------------------------------------------------------------------

def compression_rule(compressor: Compressor, key_dim: int, value_dim: int | None = None) -> Compression:
    """Nominal stored bits per K and V entry of a configured method, declared by the method
    (``nominal_bits``, docs/methods.md#nominal-bits); its options are checked at both head dims
    as ``kvc compress`` checks them on a layer."""
    value_dim = value_dim or key_dim
    cls = type(compressor)
    if not declares_nominal_bits(cls):
        raise KvcError(f"{compressor.name} declares no nominal bits per entry (its size depends on the "
                       "data); measure it with kvc compress --json and pass --from-json")
    for d in dict.fromkeys((key_dim, value_dim)):
        compressor.check_options(d)
    nominal = cls.nominal_bits(compressor.options, key_dim, value_dim)
    return Compression(_label(compressor), nominal.k_bits, nominal.v_bits, nominal.fp16_tokens)


def _label(compressor: Compressor) -> str:
    """The method's name with its bit width (``kivi2``), then the options not at their default."""
    params, defaults = compressor.params(), dataclasses.asdict(type(compressor).Options())
    label = compressor.name + (f"{params['bits']:g}" if "bits" in params else "")
    return " ".join([label] + [f"{flag(k)} {v}" for k, v in params.items()
                               if k not in ("bits", "seed") and v != defaults[k]])


def compression_from_json(path: Path) -> Compression:
    """Measured bits per entry from ``kvc compress --json`` output: ``summary.k``/``summary.v``
    ``bits_per_entry`` when present (``k_pre`` stands in for ``k``), else the top-level figure."""
    data = schema.load_json(path, f"--from-json {path}")
    overall = data.get("bits_per_entry") if isinstance(data, dict) else None
    if not _positive_number(overall):
        raise KvcError(f"--from-json {path}: expected a positive number at 'bits_per_entry' "
                       "(output of kvc compress --json)")
    return measured_compression(data, source=str(path))


def measured_compression(result: dict, source: str = "measured") -> Compression:
    """Measured bits per K and V entry of a ``kvc compress --json`` result (``k_pre`` stands in for
    ``k``; the top-level ``bits_per_entry`` where a tensor's is missing)."""
    summary = result.get("summary") if isinstance(result.get("summary"), dict) else {}

    def tensor_bits(*names: str) -> float:
        for name in names:
            entry = summary.get(name)
            value = entry.get("bits_per_entry") if isinstance(entry, dict) else None
            if _positive_number(value):
                return float(value)
        return float(result["bits_per_entry"])

    return Compression(str(result.get("method", "measured")), tensor_bits("k", "k_pre"), tensor_bits("v"),
                       source=source)


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def budget_inputs(model: str | None = None, layers: int | None = None, kv_heads: int | None = None,
                  head_dim: int | None = None, sliding_window: int | None = None, sliding: str | None = None,
                  method: Compressor | None = None, from_json: Path | None = None
                  ) -> tuple[Geometry, Compression | None]:
    """The geometry (a model's, or explicit layers/kv_heads/head_dim and windows) and the compressed
    form (a configured method's nominal bits, measured bits from ``kvc compress --json``, or none)."""
    if from_json is not None and method is not None:
        raise KvcError("pass either --from-json or --method, not both")
    explicit = (layers, kv_heads, head_dim)
    if any(v is not None for v in explicit):
        if model is not None:
            raise KvcError("pass either --model or --layers/--kv-heads/--head-dim, not both")
        if any(v is None for v in explicit):
            raise KvcError("an explicit geometry needs all of --layers, --kv-heads and --head-dim")
        if sliding is not None and sliding_window is None:
            raise KvcError("--sliding-layers needs --sliding-window")
        mask = sliding_layers(sliding, layers) if sliding is not None else None
        geometry = geometry_from_dims(layers, kv_heads, head_dim, sliding_window, mask)
    elif sliding_window is not None or sliding is not None:
        raise KvcError("--sliding-window/--sliding-layers go with --layers/--kv-heads/--head-dim; "
                       "a model's own config gives its windows")
    else:
        geometry = geometry_from_model(model)
    compression = None
    if from_json is not None:
        compression = compression_from_json(from_json)
    elif method is not None:
        compression = compression_rule(method, geometry.key_dim, geometry.value_dim)
    return geometry, compression


# --- bytes ------------------------------------------------------------------------------------

def bytes_per_token(geometry: Geometry, compression: Compression = FP16) -> float:
    """Bytes one more token adds to the cache, no window reached: sum over layers of
    kv_heads * (d_k * bits_k + d_v * bits_v) / 8 (K and V)."""
    return sum(h * (geometry.key_dim * compression.k_bits + geometry.value_dim * compression.v_bits) / 8
               for h in geometry.kv_heads)


def sequence_bytes(geometry: Geometry, context: int, compression: Compression = FP16) -> float:
    """Bytes of the KV cache of one sequence of ``context`` tokens."""
    fp16_entry = (geometry.key_dim + geometry.value_dim) * 2  # bytes of one K+V head-token in fp16
    coded_entry = (geometry.key_dim * compression.k_bits + geometry.value_dim * compression.v_bits) / 8
    total = 0.0
    for heads, window in zip(geometry.kv_heads, geometry.windows):
        tokens = context if window is None else min(context, window)  # sliding layers keep the last window
        recent = min(tokens, compression.fp16_tokens)
        total += heads * (recent * fp16_entry + (tokens - recent) * coded_entry)
    return total


def parse_contexts(text: str, option: str = "--context") -> list[int]:
    """``1024,4k,128k`` -> [1024, 4096, 131072] (k = 1024 tokens); each must be positive."""
    contexts = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        match = re.fullmatch(r"(-?\d+)([kK]?)", part)
        if not match:
            raise KvcError(f"{option} {text!r}: expected comma-separated token counts like 1024,4k")
        value = int(match.group(1)) * (1024 if match.group(2) else 1)
        if value < 1:
            raise KvcError(f"{option} {text!r}: context lengths must be positive, got {value}")
        contexts.append(value)
    if not contexts:
        raise KvcError(f"{option}: give at least one context length")
    return contexts


def budget(geometry: Geometry, contexts: list[int], batch: int = 1,
           compression: Compression | None = None) -> dict:
    """The budget report (JSON-ready): per context, bytes per token, per sequence and for the batch."""
    if batch < 1:
        raise KvcError(f"--batch must be a positive integer, got {batch}")
    if any(c < 1 for c in contexts):
        raise KvcError(f"context lengths must be positive, got {contexts}")

    def figures(n: int, comp: Compression) -> dict:
        seq = round(sequence_bytes(geometry, n, comp))  # nominal: to the nearest byte
        return {"per_token": seq / n, "per_sequence": seq, "total": seq * batch}

    rows = []
    for n in contexts:
        row = {"context": n, "fp16": figures(n, FP16), "compressed": None, "ratio": None}
        if compression is not None:
            row["compressed"] = figures(n, compression)
            row["ratio"] = row["fp16"]["total"] / row["compressed"]["total"]
        rows.append(row)
    return {
        "schema": SCHEMA,
        "geometry": {**asdict(geometry), "num_layers": geometry.num_layers},
        "batch": batch,
        "fp16": {"bits_per_entry": 16.0, "bytes_per_token": bytes_per_token(geometry)},
        "compressed": None if compression is None else {
            **asdict(compression), "bytes_per_token": bytes_per_token(geometry, compression)},
        "contexts": rows,
    }
