"""Writing safetensors files: whole (``save_safetensors``) or one slice at a time
(``StreamingSafetensorsWriter``), both atomically (:mod:`kvc.io.atomic`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from .atomic import atomic_path

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def save_safetensors(path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], force=False):
    """Write a whole safetensors file atomically."""
    with atomic_path(path, force) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata))


class StreamingSafetensorsWriter:
    """Writes a safetensors file whose tensor shapes are known in advance, one slice at a time.

    The header is laid out first (safetensors format: u64 header length, JSON header, data), the
    file is sized, and each ``write(name, start, rows)`` puts rows [start, start+len) of a tensor's
    first dimension at their final offset. Use as a context manager: the file appears under its
    name only when the block exits without error.

    ``metadata=None`` defers the header's metadata to ``set_metadata`` (called once, inside the
    block): slices written before it go after a provisional header without metadata and are moved
    once, in chunks, when the final header is known, so no caller has to hold them until then.
    """

    def __init__(self, path, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None, force: bool = False):
        self.path = Path(path)
        self.force = force
        self._layout: dict = {}
        self.offsets: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name in sorted(specs):
            dtype, shape = specs[name]
            nbytes = _numel(shape) * _itemsize(dtype)
            self._layout[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                                  "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = (offset, dtype, tuple(shape))
            offset += nbytes
        self.header = self._header(metadata or {})
        self.data_bytes = offset
        self._pending: list[tuple[int, int]] | None = None if metadata is not None else []  # (offset, bytes) written
        self._ctx = None
        self._file = None

    def _header(self, metadata: Mapping[str, str]) -> bytes:
        blob = json.dumps({"__metadata__": dict(metadata), **self._layout}, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        return len(blob).to_bytes(8, "little") + blob

    def __enter__(self) -> "StreamingSafetensorsWriter":
        self._ctx = atomic_path(self.path, self.force)
        tmp = self._ctx.__enter__()
        self._file = open(tmp, "r+b")
        self._file.write(self.header)
        self._file.truncate(len(self.header) + self.data_bytes)
        return self

    def write(self, name: str, start: int, rows: torch.Tensor) -> None:
        offset, dtype, shape = self.offsets[name]
        if rows.dtype != dtype or tuple(rows.shape[1:]) != shape[1:] or start + rows.shape[0] > shape[0]:
            raise ValueError(f"slice {tuple(rows.shape)} {rows.dtype} does not fit {name} {shape} {dtype}")
        row_bytes = _numel(shape[1:]) * _itemsize(dtype)
        position = offset + start * row_bytes
        if self._pending is not None:
            self._pending.append((position, rows.shape[0] * row_bytes))
        self._file.seek(len(self.header) + position)
        self._file.write(rows.detach().contiguous().cpu().view(torch.uint8).numpy())

    def set_metadata(self, metadata: Mapping[str, str]) -> None:
        """The deferred metadata: writes the final header and moves the slices written so far."""
        if self._pending is None:
            raise RuntimeError("the metadata of this file is already set")
        header = self._header(metadata)  # never shorter than the provisional one: slices move up
        shift = len(header) - len(self.header)
        self._file.truncate(len(header) + self.data_bytes)
        for begin, size in sorted(self._pending, reverse=True):  # highest first, each from its end:
            end = begin + size                                    # nothing lands on bytes not yet moved
            while end > begin:
                n = min(_MOVE_CHUNK, end - begin)
                end -= n
                self._file.seek(len(self.header) + end)
                chunk = self._file.read(n)
                self._file.seek(len(self.header) + shift + end)
                self._file.write(chunk)
        self._file.seek(0)
        self._file.write(header)
        self.header, self._pending = header, None

    def __exit__(self, exc_type, exc, tb):
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._ctx.__exit__(exc_type, exc, tb)


_MOVE_CHUNK = 16 << 20


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
