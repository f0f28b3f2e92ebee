"""The header of a safetensors file, read and validated without torch.

Layout (safetensors' format): an 8-byte little-endian header length N, N bytes of JSON
(``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}``), then the
data. Every check below comes before any tensor is read: the header is bounded, each tensor's byte
range matches its dtype and shape, and the ranges tile the data exactly, so the file's size bounds
every allocation a reader makes from it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import KvcError
from . import schema

ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
              "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the header: dtype (safetensors' name), shape and byte range in the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: metadata strings and the tensor table."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int  # file offset of the data


def read_header(path: str | os.PathLike) -> Header:
    """The validated header of a safetensors file; a missing, foreign, truncated or inconsistent file
    is a KvcError naming the path and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise KvcError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                raise KvcError(f"{path} is not a readable safetensors file (header length {n} does not fit "
                               f"its {size} bytes)")
            text = f.read(n)
    except OSError as err:
        raise KvcError(f"{path}: cannot read ({err.strerror or err})") from None
    where = f"{path}: safetensors header"
    try:
        header = schema.loads(text.decode("utf-8"), where)
    except UnicodeDecodeError:
        raise KvcError(f"{where} is not UTF-8 text") from None
    schema.mapping(header, "header", str(path))
    metadata = schema.mapping(header.pop("__metadata__", None) or {}, "__metadata__", str(path))
    for key, value in metadata.items():
        schema.string(value, f"__metadata__ {key}", str(path))
    tensors = {name: _tensor_info(name, entry, where) for name, entry in header.items()}
    end = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != end:
            raise KvcError(f"{where}: tensor {name} starts at byte {info.begin}, expected {end} "
                           "(tensors must tile the data without gaps or overlaps)")
        end = info.end
    if end != size - 8 - n:
        raise KvcError(f"{path} is not a readable safetensors file (its tensors hold {end} bytes but it has "
                       f"{size - 8 - n} bytes of data: truncated or padded)")
    return Header(path, dict(metadata), tensors, 8 + n)


def _tensor_info(name: str, entry, where: str) -> TensorInfo:
    schema.mapping(entry, f"tensor {name}", where)
    dtype = schema.string(entry.get("dtype"), f"tensor {name} dtype", where, choices=tuple(ITEM_BYTES))
    shape = schema.array(entry.get("shape"), f"tensor {name} shape", where)
    for i, dim in enumerate(shape):
        schema.integer(dim, f"tensor {name} shape[{i}]", where, minimum=0)
    offsets = schema.array(entry.get("data_offsets"), f"tensor {name} data_offsets", where)
    if len(offsets) != 2:
        raise KvcError(f"{where}: tensor {name} data_offsets must be [begin, end], got {schema.show(offsets)}")
    begin, end = (schema.integer(o, f"tensor {name} data_offsets", where, minimum=0) for o in offsets)
    if end - begin != math.prod(shape) * ITEM_BYTES[dtype]:
        raise KvcError(f"{where}: tensor {name} spans {end - begin} bytes; {dtype} {list(shape)} needs "
                       f"{math.prod(shape) * ITEM_BYTES[dtype]}")
    return TensorInfo(dtype, tuple(shape), begin, end)
