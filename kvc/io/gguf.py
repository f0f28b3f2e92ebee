"""The metadata of a GGUF file, read and validated without reading its tensors.

Layout (GGUF versions 2 and 3, either byte order): the magic ``GGUF``, a uint32 version, uint64
tensor and key-value counts, then the key-value pairs: a string key (uint64 length, UTF-8 bytes), a
uint32 value type and the value; an array is a uint32 item type, a uint64 count and the items. gguf's
own ``GGUFReader`` also maps every string of the vocabulary (seconds on a 49k-token model); this
reader walks over arrays of strings and keeps the other values. Every length is checked against the
bytes left in the file before it is used, so the file's size bounds what a reader allocates.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from ..errors import KvcError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
STRINGS_SKIPPED = None  # the value kept for an array of strings


class _Cursor:
    """Reads values of one byte order from a buffer, never past its end."""

    def __init__(self, buffer, order: str):
        self.buffer, self.order, self.offset = buffer, order, 0

    def take(self, size: int) -> int:
        """The offset of the next ``size`` bytes, which must lie in the buffer; moves past them."""
        start = self.offset
        if size < 0 or size > len(self.buffer) - start:
            raise ValueError(f"the file ends inside a value at byte {start}")
        self.offset = start + size
        return start

    def scalar(self, code: str):
        fmt = self.order + code
        return struct.unpack_from(fmt, self.buffer, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        size = self.scalar("Q")
        return bytes(self.buffer[self.take(size):self.offset]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in SCALARS:
            return self.scalar(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item, count = self.scalar("I"), self.scalar("Q")
        if item == STRING:
            for _ in range(count):
                self.take(self.scalar("Q"))
            return STRINGS_SKIPPED
        if item not in SCALARS:
            raise ValueError(f"unknown or nested array item type {item}")
        if count > len(self.buffer):
            raise ValueError(f"an array of {count} items is longer than the file")
        fmt = f"{self.order}{count}{SCALARS[item]}"
        return list(struct.unpack_from(fmt, self.buffer, self.take(struct.calcsize(fmt))))


def read_gguf_metadata(path: str | Path) -> dict:
    """{key: value} of a GGUF file's metadata: numbers, booleans, strings, lists of numbers; arrays of
    strings (the vocabulary, merges) as None. A file that is not GGUF, or is cut or inconsistent, is a
    one-line KvcError."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _parse(memoryview(buffer))
    except (OSError, ValueError, struct.error) as err:  # mmap of an empty file raises ValueError
        raise KvcError(f"{path}: not a readable GGUF file ({err})") from None


def _parse(buffer: memoryview) -> dict:
    try:
        if bytes(buffer[:4]) != MAGIC:
            raise ValueError("no GGUF magic")
        order = "<" if struct.unpack_from("<I", buffer, 4)[0] in VERSIONS else ">"
        cursor = _Cursor(buffer, order)
        cursor.take(4)
        version = cursor.scalar("I")
        if version not in VERSIONS:
            raise ValueError(f"GGUF version {version}; kvc reads versions 2 and 3")
        cursor.scalar("Q")  # tensor count: the tensors are not read
        count = cursor.scalar("Q")
        metadata = {}
        for _ in range(count):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("I"))
        return metadata
    finally:
        buffer.release()
