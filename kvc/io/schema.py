"""Validated reading of untrusted input: bounded JSON and TOML, typed values that name their key.

Every file kvc reads (captures, compressed files, policies, baselines, JSON results) goes through
these helpers, so a wrong type, a value out of range, a nesting bomb or a size the machine cannot
hold is one ``KvcError`` naming the file and the key (exit 2), raised before anything is allocated
or computed (docs/format.md, "Validation"). Messages read ``{where}: {key} must be ..., got ...``.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
from typing import Any, Callable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..errors import KvcError

MAX_DEPTH = 64  # nesting levels of any JSON or TOML value kvc reads (kvc writes at most 6)
MAX_TEXT_BYTES = 256 * 2**20  # a JSON or TOML file kvc reads (results, reports, policies)

_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict = 3, 6, 4


def show(value: Any) -> str:
    """A short repr of a value from a file, for an error message."""
    return _SHOW.repr(value)


# ----------------------------------------------------------------------------- bounded parsing


def depth(value: Any) -> int:
    """Nesting depth of lists and dicts (a scalar is 0), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level + 1)
            if deepest > MAX_DEPTH:
                return deepest
            stack.extend((child, level + 1) for child in children)
    return deepest


def check_depth(value: Any, where: str) -> Any:
    if depth(value) > MAX_DEPTH:
        raise KvcError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def loads(text: str | bytes, where: str) -> Any:
    """Parse JSON: NaN/Infinity and nesting deeper than MAX_DEPTH are refused."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise KvcError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, int digit limit, NaN
        raise KvcError(f"{where}: not valid JSON ({err})") from None
    return check_depth(value, where)


def read_text(path: str | os.PathLike, where: str, limit: int = MAX_TEXT_BYTES) -> str:
    """A UTF-8 text file of at most ``limit`` bytes."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as err:
        raise KvcError(f"{where}: cannot read it ({err.strerror or err})") from None
    if len(data) > limit:
        raise KvcError(f"{where}: larger than {limit // 2**20} MiB; not a file kvc writes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise KvcError(f"{where}: not UTF-8 text ({err})") from None


def load_json(path: str | os.PathLike, where: str | None = None) -> Any:
    """A JSON file, bounded in size and nesting."""
    where = str(path) if where is None else where
    return loads(read_text(path, where), where)


def load_toml(path: str | os.PathLike, where: str) -> dict:
    """A TOML file, bounded in size and nesting."""
    text = read_text(path, where)
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise KvcError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except tomllib.TOMLDecodeError as err:
        raise KvcError(f"{where}: not valid TOML ({err})") from None
    return check_depth(data, where)


# ----------------------------------------------------------------------------- typed values


def _fail(where: str, key: str, what: str, value: Any) -> KvcError:
    return KvcError(f"{where}: {key} must be {what}, got {show(value)}")


def _span(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in {minimum:g}..{maximum:g}"
    if minimum is not None:
        return f" >= {minimum:g}"
    return f" <= {maximum:g}" if maximum is not None else ""


def integer(value: Any, key: str, where: str, minimum: int | None = None,
            maximum: int | None = None) -> int:
    """An int (not a bool, not a float) within [minimum, maximum]."""
    if (isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)):
        raise _fail(where, key, "an integer" + _span(minimum, maximum), value)
    return value


def number(value: Any, key: str, where: str, minimum: float | None = None, positive: bool = False) -> float:
    """A finite int or float (not a bool), >= minimum, or > 0 when ``positive``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(where, key, "a number", value)
    if positive and value <= 0:
        raise _fail(where, key, "> 0", value)
    if minimum is not None and value < minimum:
        raise _fail(where, key, f">= {minimum:g}", value)
    return float(value)


def string(value: Any, key: str, where: str, nonempty: bool = False,
           choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or (nonempty and not value):
        raise _fail(where, key, "a non-empty string" if nonempty else "a string", value)
    if choices is not None and value not in choices:
        raise _fail(where, key, f"one of {', '.join(choices)}", value)
    return value


def boolean(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, key, "true or false", value)
    return value


def mapping(value: Any, key: str, where: str, noun: str = "an object") -> dict:
    if not isinstance(value, dict):
        raise _fail(where, key, noun, value)
    return value


def array(value: Any, key: str, where: str) -> list:
    if not isinstance(value, list):
        raise _fail(where, key, "a list", value)
    return value


def optional(check: Callable[..., Any], value: Any, key: str, where: str, **bounds: Any) -> Any:
    """None, or ``check(value, key, where, **bounds)``."""
    return None if value is None else check(value, key, where, **bounds)


def require(table: dict, key: str, where: str, label: str | None = None) -> Any:
    """``table[key]``, or KvcError '{where}: {label} is missing'."""
    if key not in table:
        raise KvcError(f"{where}: {label or key} is missing")
    return table[key]


def known_keys(table: dict, allowed: tuple[str, ...], where: str, prefix: str = "") -> None:
    """Refuse keys outside ``allowed``, naming the first one."""
    for key in table:
        if key not in allowed:
            raise KvcError(f"{where}: unknown key {prefix}{key} (expected one of: {', '.join(allowed)})")


# ----------------------------------------------------------------------------- sizes


def physical_memory() -> int | None:
    """Bytes of physical memory, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_allocation(nbytes: int, what: str, where: str) -> None:
    """Refuse, before allocating, ``nbytes`` that exceed the machine's physical memory."""
    memory = physical_memory()
    if memory is not None and nbytes > memory:
        raise KvcError(f"{where}: {what} needs {nbytes / 1e9:.3g} GB, more than this machine's "
                       f"{memory / 1e9:.3g} GB of memory")
