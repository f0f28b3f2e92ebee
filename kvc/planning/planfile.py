"""The plan file: TOML, one ``[[heads]]`` row per (layer, tensor, KV head) (docs/plan.md).

Written by :func:`write_plan`, read by :func:`read_plan`, which treats the file as untrusted input
(bounded size and nesting, every key known and typed, every method and option checked as
``kvc compress`` checks them; a wrong value is one KvcError naming the key). Torch-free.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import KvcError
from ..io import schema
from ..io.atomic import write_text

VERSION = 1
TENSORS = ("k", "v")
MAX_LAYERS, MAX_KV_HEADS, MAX_HEAD_DIM = 4096, 1024, 65536
TOP_KEYS = ("version", "model", "num_layers", "num_kv_heads", "head_dim", "budget", "bits_per_entry",
            "error", "capture", "heads")
HEAD_KEYS = ("layer", "tensor", "head", "method", "options", "bits_per_entry", "error")


@dataclass(frozen=True)
class Assignment:
    """One (layer, tensor, KV head): its method, every option's value, and its predicted stored bits
    per entry and relative squared attention-output error (docs/methods.md#plan)."""

    layer: int
    tensor: str
    head: int
    method: str
    options: dict[str, Any] = field(hash=False)
    bits_per_entry: float = math.nan
    error: float = math.nan

    @property
    def key(self) -> tuple[int, str, int]:
        return self.layer, self.tensor, self.head

    @property
    def config(self) -> str:
        """The method and its options as one canonical string (equal strings, equal compressors)."""
        return config_key(self.method, self.options)


def config_key(method: str, options: dict[str, Any]) -> str:
    return method + json.dumps(options, sort_keys=True)


@dataclass
class PlanSpec:
    """A plan: the model's KV geometry, the budget asked (average bits per entry, None for a plan made
    by hand), the predicted totals and one :class:`Assignment` per (layer, tensor, KV head)."""

    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    heads: list[Assignment]
    budget: float | None = None
    bits_per_entry: float | None = None
    error: float | None = None
    capture: str = ""

    @property
    def layers(self) -> list[int]:
        return sorted({a.layer for a in self.heads})

    def lookup(self) -> dict[tuple[int, str, int], Assignment]:
        return {a.key: a for a in self.heads}

    def check_geometry(self, num_kv_heads: int, head_dim: int, where: str, num_layers: int | None = None) -> None:
        """KvcError when the plan's model shape is not ``where``'s."""
        mine = (self.num_kv_heads, self.head_dim) + (() if num_layers is None else (self.num_layers,))
        theirs = (num_kv_heads, head_dim) + (() if num_layers is None else (num_layers,))
        if mine != theirs:
            names = ("num_kv_heads", "head_dim", "num_layers")
            diff = ", ".join(f"{n} {a} vs {b}" for n, a, b in zip(names, mine, theirs) if a != b)
            raise KvcError(f"the plan is for another model shape than {where} ({diff})")


# ----------------------------------------------------------------------------- writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise KvcError(f"a plan holds finite numbers only, got {value}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (JSON's escapes are TOML's)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise KvcError(f"a plan cannot hold a value of type {type(value).__name__}")


def plan_text(plan: PlanSpec) -> str:
    """The TOML text of a plan (docs/plan.md)."""
    lines = ["# kvc plan (docs/plan.md): a method and its options per (layer, tensor, KV head)",
             f"version = {VERSION}", f"model = {_toml_value(plan.model)}", f"num_layers = {plan.num_layers}",
             f"num_kv_heads = {plan.num_kv_heads}", f"head_dim = {plan.head_dim}"]
    for key in ("budget", "bits_per_entry", "error"):
        if getattr(plan, key) is not None:
            lines.append(f"{key} = {_toml_value(float(getattr(plan, key)))}")
    lines.append(f"capture = {_toml_value(plan.capture)}")
    for a in sorted(plan.heads, key=lambda a: (a.layer, a.tensor, a.head)):
        lines += ["", "[[heads]]", f"layer = {a.layer}", f"tensor = {_toml_value(a.tensor)}", f"head = {a.head}",
                  f"method = {_toml_value(a.method)}", f"options = {_toml_value(a.options)}"]
        lines += [f"{k} = {_toml_value(float(getattr(a, k)))}" for k in ("bits_per_entry", "error")
                  if math.isfinite(getattr(a, k))]
    return "\n".join(lines) + "\n"


def write_plan(path: str | os.PathLike, plan: PlanSpec, force: bool = False) -> None:
    write_text(path, plan_text(plan), force=force)


# ----------------------------------------------------------------------------- reading


def read_plan(path: str | os.PathLike) -> PlanSpec:
    """A validated plan file; every method and its options checked (methods are looked up lazily,
    so reading needs torch only for that check)."""
    where = f"plan {path}"
    return parse_plan(schema.load_toml(path, where), where)


def parse_plan(data: dict, where: str) -> PlanSpec:
    """Validate a parsed plan: known keys, types, ranges, every (layer, tensor, head) of its layers
    exactly once, methods and options as ``kvc compress`` checks them."""
    schema.known_keys(data, TOP_KEYS, where)
    version = schema.integer(schema.require(data, "version", where), "version", where)
    if version != VERSION:
        raise KvcError(f"{where}: version {version} is not one this kvc reads ({VERSION})")
    num_layers = schema.integer(schema.require(data, "num_layers", where), "num_layers", where, 1, MAX_LAYERS)
    kv_heads = schema.integer(schema.require(data, "num_kv_heads", where), "num_kv_heads", where, 1, MAX_KV_HEADS)
    head_dim = schema.integer(schema.require(data, "head_dim", where), "head_dim", where, 1, MAX_HEAD_DIM)
    plan = PlanSpec(model=schema.string(schema.require(data, "model", where), "model", where),
                num_layers=num_layers, num_kv_heads=kv_heads, head_dim=head_dim, heads=[],
                budget=schema.optional(schema.number, data.get("budget"), "budget", where, positive=True),
                bits_per_entry=schema.optional(schema.number, data.get("bits_per_entry"), "bits_per_entry", where,
                                               positive=True),
                error=schema.optional(schema.number, data.get("error"), "error", where, minimum=0),
                capture=schema.string(data.get("capture", ""), "capture", where))
    rows = schema.array(schema.require(data, "heads", where), "heads", where)
    if not rows or len(rows) > num_layers * len(TENSORS) * kv_heads:
        raise KvcError(f"{where}: heads must hold 1 to num_layers x 2 x num_kv_heads = "
                       f"{num_layers * 2 * kv_heads} rows, got {len(rows)}")
    built: dict[str, dict[str, Any]] = {}
    seen = set()
    for i, row in enumerate(rows):
        key = f"heads[{i}]"
        row = schema.mapping(row, key, where, "a table")
        schema.known_keys(row, HEAD_KEYS, where, prefix=f"{key}.")
        layer = schema.integer(schema.require(row, "layer", where, f"{key}.layer"), f"{key}.layer", where,
                               0, num_layers - 1)
        tensor = schema.string(schema.require(row, "tensor", where, f"{key}.tensor"), f"{key}.tensor", where,
                               choices=TENSORS)
        head = schema.integer(schema.require(row, "head", where, f"{key}.head"), f"{key}.head", where, 0, kv_heads - 1)
        method = schema.string(schema.require(row, "method", where, f"{key}.method"), f"{key}.method", where,
                               nonempty=True)
        options = schema.mapping(row.get("options", {}), f"{key}.options", where, "a table")
        if (layer, tensor, head) in seen:
            raise KvcError(f"{where}: {key} repeats layer {layer} tensor {tensor} head {head}")
        seen.add((layer, tensor, head))
        ckey = config_key(method, options)
        if ckey not in built:
            built[ckey] = checked_options(method, options, head_dim, f"{where}: {key}")
        bits, error = (schema.optional(schema.number, row.get(k), f"{key}.{k}", where, minimum=0)
                       for k in ("bits_per_entry", "error"))
        plan.heads.append(Assignment(layer, tensor, head, method, built[ckey],
                                     math.nan if bits is None else bits, math.nan if error is None else error))
    for layer in plan.layers:
        for tensor in TENSORS:
            for head in range(kv_heads):
                if (layer, tensor, head) not in seen:
                    raise KvcError(f"{where}: layer {layer} has no row for tensor {tensor} head {head}")
    return plan


def checked_options(method: str, options: dict[str, Any], head_dim: int, where: str) -> dict[str, Any]:
    """Every option value of a per-tensor method, checked as ``kvc compress`` checks them (names,
    types, declared constraints, those on the head dimension)."""
    from ..compression.options import method_options  # torch: only when a plan is read
    from ..compression.protocol import TensorCompressor
    from ..compression.registry import build, get

    try:
        cls = get(method)
        if not issubclass(cls, TensorCompressor):
            raise KvcError(f"method {method} does not compress K and V separately; a plan takes "
                           "per-tensor methods (e.g. eoptshrinkq, turboquant, kvquant, fp16)")
        compressor = build(cls.name, **method_options(cls, options))
        compressor.check_options(head_dim)
    except KvcError as err:
        raise KvcError(f"{where}: {err}") from None
    return compressor.params()
