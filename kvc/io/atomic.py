"""Atomic file output: every file kvc writes goes through here.

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
from typing import Iterable, Iterator

from ..errors import KvcError

try:
    import fcntl  # POSIX: a writer locks its temporary file
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

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
    """Write ``text`` (UTF-8) to ``path`` atomically; an existing file only with ``force``."""
    with atomic_path(path, force) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj, force: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n", force)


def emit_json(path: str | None, obj, force: bool = False, indent: int | None = 2) -> None:
    """``--json PATH``: '-' prints ``obj`` on stdout (the tables went to stderr), a path writes it
    atomically, None does nothing."""
    if path == "-":
        sys.stdout.write(json.dumps(obj, indent=indent, allow_nan=False) + "\n")
    elif path is not None:
        write_json(path, obj, force)
