"""Atomic file output and a streaming safetensors writer.

Every file kvc writes goes to a temporary file beside the target (``.NAME.XXXXXXXX.tmp``, locked
while it is written) and is renamed into place only when complete, so a crash never leaves a
half-written file under the target name; the next write of the same target removes what a killed
run left. An existing target is only replaced when the caller passes ``force``, an input never;
commands check their outputs with ``check_outputs`` before any work.
"""

from __future__ import annotations

import glob
import json
import os
import re
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from ..errors import KvcError

try:
    import fcntl  # POSIX: a writer locks its temporary file
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_STARTED = time.time()  # temporary files older than this process may be stale


def check_outputs(outputs: Iterable, force: bool = False, inputs: Iterable = ()) -> None:
    """Refuse, before any work, an output that cannot be written: a directory, an existing file
    without ``force``, one of the ``inputs`` (even with ``force``), the same file twice, a folder
    that cannot be made or written to. None and '-' (stdout) are skipped; nothing is left behind
    (``atomic_path`` makes the missing folders when it writes)."""
    sources = [Path(p) for p in inputs if p is not None]
    seen: list[Path] = []
    for output in outputs:
        if output is None or str(output) == "-":
            continue
        path = Path(output)
        try:
            if path.is_dir():
                raise KvcError(f"{path} is a directory, not a file")
            for other in sources + seen:
                if _same_file(path, other):
                    role = "an input" if other in sources else "another output"
                    raise KvcError(f"{path} is also {role} ({other}); write it to another file")
            if path.exists() and not force:
                raise KvcError(f"{path} already exists; pass --force to overwrite it")
            folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
            if not folder.is_dir():
                raise KvcError(f"cannot write {path}: {folder} is a file, not a folder")
            fd, probe = _temporary(folder / path.name)  # the folder takes new files (and folders)
            os.close(fd)
            probe.unlink()
        except OSError as err:
            raise KvcError(f"cannot write {path}: {err.strerror or err}") from err
        seen.append(path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        return False


def _temporary(path: Path) -> tuple[int, Path]:
    """A new temporary file beside ``path`` (open descriptor, path), named ``.NAME.XXXXXXXX.tmp``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    return fd, Path(tmp)


def remove_stale(path: Path) -> None:
    """Remove the temporary files that a killed kvc left for ``path``: named by ``_temporary``, older
    than this process and locked by no writer."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            status = tmp.lstat()
            if not pattern.fullmatch(tmp.name) or not stat.S_ISREG(status.st_mode) or status.st_mtime >= _STARTED:
                continue
            with open(tmp, "rb") as fh:
                if fcntl is not None:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a writer holds it
                tmp.unlink()
        except OSError:
            continue


@contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary file stays locked while the block runs; stale ones of earlier, killed runs are
    removed first (``remove_stale``)."""
    path = Path(path)
    check_outputs([path], force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        fd, tmp_path = _temporary(path)
    except OSError as err:
        raise KvcError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        tmp_path.chmod(0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        try:
            os.replace(tmp_path, path)
        except OSError as err:
            raise KvcError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        os.close(fd)
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, force: bool = False) -> None:
    with atomic_path(path, force) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj, force: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n", force)


def emit_json(path: str | None, obj, force: bool = False, indent: int | None = 2) -> None:
    """``--json PATH``: '-' prints ``obj`` on stdout (the tables went to stderr), a path writes it
    atomically, None does nothing."""
    if path == "-":
        sys.stdout.write(json.dumps(obj, indent=indent, allow_nan=False) + "\n")
    elif path is not None:
        write_json(path, obj, force)


def save_safetensors(path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], force=False):
    """Write a whole safetensors file atomically."""
    from safetensors.torch import save_file

    with atomic_path(path, force) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata))


class StreamingSafetensorsWriter:
    """Writes a safetensors file whose tensor shapes are known in advance, one slice at a time.

    The header is laid out first (safetensors format: u64 header length, JSON header, data), the
    file is sized, and each ``write(name, start, rows)`` puts rows [start, start+len) of a tensor's
    first dimension at their final offset. Use as a context manager: the file appears under its
    name only when the block exits without error.
    """

    def __init__(self, path, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str], force: bool = False):
        self.path = Path(path)
        self.force = force
        header: dict = {"__metadata__": dict(metadata)}
        self.offsets: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name in sorted(specs):
            dtype, shape = specs[name]
            nbytes = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = (offset, dtype, tuple(shape))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.header = len(blob).to_bytes(8, "little") + blob
        self.data_bytes = offset
        self._ctx = None
        self._file = None

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
        self._file.seek(len(self.header) + offset + start * row_bytes)
        self._file.write(rows.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())

    def __exit__(self, exc_type, exc, tb):
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._ctx.__exit__(exc_type, exc, tb)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def open_safetensors(path: Path):
    """(handle, metadata, tensor names) of a safetensors file; a missing, foreign or truncated file
    is a KvcError."""
    from safetensors import safe_open

    if not path.is_file():
        raise KvcError(f"{path}: no such file")
    try:
        handle = safe_open(str(path), framework="pt")
        return handle, handle.metadata() or {}, set(handle.keys())
    except Exception as err:  # safetensors raises its own error types for foreign/truncated files
        raise KvcError(f"{path} is not a readable safetensors file ({err})") from err
