"""Property-based fuzzing of every kvc command against the exit-code and output contract.

Seeds: small synthetic captures (kvc.model.synth), a tiny real capture of the default model
(tests/data/smollm2_tiny.safetensors), compressed files, ``kvc compress --json`` results, policies
and a baseline made from them. Each example mutates a seed (metadata values of every wrong type,
missing and extra keys and tensors, shapes off by one, dtypes, NaN, truncation, byte flips, huge
sizes) or draws a command line, runs the CLI in-process and checks ``assert_contract``. What is
checked and how to run the long profile: docs/reliability.md.

Profiles: ``KVC_FUZZ=ci`` (default; few examples, derandomized, so CI is reproducible) and
``KVC_FUZZ=long`` (``KVC_FUZZ_SCALE`` times as many, random; scripts/fuzz_long.py runs it). With
``KVC_FUZZ_LOG=FILE`` every case appends one JSON line (test, argv, exit code, first stderr line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import io
import json
import math
import os
import pkgutil
import re
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
import typing
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from hypothesis import HealthCheck, assume, given, note, settings, strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from markdown_it import MarkdownIt
from safetensors import safe_open

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import kvc
import kvc.cli.commands
import kvc.model.load
from kvc.cli.app import app, main
from kvc.io.safetensors import save_safetensors
from kvc.model.synth import SpikedSpec, synthesize

ROOT = Path(__file__).resolve().parents[1]
REAL_CAPTURE = ROOT / "tests" / "data" / "smollm2_tiny.safetensors"

# ----------------------------------------------------------------------------- profiles

PROFILE = os.environ.get("KVC_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise pytest.UsageError(f"KVC_FUZZ must be ci or long, not {PROFILE!r}")
SCALE = int(os.environ.get("KVC_FUZZ_SCALE", "40")) if PROFILE == "long" else 1
KEEP_GOING = os.environ.get("KVC_FUZZ_KEEP_GOING") == "1"
TIMEOUT_S = 60  # per example; a hang is a failure, not a stuck CI job
_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=list(HealthCheck))
settings.register_profile("kvc-fuzz-ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("kvc-fuzz-long", derandomize=False, **_COMMON,
                          database=DirectoryBasedExampleDatabase(str(ROOT / ".hypothesis" / "kvc-fuzz")))


def fuzz(examples: int):
    """Settings of a fuzz test: ``examples`` cases in the CI profile, SCALE times as many in the long one."""
    return settings(settings.get_profile(f"kvc-fuzz-{PROFILE}"), max_examples=examples * SCALE)


# ----------------------------------------------------------------------------- guards


class Escaped(BaseException):
    """A guard tripped inside kvc (model load, network, time limit). A BaseException, so kvc's own
    ``except Exception`` cannot turn it into an exit code; the harness turns it into a failure."""


@contextlib.contextmanager
def _patched(obj, name: str, value):
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def _rlimit(kind: int, soft: int):
    old = resource.getrlimit(kind)
    hard = old[1]
    resource.setrlimit(kind, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(kind, old)


def _vm_bytes() -> int | None:
    """The process's address space in bytes (Linux; None elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        return int(re.search(r"^VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024
    return None


@contextlib.contextmanager
def guarded(seconds: float = TIMEOUT_S):
    """No model load (a failure), no network (offline: connections fail with OSError, as on a
    machine without one), at most 4 GiB more address space, files of at most 64 MiB (an oversized
    write is EFBIG, not a full disk), and a time limit."""

    def forbid(*args, **kwargs):
        raise Escaped(f"model load attempted ({', '.join(map(repr, args[:2]))})")

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "no network in the fuzz suite")

    def on_alarm(signum, frame):
        raise Escaped(f"still running after {seconds} s")

    load_model = kvc.model.load.load_model
    holders = [m for m in list(sys.modules.values())
               if getattr(m, "__name__", "").startswith("kvc") and getattr(m, "load_model", None) is load_model]
    with contextlib.ExitStack() as stack:
        for module in holders:
            stack.enter_context(_patched(module, "load_model", forbid))
        stack.enter_context(_patched(socket.socket, "connect", offline))
        stack.enter_context(_patched(socket, "getaddrinfo", offline))
        if _vm_bytes() is not None:
            stack.enter_context(_rlimit(resource.RLIMIT_AS, _vm_bytes() + (4 << 30)))
        stack.enter_context(_rlimit(resource.RLIMIT_FSIZE, 64 << 20))
        old_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        stack.callback(signal.signal, signal.SIGXFSZ, old_xfsz)
        old_alarm = signal.signal(signal.SIGALRM, on_alarm)
        stack.callback(signal.signal, signal.SIGALRM, old_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        stack.callback(signal.setitimer, signal.ITIMER_REAL, 0)
        yield


@contextlib.contextmanager
def interrupt_after(calls: int | None):
    """Raise KeyboardInterrupt (Ctrl-C) at the ``calls``-th call of a kvc function outside the entry
    point (kvc/cli/app.py, where ``main`` sets up its handlers); yields a list that holds True once it fired."""
    fired: list[bool] = []
    if calls is None:
        yield fired
        return
    count = 0
    kvc_dir, entry = str(Path(kvc.__file__).parent), main.__code__.co_filename

    def profile(frame, event, arg):
        nonlocal count
        name = frame.f_code.co_filename
        if event == "call" and name.startswith(kvc_dir) and name != entry:
            count += 1
            if count == calls:
                sys.setprofile(None)
                fired.append(True)
                raise KeyboardInterrupt

    sys.setprofile(profile)
    try:
        yield fired
    finally:
        sys.setprofile(None)


# ----------------------------------------------------------------------------- running kvc


@dataclasses.dataclass
class Outcome:
    argv: list[str]
    code: int
    out: str
    err: str
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run_kvc(argv: list[str], cwd: Path, interrupt: int | None = None) -> Outcome:
    """``kvc argv`` in-process in ``cwd``, under the guards. A tripped guard, or anything escaping
    ``main`` (a Ctrl-C, or an internal error under --debug), is a test failure."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), guarded(), \
                interrupt_after(interrupt) as fired:
            code = main(list(argv))
    except (Escaped, KeyboardInterrupt, Exception) as error:
        what = str(error) if isinstance(error, Escaped) else f"{type(error).__name__} escaped kvc's main ({error})"
        _log({"argv": argv, "code": None, "stderr": what[:500]})
        raise AssertionError(f"{what}: kvc {' '.join(map(repr, argv))}; stderr: {err.getvalue()[-2000:]!r}") from None
    finally:
        os.chdir(old)
    outcome = Outcome(list(argv), code, out.getvalue(), err.getvalue(), bool(fired), time.perf_counter() - start)
    _log({"argv": argv, "code": code, "seconds": round(outcome.seconds, 3),
          "stderr": outcome.err_lines[0][:500] if outcome.err_lines else ""})
    return outcome


def _log(entry: dict) -> None:
    """One JSON line in KVC_FUZZ_LOG, with the test it came from."""
    path = os.environ.get("KVC_FUZZ_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""), **entry}) + "\n")


# Options whose value is a path kvc writes, with what it writes there ("dir": a folder of files
# whose suffix says their kind), and outputs written by default.
OUTPUT_OPTIONS = {
    "synth": {"--out": "safetensors", "-o": "safetensors"},
    "capture": {"--out": "safetensors", "-o": "safetensors"},
    "compress": {"--out": "safetensors", "-o": "safetensors", "--json": "json"},
    "decompress": {"--out": "safetensors", "-o": "safetensors"},
    "analyze": {"--json": "json", "--plots": "dir"},
    "sweep": {"--out-dir": "dir", "-o": "dir"},
    "eval": {"--json": "json", "--plots": "dir"},
    "budget": {"--json": "json"},
    "bench": {"--json": "json"},
    "check": {"--junit": "xml", "--markdown": "text", "--json": "json"},
}
DEFAULT_OUTPUTS = {"synth": "synth.safetensors", "capture": "capture.safetensors",
                   "decompress": "decompressed.safetensors", "sweep": "sweep"}
TMP_NAME = re.compile(r"^\..*\.tmp$")


def declared_outputs(argv: list[str]) -> tuple[dict[str, str], set[int]]:
    """({output path: its kind}, indices of the tokens that are output values): every value
    of an output option in any spelling (``--json F``, ``--json=F``, ``-oF``), plus the command's
    default output when none is given."""
    command = next((a for a in argv if a != "--debug"), "")
    options = OUTPUT_OPTIONS.get(command, {})
    outputs: dict[str, str] = {}
    indices: set[int] = set()
    for i, token in enumerate(argv):
        for option, kind in options.items():
            if token == option and i + 1 < len(argv):
                value = argv[i + 1]
                indices.add(i + 1)
            elif option.startswith("--") and token.startswith(option + "="):
                value = token[len(option) + 1:]
            elif len(option) == 2 and token.startswith(option) and not token.startswith("--") and len(token) > 2:
                value = token[2:]
            else:
                continue
            outputs[os.path.normpath(value) if value else "."] = kind
    default = DEFAULT_OUTPUTS.get(command)
    if default and not any(o in ("--out", "-o", "--out-dir") for o in options if o in argv):
        outputs[default] = options["--out" if "--out" in options else "--out-dir"]
    return outputs, indices


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under ``root``."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                files[os.path.relpath(path, root)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _output_kind(path: str, outputs: dict[str, str]) -> str | None:
    """What ``path`` should hold if it is a declared output (or in a declared folder), else None."""
    if path in outputs and outputs[path] != "dir":
        return outputs[path]
    if any(kind == "dir" and (o == "." or path.startswith(o + "/")) for o, kind in outputs.items()):
        return Path(path).suffix.lower().lstrip(".")
    return None


def assert_contract(outcome: Outcome, before: dict[str, str], after: dict[str, str], cwd: Path) -> None:
    """The contract of docs/reliability.md for one run of kvc."""
    argv, code = outcome.argv, outcome.code
    command = next((a for a in argv if a != "--debug"), "")
    where = f"kvc {' '.join(map(repr, argv))} -> exit {code}; stderr: {outcome.err[-3000:]!r}"
    if "--debug" not in argv:
        assert "Traceback" not in outcome.out + outcome.err, f"traceback without --debug: {where}"
    if outcome.interrupted and code != 0:
        assert code == 130, f"Ctrl-C must exit 130: {where}"
        assert len(outcome.err_lines) == 1 and "abort" in outcome.err_lines[0], \
            f"Ctrl-C must print one 'aborted' line on stderr: {where}"
    else:
        allowed = (0, 1, 2) if command == "check" else (0, 2)
        assert code in allowed, f"exit code outside {allowed}: {where}"
        if code != 0 and "--debug" not in argv:
            assert len(outcome.err_lines) == 1, f"exit {code} must print exactly one line on stderr: {where}"
    outputs, indices = declared_outputs(argv)
    inputs = {os.path.normpath(a) for i, a in enumerate(argv) if i not in indices and a and os.path.normpath(a) in before}
    writable = {o: kind for o, kind in outputs.items() if o not in inputs}
    wrote = code in (0, 1) or outcome.interrupted
    for path, digest in before.items():
        assert path in after, f"{path} was deleted: {where}"
        if after[path] != digest:
            assert path not in inputs, f"input {path} was modified: {where}"
            assert _output_kind(path, writable) and "--force" in argv and wrote, \
                f"{path} was replaced, but is not a declared output written with --force: {where}"
    new = sorted(set(after) - set(before))
    leftovers = [p for p in new if TMP_NAME.match(Path(p).name)]
    assert not leftovers, f"temporary files left behind {leftovers}: {where}"
    stray = [p for p in new if not (_output_kind(p, writable) and wrote)]
    assert not stray, f"files created that are not declared outputs of a successful run {stray}: {where}"
    for path in new + [p for p in before if after[p] != before[p]]:
        assert_complete(cwd / path, _output_kind(path, writable), where)
    json_on_stdout = any(a == "--json" and b == "-" for a, b in zip(argv, argv[1:])) or \
        (command in ("info", "methods") and "--json" in argv)
    if code == 0 and json_on_stdout and "--help" not in argv:
        try:
            json.loads(outcome.out, parse_constant=_no_nan)
        except ValueError as error:
            raise AssertionError(f"stdout is not JSON ({error}): {where}") from None


def _no_nan(token: str):
    raise ValueError(f"non-standard JSON constant {token}")


def assert_complete(path: Path, kind: str, where: str) -> None:
    """An output kvc wrote is whole and valid for its kind (JSON without NaN, safetensors, XML, PNG)."""
    try:
        if kind == "json":
            json.loads(path.read_text(), parse_constant=_no_nan)
        elif kind == "safetensors":
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        elif kind == "xml":
            ET.fromstring(path.read_bytes())
        elif kind == "png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    except Exception as error:  # any reader error means a broken output
        raise AssertionError(f"output {path.name} is not a valid {kind} file ({error}): {where}") from None


def run_case(argv: list[str], cwd: Path, interrupt: int | None = None, then=None) -> None:
    """Snapshot ``cwd``, run kvc, check the contract and ``then(outcome)``. With KVC_FUZZ_KEEP_GOING=1
    a violation is logged (KVC_FUZZ_LOG) instead of failing, so a long run surveys every failure class."""
    note(f"argv: {argv}")
    before = snapshot(cwd)
    try:
        outcome = run_kvc(argv, cwd, interrupt)
        assert_contract(outcome, before, snapshot(cwd), cwd)
        if then is not None:
            then(outcome)
    except AssertionError as violation:
        if not KEEP_GOING:
            raise
        _log({"argv": argv, "violation": str(violation).split("\n")[0][:1000]})


# ----------------------------------------------------------------------------- safetensors files

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclasses.dataclass
class Container:
    """A safetensors file taken apart: metadata and name -> (dtype, shape, raw bytes)."""

    metadata: dict | None
    tensors: dict[str, tuple[str, list[int], bytes]]

    @classmethod
    def parse(cls, blob: bytes) -> "Container":
        size = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + size])
        data = blob[8 + size:]
        metadata = header.pop("__metadata__", None)
        tensors = {name: (info["dtype"], list(info["shape"]), data[info["data_offsets"][0]:info["data_offsets"][1]])
                   for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])}
        return cls(metadata, tensors)

    def serialize(self) -> bytes:
        header: dict[str, Any] = {} if self.metadata is None else {"__metadata__": self.metadata}
        offset, chunks = 0, []
        for name, (dtype, shape, raw) in self.tensors.items():
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
            offset += len(raw)
            chunks.append(raw)
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        return len(blob).to_bytes(8, "little") + blob + b"".join(chunks)


def _tensor(dtype: str, shape: list[int], raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=TORCH_DTYPES[dtype]).reshape(shape) if raw else \
        torch.empty(shape, dtype=TORCH_DTYPES[dtype])


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _resized(dtype: str, new: list[int], raw: bytes) -> bytes:
    """Data for shape ``new``: the old bytes cut or padded with repeats of themselves (at most 16 MiB:
    a shape made huge by an earlier op is left alone)."""
    need = math.prod(new) * ITEMSIZE[dtype]
    if need > 16 << 20:
        raise ValueError(f"{need} bytes")
    if not raw:
        return bytes(need)
    return (raw * (need // len(raw) + 1))[:need]


def apply_ops(blob: bytes, ops: list[tuple]) -> bytes:
    """Apply mutation ops (see ``safetensors_ops``) to a safetensors file's bytes. Structural ops
    come first; one that no longer applies (its key or tensor is gone, or an earlier op made it
    meaningless) does nothing."""
    container = Container.parse(blob)
    for op, *args in ops:
        if op in BYTE_OPS:
            blob = BYTE_OPS[op](container.serialize() if container is not None else blob, *args)
            container = None
            continue
        if container.metadata is None and op == "meta_set":
            container.metadata = {}
        present = container.tensors if op.startswith("tensor") or op == "header_shape" else container.metadata or {}
        if op == "meta_none" or op == "meta_set" or args[0] in present:
            with contextlib.suppress(RuntimeError, ValueError, TypeError, LookupError, ArithmeticError):
                STRUCT_OPS[op](container, *args)
    return container.serialize() if container is not None else blob


def _meta_json(c: Container, key: str, path: list, action: str, value: Any) -> None:
    c.metadata[key] = json.dumps(mutate_json(json.loads(c.metadata[key]), path, action, value))


def _tensor_dim(c: Container, name: str, axis: int, delta: int) -> None:
    dtype, shape, raw = c.tensors[name]
    new = list(shape)
    new[axis % len(shape)] = max(0, new[axis % len(shape)] + delta)
    c.tensors[name] = (dtype, new, _resized(dtype, new, raw))


def _tensor_rank(c: Container, name: str, add: bool) -> None:
    dtype, shape, raw = c.tensors[name]
    c.tensors[name] = (dtype, shape + [1] if add else [math.prod(shape)], raw)


def _tensor_dtype(c: Container, name: str, dtype: str) -> None:
    old, shape, raw = c.tensors[name]
    c.tensors[name] = (dtype, shape, _raw(_tensor(old, shape, raw).to(TORCH_DTYPES[dtype])))


def _tensor_fill(c: Container, name: str, value: float) -> None:
    dtype, shape, raw = c.tensors[name]
    t = _tensor(dtype, shape, raw).clone()
    if t.numel():
        if t.is_floating_point() or t.dtype == torch.bool:
            fill = value
        else:  # the integer nearest to value in the tensor's range; NaN -> the largest
            info = torch.iinfo(t.dtype)
            fill = int(min(max(value, info.min), info.max)) if math.isfinite(value) else info.max
        t.view(-1)[:: max(1, t.numel() // 7)] = fill
    c.tensors[name] = (dtype, shape, _raw(t))


def _header_shape(c: Container, name: str, shape: list[int]) -> None:
    dtype, _, raw = c.tensors[name]
    c.tensors[name] = (dtype, shape, raw)  # inconsistent with the data on purpose


STRUCT_OPS = {
    "meta_set": lambda c, key, value: c.metadata.__setitem__(key, DEEP if value == DEEP_TOKEN else value),
    "meta_del": lambda c, key: c.metadata.pop(key, None),
    "meta_json": _meta_json,
    "meta_none": lambda c: setattr(c, "metadata", None),
    "tensor_del": lambda c, name: c.tensors.pop(name, None),
    "tensor_copy": lambda c, name, new: c.tensors.__setitem__(new, c.tensors[name]),
    "tensor_dim": _tensor_dim,
    "tensor_rank": _tensor_rank,
    "tensor_dtype": _tensor_dtype,
    "tensor_fill": _tensor_fill,
    "header_shape": _header_shape,
}
BYTE_OPS = {
    "truncate": lambda blob, permille: blob[:len(blob) * permille // 1000],
    "flip": lambda blob, permille, xor: _flip(blob, permille, xor),
    "header_len": lambda blob, value: value.to_bytes(8, "little") + blob[8:],
    "append": lambda blob, extra: blob + extra,
    "empty": lambda blob: b"",
}


def _flip(blob: bytes, permille: int, xor: int) -> bytes:
    """XOR one byte of the JSON header (position: permille of the header)."""
    size = min(int.from_bytes(blob[:8], "little"), len(blob) - 8)
    pos = 8 + size * permille // 1000
    return blob[:pos] + bytes([blob[pos] ^ xor]) + blob[pos + 1:] if pos < len(blob) else blob


# ----------------------------------------------------------------------------- JSON values and mutations

MARKUP = ("[bold]x[/bold]", "[/x]", "[link=http://example.invalid]x[/link]")
INJECTIONS = ("<img src=x onerror=alert(1)> @everyone [click](http://evil.invalid)",
              "a|b</td><script>x</script>", "]]><x/>\x00\x1b[31m", "<!-- x", *MARKUP)
HOSTILE_STRINGS = ("", " ", "banana", "four", "../../x", "\u202e", "x" * 500, *INJECTIONS)
HOSTILE_VALUES = (None, True, False, 0, -1, 1, 2, 2 ** 31, 2 ** 63, 10 ** 30, 0.5, -0.0, math.nan, math.inf,
                  -math.inf, [], [0], [1, 2, 3], ["a"], {}, {"a": 1}, [[[[[]]]]], *HOSTILE_STRINGS)
DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested deeper than any parser's recursion limit
DEEP_TOKEN = "<DEEP>"  # stands for DEEP in a drawn op, so that failing examples print short
# Raw metadata strings that are not (the JSON of) a value: syntax errors, NaN, deep nesting.
RAW_TEXTS = ("", "{", "[1,", "nan", "NaN", "-Infinity", "1e999", "not json", "01", '"x', "null", DEEP_TOKEN)

hostile = st.one_of(st.sampled_from(HOSTILE_VALUES), st.integers(-2 ** 70, 2 ** 70), st.floats(),
                    st.text(max_size=12), st.lists(st.integers(-3, 70), max_size=4))


def near(value: Any) -> st.SearchStrategy:
    """Values next to ``value``: off by one, negated, zero, a thousand times, huge; shorter/longer lists."""
    if isinstance(value, bool):
        return st.just(not value)
    if isinstance(value, (int, float)):
        return st.sampled_from([value + 1, value - 1, -value, 0, value * 1000, 2 ** 31 + value, value + 0.5])
    if isinstance(value, list):
        return st.sampled_from([value[:-1], value + value[-1:], value[::-1], value * 2] if value else [[0]])
    if isinstance(value, str):
        return st.sampled_from([value[:-1], value + "x", value.upper(), value * 2])
    return hostile


def mutate_json(obj: Any, path: list, action: str, value: Any) -> Any:
    """``obj`` with the node at ``path`` set to ``value``, deleted, or given a new child."""
    if not path:
        if action == "set":
            return value
        if action == "del":
            return None
        if isinstance(obj, dict):
            return {**obj, "zz_extra": value}
        return obj + [value] if isinstance(obj, list) else value
    head, rest = path[0], path[1:]
    if action == "del" and not rest:
        if isinstance(obj, dict):
            return {k: v for k, v in obj.items() if k != head}
        return obj[:head] + obj[head + 1:]
    copy = dict(obj) if isinstance(obj, dict) else list(obj)
    copy[head] = mutate_json(obj[head], rest, action, value)
    return copy


@st.composite
def json_mutation(draw, obj: Any) -> tuple[list, str, Any]:
    """(path, action, value) for ``mutate_json``: a node of ``obj`` and what happens to it."""
    path, node = [], obj
    while isinstance(node, (dict, list)) and node and draw(st.integers(0, 9)) < 7:
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        path.append(key)
        node = node[key]
    action = draw(st.sampled_from(["set", "set", "del", "add"] if path else ["set", "add"]))
    value = draw(st.one_of(near(node), hostile)) if action != "del" else None
    return path, action, value


@st.composite
def safetensors_ops(draw, container: Container, json_keys: set[str]) -> list[tuple]:
    """One to three mutations of a kvc safetensors file: structure first, then raw bytes."""
    ops: list[tuple] = []
    names = sorted(container.tensors)
    meta_keys = sorted(container.metadata or {})
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["meta_set", "meta_set", "meta_json", "meta_del", "meta_extra",
                                     "tensor_del", "tensor_copy", "tensor_dim", "tensor_dim", "tensor_rank",
                                     "tensor_dtype", "tensor_fill", "header_shape", "meta_none"]))
        if kind == "meta_set":
            key = draw(st.sampled_from(meta_keys))
            value = draw(st.one_of(hostile.map(lambda v: json.dumps(v)), st.sampled_from(RAW_TEXTS),
                                   st.sampled_from(HOSTILE_STRINGS), hostile.filter(lambda v: not isinstance(v, str))))
            ops.append(("meta_set", key, value))
        elif kind == "meta_json":
            key = draw(st.sampled_from(sorted(json_keys & set(meta_keys)) or meta_keys))
            try:
                parsed = json.loads(container.metadata[key])
            except ValueError:
                continue
            ops.append(("meta_json", key, *draw(json_mutation(parsed))))
        elif kind == "meta_del":
            ops.append(("meta_del", draw(st.sampled_from(meta_keys))))
        elif kind == "meta_extra":
            key = draw(st.sampled_from(["zz_extra", "layers.7.meta", "layers.0.bits_paper", "truth", "weights"]))
            ops.append(("meta_set", key, draw(st.sampled_from(RAW_TEXTS + HOSTILE_STRINGS))))
        elif kind == "meta_none":
            ops.append(("meta_none",))
        elif kind == "tensor_copy":
            name = draw(st.sampled_from(names))
            new = draw(st.sampled_from(["layers.7.k", "layers.7.v", "layers.0.zz", "layers.-1.k", "zz",
                                        re.sub(r"\d+", "9", name), name.replace(".k", ".v")]))
            ops.append(("tensor_copy", name, new))
        elif kind == "tensor_dim":
            name = draw(st.sampled_from(names))
            axis = draw(st.integers(0, max(0, len(container.tensors[name][1]) - 1)))
            ops.append(("tensor_dim", name, axis, draw(st.sampled_from([-1, 1, 2, -100]))))
        elif kind == "tensor_rank":
            ops.append(("tensor_rank", draw(st.sampled_from(names)), draw(st.booleans())))
        elif kind == "tensor_dtype":
            name = draw(st.sampled_from(names))
            ops.append(("tensor_dtype", name, draw(st.sampled_from(sorted(TORCH_DTYPES)))))
        elif kind == "tensor_fill":
            ops.append(("tensor_fill", draw(st.sampled_from(names)),
                        draw(st.sampled_from([math.nan, math.inf, -math.inf, 3e38, -1.0, 1e9]))))
        elif kind == "header_shape":
            name = draw(st.sampled_from(names))
            shape = list(container.tensors[name][1])
            ops.append(("header_shape", name, draw(st.sampled_from(
                [[2 ** 31] + shape[1:], [2 ** 62] * len(shape), shape[::-1], [0] * len(shape), []]))))
        else:
            ops.append((kind, draw(st.sampled_from(names))))
    if draw(st.integers(0, 4)) == 4:  # one in five: raw bytes too (shrinks towards none)
        byte_op = draw(st.sampled_from(["truncate", "truncate", "flip", "header_len", "append", "empty"]))
        if byte_op == "truncate":
            ops.append(("truncate", draw(st.integers(0, 999))))
        elif byte_op == "flip":
            ops.append(("flip", draw(st.integers(0, 999)), draw(st.sampled_from([1, 2, 0x20, 0x80, 0xFF]))))
        elif byte_op == "header_len":
            ops.append(("header_len", draw(st.sampled_from([0, 1, 7, 2 ** 31, 2 ** 63, 2 ** 64 - 1]))))
        elif byte_op == "append":
            ops.append(("append", draw(st.sampled_from([b"\x00", b"garbage!", bytes(4096)]))))
        else:
            ops.append(("empty",))
    return ops


# ----------------------------------------------------------------------------- text files (TOML, JSON)


def toml_dumps(data: dict) -> str:
    """A TOML document of ``data`` (tables, arrays, scalars; None values are left out)."""

    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, dict):
            return "{" + ", ".join(f"{key(k)} = {scalar(x)}" for k, x in v.items() if x is not None) + "}"
        return "[" + ", ".join(scalar(x) for x in v if x is not None) + "]"

    lines: list[str] = []

    def table(node: dict, prefix: list[str]) -> None:
        if prefix:
            lines.append(f"[{'.'.join(map(key, prefix))}]")
        for k, v in node.items():
            if v is not None and not isinstance(v, dict):
                lines.append(f"{key(k)} = {scalar(v)}")
        for k, v in node.items():
            if isinstance(v, dict):
                table(v, prefix + [k])

    table(data, [])
    return "\n".join(lines) + "\n"


@st.composite
def text_ops(draw, text: str, parse) -> list[tuple]:
    """Mutations of a JSON or TOML document: one or two structural ones (a node of the parsed
    document set, deleted or given a child), or one of its bytes: truncated, a byte flipped, not
    UTF-8, a byte-order mark, empty, deeply nested."""
    if draw(st.integers(0, 4)) < 4:
        obj, ops = parse(text), []
        for _ in range(draw(st.integers(1, 2))):
            op = ("json", *draw(json_mutation(obj)))
            with contextlib.suppress(LookupError, TypeError):
                obj = mutate_json(obj, *op[1:])
                ops.append(op)
        return ops
    raw = draw(st.sampled_from(["truncate", "flip", "latin1", "bom", "empty", "deep"]))
    if raw == "truncate":
        return [("truncate", draw(st.integers(0, 999)))]
    if raw == "flip":
        return [("flip", draw(st.integers(0, 999)), draw(st.sampled_from([1, 0x20, 0x80])))]
    return [(raw,)]


def apply_text_ops(text: str, ops: list[tuple], parse, dump, key: bytes = b"") -> bytes:
    """The bytes of ``text`` after ``text_ops``; ``key`` prefixes a deeply nested value (TOML's
    ``x = ``)."""
    if ops and ops[0][0] == "json":
        obj = parse(text)
        for _, *args in ops:
            obj = mutate_json(obj, *args)
        try:
            return dump(obj).encode()
        except (TypeError, ValueError, AttributeError):  # not representable (a scalar document in TOML)
            return dump({"x": 1}).encode()
    blob = text.encode()
    op, *args = ops[0]
    if op == "truncate":
        return blob[:len(blob) * args[0] // 1000]
    if op == "flip":
        pos = len(blob) * args[0] // 1000
        return blob[:pos] + bytes([blob[pos] ^ args[1]]) + blob[pos + 1:]
    return {"latin1": b"\xff\xfe" + blob, "bom": "\ufeff".encode() + blob, "empty": b"",
            "deep": key + DEEP.encode()}[op]


HUB_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")  # what kvc would look up on the hub


def _names_hub_model(blob: bytes, cwd: Path) -> bool:
    """Whether a (mutated) policy names a model that could be a hub id: kvc would rightly go to the
    network for it, so the example is skipped."""
    try:
        policy = tomllib.loads(blob.decode())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    models = [t.get("model") for t in (policy.get("run"), policy.get("budget")) if isinstance(t, dict)]
    return any(isinstance(m, str) and HUB_ID.match(m) and not os.path.exists(cwd / m) for m in models)


def assert_markdown_safe(path: Path, where: str) -> None:
    """The rendered Markdown report holds only the elements kvc's template makes: no HTML, links or
    images from the data."""
    html = MarkdownIt("commonmark", {"html": True}).enable("table").render(path.read_text())
    tags = set(re.findall(r"<\s*([A-Za-z][A-Za-z0-9]*)", html))
    extra = tags - {"h3", "p", "table", "thead", "tbody", "tr", "th", "td", "strong", "em", "code", "ul", "li"}
    assert not extra, f"{path.name} renders elements {sorted(extra)} from the data: {where}"


def squash(text: str) -> str:
    """``text`` without whitespace and table borders, to find a value that a table wrapped."""
    return re.sub(r"[\s│┃|]", "", text)


# ----------------------------------------------------------------------------- seeds

FIXED_CREATED = "2025-01-01T00:00:00+00:00"
CAPTURES = ("synth", "norope", "real")
CAPTURE_JSON_KEYS = {"num_layers", "num_heads", "num_kv_heads", "head_dim", "rope", "layer_types", "seq_len",
                     "num_seqs", "sliding_window", "attention", "special_tokens", "query_positions", "truth"}
KVCZ_JSON_KEYS = {"params", "layers", "evicts", "source", "bits_per_entry"}
# Methods of the seed compressed files: a rotation quantizer, a grouped one with an fp16 window,
# an eviction + quantizer combination (keep masks), and the low-rank method.
KVCZ_METHODS = {
    "turboquant": ["-m", "turboquant", "--bits", "2"],
    "kivi": ["-m", "kivi", "--group-size", "8", "--residual", "4"],
    "snapkv": ["-m", "snapkv+int", "--budget", "0.5", "--window", "4"],
    "eoptshrinkq": ["-m", "eoptshrinkq", "--block", "8", "--keys", "post"],
}
LIMITS_POLICY = {"limits": {"bits_per_entry": 10.0, "attn_out_rel": 2.0, "ip_bias_rel": 0.5,
                            "k": {"mse_rel": 1.0}},
                 "baseline": {"tolerance": 0.05, "abs_tolerance": 1e-4, "tolerances": {"mse_rel": 0.1}}}
BUDGET_POLICY = {"limits": {"bits_per_entry": 4.0},
                 "budget": {"context": "32k", "max_gb": 1.0, "batch": 2, "model": "config.json"},
                 "memory": {"tolerance": 0.05}}
CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "hidden_size": 64, "head_dim": 16, "max_position_embeddings": 4096}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    """A folder of valid inputs: captures, compressed files, results, a baseline, policies."""
    root = tmp_path_factory.mktemp("fuzz-seeds")
    specs = {"synth": (SpikedSpec(num_layers=2, num_kv_heads=2, num_heads=4, head_dim=16, seq_len=24, num_seqs=2,
                                  strengths=[4.0], outlier_channels=[3]), torch.float32),
             "norope": (SpikedSpec(num_layers=2, num_kv_heads=1, num_heads=2, head_dim=8, seq_len=16, num_seqs=1,
                                   strengths=[3.0], rope=False), torch.float16)}
    for name, (spec, dtype) in specs.items():
        tensors, meta = synthesize(spec, dtype)
        meta.created = FIXED_CREATED
        save_safetensors(root / f"{name}.safetensors", tensors, meta.to_strings())
    shutil.copy(REAL_CAPTURE, root / "real.safetensors")
    (root / "config.json").write_text(json.dumps(CONFIG))
    (root / "text.txt").write_text((ROOT / "ci" / "text.txt").read_text())
    ci_policy = tomllib.loads((ROOT / "ci" / "policy.toml").read_text())
    ci_policy["budget"]["model"] = "config.json"  # geometry from a local config, not the default model
    for name, policy in (("limits", LIMITS_POLICY), ("budget", BUDGET_POLICY), ("ci", ci_policy)):
        text = toml_dumps(policy)
        assert tomllib.loads(text) == policy
        (root / f"{name}.toml").write_text(text)

    def make(*argv):
        outcome = run_kvc(list(argv), root)
        assert outcome.code == 0, f"seed {argv}: exit {outcome.code}: {outcome.err}"

    for capture in CAPTURES:
        for method, args in KVCZ_METHODS.items():
            if capture == "norope" and method != "turboquant":
                continue
            make("compress", f"{capture}.safetensors", *args, "--device", "cpu", "-o", f"{capture}.{method}.kvcz")
    make("compress", "synth.safetensors", *KVCZ_METHODS["turboquant"], "--device", "cpu", "--json", "r.json")
    make("compress", "synth.safetensors", *KVCZ_METHODS["kivi"], "--device", "cpu", "--json", "r2.json")
    make("check", "r.json", "r2.json", "--policy", "limits.toml", "--json", "base.json")
    return root


@contextlib.contextmanager
def workdir(seeds: Path, files: dict[str, str]):
    """A fresh folder holding copies of seed files ({name in the folder: seed name}), removed after."""
    path = Path(tempfile.mkdtemp(dir=seeds))
    try:
        for name, seed in files.items():
            shutil.copy(seeds / seed, path / name)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- mutated captures

CAPTURE_NAMES = ("cap.safetensors", "[b]cap.safetensors", "cap with space.safetensors", "ünï.safetensors")
CAPTURE_COMMANDS = {
    "info": ["info", "{cap}"],
    "info-json": ["info", "{cap}", "--json"],
    "analyze": ["analyze", "{cap}", "--device", "cpu", "--json", "a.json"],
    "analyze-blocks": ["analyze", "{cap}", "--device", "cpu", "--block", "8", "--per-seq", "--tensors", "k,v"],
    "compress": ["compress", "{cap}", *KVCZ_METHODS["turboquant"], "--device", "cpu", "-o", "o.kvcz", "--json", "o.json"],
    "compress-kivi": ["compress", "{cap}", *KVCZ_METHODS["kivi"], "--device", "cpu", "--json", "-"],
    "compress-eviction": ["compress", "{cap}", *KVCZ_METHODS["snapkv"], "--device", "cpu"],
    "compress-eoptshrinkq": ["compress", "{cap}", *KVCZ_METHODS["eoptshrinkq"], "--device", "cpu", "--query-stride", "2"],
    "compress-layer": ["compress", "{cap}", "-m", "int", "--layers", "0", "--dtype", "float64", "--device", "cpu"],
    "decompress-queries": ["decompress", "c.kvcz", "--queries", "{cap}", "-o", "d.safetensors", "--device", "cpu"],
}


def _model_of(blob: bytes) -> str | None:
    """The 'model' metadata of a (mutated) file, None when it has none or is unreadable."""
    try:
        return (Container.parse(blob).metadata or {}).get("model")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _check_markup(outcome: Outcome, literals: list[str]) -> None:
    """Text from a file or a path is printed as it is, never interpreted as Rich markup."""
    shown = squash(outcome.out + outcome.err)
    for literal in literals:
        assert squash(literal) in shown, f"{literal!r} was not printed as is (Rich markup?): kvc {outcome.argv}"


@fuzz(200)
@given(data=st.data())
def test_mutated_capture(seeds, data):
    """A synthetic or real capture, mutated, through info, analyze, compress and decompress --queries."""
    seed = data.draw(st.sampled_from(CAPTURES), label="seed")
    container = Container.parse((seeds / f"{seed}.safetensors").read_bytes())
    ops = data.draw(safetensors_ops(container, CAPTURE_JSON_KEYS), label="ops")
    command = data.draw(st.sampled_from(sorted(CAPTURE_COMMANDS)), label="command")
    name = data.draw(st.sampled_from(CAPTURE_NAMES), label="file name")
    with workdir(seeds, {"c.kvcz": f"{seed}.turboquant.kvcz"}) as cwd:
        blob = apply_ops((seeds / f"{seed}.safetensors").read_bytes(), ops)
        (cwd / name).write_bytes(blob)
        literals = ([name] if command == "info" else []) + [m for m in MARKUP if m == _model_of(blob)]

        def shown_as_is(outcome: Outcome) -> None:
            if outcome.code == 0 and command in ("info", "analyze"):
                _check_markup(outcome, literals)

        run_case([a.replace("{cap}", name) for a in CAPTURE_COMMANDS[command]], cwd, then=shown_as_is)


# ----------------------------------------------------------------------------- mutated compressed files

KVCZ_COMMANDS = {
    "decompress": ["decompress", "x.kvcz", "-o", "d.safetensors", "--device", "cpu"],
    "decompress-queries": ["decompress", "x.kvcz", "--queries", "cap.safetensors", "-o", "d.safetensors", "--device", "cpu"],
    "info": ["info", "x.kvcz"],
    "analyze": ["analyze", "x.kvcz", "--device", "cpu"],
}


@fuzz(150)
@given(data=st.data())
def test_mutated_compressed_file(seeds, data):
    """A compressed file of four methods, mutated, through decompress, info and analyze."""
    capture = data.draw(st.sampled_from(CAPTURES), label="capture")
    methods = ["turboquant"] if capture == "norope" else sorted(KVCZ_METHODS)
    seed = f"{capture}.{data.draw(st.sampled_from(methods), label='method')}.kvcz"
    container = Container.parse((seeds / seed).read_bytes())
    ops = data.draw(safetensors_ops(container, KVCZ_JSON_KEYS | {k for k in container.metadata if k.startswith("layers.")}),
                    label="ops")
    command = data.draw(st.sampled_from(sorted(KVCZ_COMMANDS)), label="command")
    with workdir(seeds, {"cap.safetensors": f"{capture}.safetensors"}) as cwd:
        (cwd / "x.kvcz").write_bytes(apply_ops((seeds / seed).read_bytes(), ops))
        run_case(KVCZ_COMMANDS[command], cwd)


# ----------------------------------------------------------------------------- results, policies, baselines

JSON_FILES = {"r.json": "r.json", "r2.json": "r2.json", "base.json": "base.json"}
CHECK_OUTPUTS = ["--junit", "j.xml", "--markdown", "m.md", "--json", "rep.json"]


@fuzz(100)
@given(data=st.data())
def test_mutated_results_policy_baseline(seeds, data):
    """kvc check with a mutated results file, policy or baseline (and hostile result labels);
    budget --from-json with mutated results."""
    policy = data.draw(st.sampled_from(["limits", "budget", "ci"]), label="policy")
    target = data.draw(st.sampled_from(["r.json", "base.json", "policy.toml", "budget --from-json"]), label="target")
    with workdir(seeds, {**JSON_FILES, "policy.toml": f"{policy}.toml", "config.json": "config.json",
                         "text.txt": "text.txt"}) as cwd:
        file = "r.json" if target == "budget --from-json" else target
        text = (cwd / file).read_text()
        parse, dump, key = (tomllib.loads, toml_dumps, b"x = ") if file.endswith(".toml") else (json.loads, json.dumps, b"")
        ops = data.draw(text_ops(text, parse), label="ops")
        blob = apply_text_ops(text, ops, parse, dump, key)
        injection = data.draw(st.sampled_from((None,) + INJECTIONS), label="label") if file == "r.json" else None
        if injection is not None:
            with contextlib.suppress(ValueError, TypeError, RecursionError):
                blob = json.dumps({**json.loads(blob), "label": injection}).encode()
        assume(not _names_hub_model(blob, cwd))
        (cwd / file).write_bytes(blob)
        if target == "budget --from-json":
            argv = ["budget", "--from-json", "r.json", "--model", "config.json", "--json", "b.json"]
        else:
            argv = ["check", "r.json", *(["r2.json"] if data.draw(st.booleans(), label="two results") else []),
                    "--policy", "policy.toml"]
            argv += ["--baseline", "base.json"] if target == "base.json" or data.draw(st.booleans(), label="baseline") else []
            argv += CHECK_OUTPUTS + (["--force"] if data.draw(st.booleans(), label="force") else [])

        def markdown_safe(outcome: Outcome) -> None:
            if outcome.code in (0, 1) and argv[0] == "check":
                assert_markdown_safe(cwd / "m.md", f"kvc {argv}")

        run_case(argv, cwd, then=markdown_safe)


# ----------------------------------------------------------------------------- command lines

NONHUB_MODELS = ("/nonexistent/kvc-fuzz-model", "./missing-model", "", "[/x]", "config.json", "text.txt", ".")
PATHS = ("cap.safetensors", "real.safetensors", "c.kvcz", "r.json", "base.json", "policy.toml", "config.json",
         "text.txt", "missing.safetensors", ".", "sub", "cap.safetensors/x.json", "x" * 300, "new/deep/o.json",
         "[b]o.json", "-", "", "o.json", "o.kvcz", "o.safetensors", "o.md", "o.xml", "sub/o.png")
INTS = ("0", "1", "2", "3", "-1", "8", "16", "abc", "", "1.5", "99999999999999999999", "0x10", " 4", "nan")
FLOATS = ("0", "1", "2.5", "-1", "nan", "inf", "-inf", "1e309", "abc", "", "0.0001", "4")
METHOD_OPTIONS = {name: m["options"] for name, m in kvc.methods().items()}
METHOD_NAMES = tuple(METHOD_OPTIONS)
VALUES = {  # parameter name -> plausible and hostile values of a text option; numbers by their type
    "layers": ("all", "0", "1", "0,1", "1-0", "0-99", "-1", "a", "", "0,0", "29"),
    "device": ("cpu", "auto", "cuda", "cuda:7", "tpu", "", "CPU"),
    "dtype": ("float32", "float64", "bfloat16", "float16", "auto", "int8", ""),
    "method": METHOD_NAMES + ("snapkv+turboquant", "turboquant+snapkv", "nope", "", "h2o+h2o", "[/x]"),
    "methods": ("turboquant", "kivi", "h2o", "turboquant,kivi", "", "nope", "fp16"),
    "bits": ("2", "1,2", "nan,inf", "", "-1", "99", "0", "2.5", "48"),
    "keys": ("pre", "post", "pre,post", "sideways", ""),
    "compare": ("", "turboquant:kivi", "a:b", "x", "eoptshrinkq:turboquant"),
    "opt": ("bits=2", "nope=1", "bits", "=", "group_size=abc", "turboquant.bits=3", "residual=-1"),
    "context": ("1024", "4k", "0", "-1", "1k,2k", "abc", "9999999999999k", ""),
    "contexts": ("256", "4k", "0", "-5", "x", ""),
    "strengths": ("6,4,3", "", "nan,inf", "-1", "1e309", "a", "2"),
    "noise": ("white", "colored", "pink", ""),
    "outlier_channels": ("", "3", "99", "-1", "a", "1.5"),
    "query_positions": ("all", "last:2", "0,100-127", "last:0", "x", "last:-1", "5-1"),
    "sliding": ("all", "0-1", "pattern:2", "pattern:0", "x", "9"),
    "rank_rule": ("eoptshrinkq", "matlab", "x"),
    "rotation": ("hadamard", "haar", "x"),
    "depths": ("0,0.5,1", "2", "nan", "x", ""),
    "model": NONHUB_MODELS,
    "text": ("text.txt", "missing.txt", "cap.safetensors", ".", ""),
    "revision": ("main", "", "[/x]"),
    "policy_path": ("policy.toml", "r.json", "missing.toml", ".", "text.txt"),
    "baseline_path": ("base.json", "policy.toml", "missing.json", "r.json"),
    "queries": ("cap.safetensors", "c.kvcz", "missing", "real.safetensors"),
    "from_json": ("r.json", "base.json", "policy.toml", "missing.json"),
    "tensors": ("k,v", "k_pre", "q", "", "k,k", "v"),
}
SAFE_DEVICE = ("--device", "cpu")


@functools.cache
def _cli_commands() -> dict[str, tuple[Any, dict[str, Any]]]:
    """Command name -> (its parsed command with .params, the type hints of its function)."""
    functions = {}
    for info in pkgutil.iter_modules(kvc.cli.commands.__path__):
        module = importlib.import_module(f"kvc.cli.commands.{info.name}")
        functions[module.NAME] = module.command
    return {name: (command, typing.get_type_hints(functions[name]))
            for name, command in typer.main.get_command(app).commands.items()}


def _value(draw, hint: Any, name: str) -> str:
    """A value for the option of parameter ``name`` (type ``hint``); now and then one for another
    option (but a model is never one that could be a hub id: that would go to the network)."""
    kinds = set(typing.get_args(hint)) | {hint}
    if int in kinds:
        pool = INTS
    elif float in kinds:
        pool = FLOATS
    else:
        pool = VALUES.get(name, PATHS)
    other = name != "model" and draw(st.integers(0, 9)) == 9
    return draw(st.sampled_from(PATHS + INTS if other else pool))


@st.composite
def command_line(draw, commands: dict[str, Any]) -> list[str]:
    """A command line: a command (or junk), a random subset of its options with plausible and
    hostile values, positional paths, method options, and sometimes --help, --debug, --, unknown options."""
    name = draw(st.sampled_from(sorted(commands) + ["", "nope", "--help", "-x"]))
    if name not in commands:
        return [name] if name else []
    command, hints = commands[name]
    argv = [name]
    for param in command.params:
        if param.param_type_name == "argument":
            if param.required or draw(st.booleans()):
                count = param.nargs if param.nargs > 0 else draw(st.integers(1, 2))
                argv += [draw(st.sampled_from(PATHS)) for _ in range(count)]
            continue
        if not param.required and not draw(st.booleans()):
            continue
        option = draw(st.sampled_from(param.opts + param.secondary_opts))
        if param.is_flag:
            argv.append(option)
        else:
            argv += [option] if draw(st.integers(0, 14)) == 14 else [option, _value(draw, hints.get(param.name), param.name)]
    if name in ("compress", "eval"):
        method = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--method", "-m")), None)
        options = METHOD_OPTIONS.get(method, [])
        for o in draw(st.lists(st.sampled_from(options), max_size=3)) if options else []:
            kind = {"int": INTS, "float": FLOATS, "bool": ("true", "no", "2", "")}.get(o["type"], o["choices"] or ("x",))
            argv += [o["flag"], draw(st.sampled_from(tuple(kind)))]
    extra = draw(st.sampled_from([None] * 6 + ["--help", "--debug", "--", "--bogus", "-Z", "extra.json"]))
    if extra:
        argv.insert(draw(st.integers(1, len(argv))), extra)
    return argv


def make_safe(argv: list[str]) -> list[str]:
    """No model load, no network, no long run whatever was drawn: capture and eval get a
    nonexistent --model first (and no other); check gets a results file (else the policy's [run]
    would capture); budget a local geometry; sweep one method and one bit width unless drawn;
    bench the CPU when a GPU is present."""
    if not argv:
        return argv
    name, rest = argv[0], argv[1:]
    if name in ("capture", "eval"):
        model_opts = ("--model", "-m") if name == "capture" else ("--model",)
        cleaned, skip = [], False
        for token in rest:
            if skip:
                skip = False
            elif token in model_opts:
                skip = True
            elif not token.startswith(tuple(o + "=" for o in model_opts)):
                cleaned.append(token)
        return [name, "--model", NONHUB_MODELS[0], *cleaned]
    if name == "check":
        return [name, "r.json", *rest]
    if name == "budget" and not {"--model", "-m", "--layers", "--kv-heads", "--head-dim"} & set(rest):
        return [name, "--model", "config.json", *rest]
    if name == "sweep":
        for option, value in (("--methods", "turboquant"), ("--bits", "2"), ("--keys", "post")):
            if option not in rest:
                rest = [option, value, *rest]
        return [name, *rest]
    if name == "plan":  # one cheap candidate unless drawn; --memory sizes the cache of a local config
        for option, value in (("--methods", "turboquant,fp16"), ("--bits", "2"), ("--model", "config.json")):
            if option not in rest:
                rest = [option, value, *rest]
        return [name, *rest]
    if name == "bench" and torch.cuda.is_available():
        cleaned = [t for i, t in enumerate(rest) if t != "--device" and (i == 0 or rest[i - 1] != "--device")]
        return [name, *SAFE_DEVICE, *cleaned]
    return argv


@fuzz(150)
@given(data=st.data())
def test_command_lines(seeds, data):
    """Random command lines of every command (and unknown ones) in a folder of valid inputs."""
    with workdir(seeds, {"cap.safetensors": "synth.safetensors", "real.safetensors": "real.safetensors",
                         "c.kvcz": "synth.turboquant.kvcz", **JSON_FILES, "policy.toml": "ci.toml",
                         "config.json": "config.json", "text.txt": "text.txt"}) as cwd:
        (cwd / "sub").mkdir()
        argv = make_safe(data.draw(command_line(_cli_commands()), label="argv"))
        run_case(argv, cwd)


@fuzz(2)
@given(data=st.data())
def test_sweep(seeds, data):
    """sweep is slow (every method x bit width x placement, eight plots): a few mutated captures and options."""
    seed = data.draw(st.sampled_from(CAPTURES), label="seed")
    container = Container.parse((seeds / f"{seed}.safetensors").read_bytes())
    ops = data.draw(st.one_of(st.just([]), safetensors_ops(container, CAPTURE_JSON_KEYS)), label="ops")
    with workdir(seeds, {}) as cwd:
        (cwd / "cap.safetensors").write_bytes(apply_ops((seeds / f"{seed}.safetensors").read_bytes(), ops))
        argv = ["sweep", "cap.safetensors", "--methods", data.draw(st.sampled_from(["turboquant", "kivi", "h2o", "int"])),
                "--bits", data.draw(st.sampled_from(["2", "2,4", "nan"])), "--keys", "post", "--compare", "",
                "--device", "cpu", "-o", "sw"] + (["--e2e"] if data.draw(st.booleans(), label="e2e") else [])
        run_case(argv, cwd)


# ----------------------------------------------------------------------------- interrupts

INTERRUPTED = {
    "synth": ["synth", "-o", "s.safetensors", "--layers", "2", "--head-dim", "16", "--seq-len", "32"],
    "compress": ["compress", "cap.safetensors", *KVCZ_METHODS["turboquant"], "--device", "cpu", "-o", "o.kvcz",
                 "--json", "o.json"],
    "decompress": ["decompress", "c.kvcz", "--queries", "cap.safetensors", "-o", "d.safetensors", "--device", "cpu"],
    "analyze": ["analyze", "cap.safetensors", "--device", "cpu", "--json", "a.json"],
    "check": ["check", "r.json", "--policy", "limits.toml", "--baseline", "base.json", *CHECK_OUTPUTS],
}


@fuzz(40)
@given(data=st.data())
def test_interrupts(seeds, data):
    """Ctrl-C at a random point: exit 130 with one 'aborted' line, no temporary or partial file."""
    command = data.draw(st.sampled_from(sorted(INTERRUPTED)), label="command")
    calls = data.draw(st.integers(1, 4000), label="interrupt at kvc call")
    with workdir(seeds, {"cap.safetensors": "synth.safetensors", "c.kvcz": "synth.turboquant.kvcz",
                         "limits.toml": "limits.toml", **JSON_FILES}) as cwd:
        run_case(INTERRUPTED[command], cwd, interrupt=calls)
