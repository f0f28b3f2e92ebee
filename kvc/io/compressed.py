"""The kvc compressed file, format v1 (docs/compress.md): one method's stored arrays, layer by layer.

Tensors ``layers.{L}.{array}`` are the ``Encoded`` arrays of layer L as stored. Metadata: ``format`` =
kvc-compressed, ``format_version`` = 1, ``method``, ``params`` (JSON object), ``layers`` (JSON list),
``evicts`` (JSON bool), ``layers.{L}.meta`` (JSON object of ``Encoded.meta``),
``layers.{L}.bits_paper`` (JSON number or null), ``source`` (JSON object: the source capture's
metadata strings), ``bits_per_entry`` (JSON number), ``kvc_version``, ``created``.

This module knows the layout only; what the arrays mean (the method, its options, decoding) is
kvc.compression.engine's.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from typing import TYPE_CHECKING

from safetensors import safe_open

from .. import __version__
from ..errors import KvcError
from . import schema
from .capture import CaptureMeta
from .header import read_header

if TYPE_CHECKING:
    import torch

FORMAT = "kvc-compressed"
FORMAT_VERSION = 1
_ARRAY_KEY = re.compile(r"^layers\.(0|[1-9][0-9]*)\.(.+)$")
_LAYER_META = re.compile(r"^layers\.([^.]*)\.(meta|bits_paper)$")


def compressed_metadata(method: str, params: dict[str, Any], layers: Mapping[int, tuple[dict, float | None]],
                        evicts: bool, source: CaptureMeta, bits_per_entry: float) -> dict[str, str]:
    """The metadata strings of a compressed file; ``layers``: layer -> (Encoded.meta, bits_paper).
    Its tensors are ``layers.{L}.{array}`` (:func:`array_key`)."""
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "method": method,
                "params": json.dumps(params), "layers": json.dumps(sorted(layers)),
                "evicts": json.dumps(evicts), "source": json.dumps(source.to_strings()),
                "bits_per_entry": json.dumps(bits_per_entry), "kvc_version": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for L, (meta, bits_paper) in layers.items():
        metadata[f"layers.{L}.meta"] = json.dumps(meta)
        metadata[f"layers.{L}.bits_paper"] = json.dumps(bits_paper)
    return metadata


def array_key(layer: int, name: str) -> str:
    return f"layers.{layer}.{name}"


class CompressedFile:
    """Read access to a compressed file, validated on opening (docs/compress.md, "Validation").

    ``method``, ``params``, ``layers``, ``evicts``, ``bits_per_entry`` and ``source`` (the capture's
    metadata, validated as a capture's) are checked for type and consistency; every tensor belongs
    to a listed layer, and every layer holds the same arrays with the same dtypes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._header = read_header(self.path)
        self._handle = None  # safetensors' reader, opened on the first array loaded (it imports torch)
        raw, keys = self._header.metadata, set(self._header.tensors)
        where = f"{self.path}: metadata"
        if raw.get("format") != FORMAT:
            raise KvcError(f"{self.path} is not a kvc compressed file (metadata 'format' is "
                           f"{schema.show(raw.get('format'))}, expected {FORMAT!r})")
        if raw.get("format_version") != str(FORMAT_VERSION):
            raise KvcError(f"{self.path} has compressed format version {str(raw.get('format_version'))[:40]}; "
                           f"this kvc reads version {FORMAT_VERSION}")

        def value(key: str) -> Any:
            return schema.loads(schema.require(raw, key, where), f"{where} {key}")

        src = str(self.path)
        self.method = schema.string(schema.require(raw, "method", where), "metadata method", src, nonempty=True)
        self.params: dict[str, Any] = schema.mapping(value("params"), "metadata params", src)
        self.evicts = schema.boolean(value("evicts"), "metadata evicts", src)
        self.bits_per_entry = schema.number(value("bits_per_entry"), "metadata bits_per_entry", src, minimum=0)
        self.source_strings = schema.mapping(value("source"), "metadata source", src)
        for key, text in self.source_strings.items():
            schema.string(text, f"metadata source.{key}", src)
        self.source = CaptureMeta.from_strings(self.source_strings, f"{where} source")
        layers = schema.array(value("layers"), "metadata layers", src)
        for i, layer in enumerate(layers):
            schema.integer(layer, f"metadata layers[{i}]", src, minimum=0, maximum=self.source.num_layers - 1)
        if not layers or len(set(layers)) != len(layers):
            raise KvcError(f"{where}: layers must be a non-empty list of distinct layer indices, "
                           f"got {schema.show(layers)}")
        self.layers: list[int] = sorted(layers)
        self._meta = {L: (schema.mapping(value(f"layers.{L}.meta"), f"metadata layers.{L}.meta", src),
                          schema.optional(schema.number, value(f"layers.{L}.bits_paper"),
                                          f"metadata layers.{L}.bits_paper", src, minimum=0))
                      for L in self.layers}
        for key in sorted(raw):
            match = _LAYER_META.match(key)
            if match and match.group(1) not in map(str, self.layers):
                raise KvcError(f"{where}: {key} belongs to a layer that 'layers' does not list")
        self._arrays = self._array_names(keys)

    def _array_names(self, keys: set[str]) -> dict[int, list[str]]:
        """Layer -> its array names; the same names and dtypes in every layer."""
        names: dict[int, dict[str, str]] = {L: {} for L in self.layers}
        for key in sorted(keys):
            match = _ARRAY_KEY.match(key)
            if not match or int(match.group(1)) not in names:
                raise KvcError(f"{self.path}: tensor {key} belongs to no layer that the metadata's "
                               f"'layers' lists ({self.layers})")
            names[int(match.group(1))][match.group(2)] = self._header.tensors[key].dtype
        first = self.layers[0]
        for L in self.layers:
            if not names[L]:
                raise KvcError(f"{self.path}: layer {L} holds no arrays (tensors layers.{L}.*)")
            for name in sorted(names[first].keys() | names[L].keys()):
                if names[L].get(name) != names[first].get(name):
                    how = {i: f"as {names[i][name]}" if name in names[i] else "not at all" for i in (first, L)}
                    raise KvcError(f"{self.path}: array {name} is stored {how[first]} in layer {first} and "
                                   f"{how[L]} in layer {L}; every layer must store the same arrays")
        return {L: sorted(n) for L, n in names.items()}

    def layer_meta(self, layer: int) -> tuple[dict[str, Any], float | None]:
        """(``Encoded.meta``, bits_paper) of one layer."""
        return self._meta[layer]

    def arrays(self, layer: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The stored arrays of one layer."""
        try:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="pt")
            return {name: self._handle.get_tensor(array_key(layer, name)).to(device)
                    for name in self._arrays[layer]}
        except Exception as err:  # safetensors' own errors on an unreadable tensor
            raise KvcError(f"{self.path}: cannot read the arrays of layer {layer} ({err})") from err
