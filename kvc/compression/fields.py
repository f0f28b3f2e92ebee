"""Method option fields: their declaration (:func:`option`), types and constraints, checked in one place.

A method's ``Options`` dataclass declares each option with :func:`option`: default, help text and
what values are valid (choices, a range, odd, dividing or below the head dimension). :func:`checked`
validates every declared constraint, with one message format naming the flag
(``kivi: --group-size must divide head_dim 64, got 48``); ``Compressor.__init__`` runs it without
the head dimension and ``Compressor.validate`` with the layer's, so the command line, Python,
policies, compressed files and ``kvc budget`` share it. :func:`convert` and :func:`coerce` turn
command-line strings and Python values into the field's type. No torch here: ``kvc methods``
describes the options without importing it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import KvcError

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def show(value: Any) -> str:
    """A value in a message: an integral float as an integer (5.0 -> 5), strings quoted."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


@dataclass(frozen=True)
class Valid:
    """The declared constraints of one option (all optional): allowed ``choices``; a range
    [low, high] whose ends ``low_open``/``high_open`` exclude; ``odd``; ``divides_head_dim``;
    ``below_head_dim`` (< head_dim)."""

    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    odd: bool = False
    divides_head_dim: bool = False
    below_head_dim: bool = False

    def _range(self) -> str | None:
        lo, hi = show(self.low), show(self.high)
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {lo}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {hi}"
        return None

    def text(self) -> str | None:
        """What ``kvc methods`` shows, e.g. ``[1, 8]``, ``>= 1, divides head_dim``, ``mse | prod``."""
        parts = [" | ".join(map(str, self.choices))] if self.choices else []
        parts += [p for p in (self._range(), "odd" if self.odd else None,
                              "divides head_dim" if self.divides_head_dim else None,
                              "< head_dim" if self.below_head_dim else None) if p]
        return ", ".join(parts) or None

    def problem(self, value: Any, head_dim: int | None = None) -> str | None:
        """What ``value`` must be and is not ("be in [1, 4]"), or None. Head-dim constraints only
        when ``head_dim`` is given."""
        if self.choices is not None and value not in self.choices:
            return f"be one of {', '.join(map(str, self.choices))}"
        if value is None:
            return None
        # written so that NaN fails every bound
        low_fails = self.low is not None and not (value > self.low if self.low_open else value >= self.low)
        high_fails = self.high is not None and not (value < self.high if self.high_open else value <= self.high)
        if low_fails or high_fails:
            span = self._range()
            return f"be in {span}" if span.startswith(("[", "(")) else f"be {span}"
        if self.odd and value % 2 == 0:
            return "be odd"
        if head_dim is not None:
            if self.divides_head_dim and head_dim % value:
                return f"divide head_dim {head_dim}"
            if self.below_head_dim and value >= head_dim:
                return f"be < head_dim {head_dim}"
        return None


def option(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False, odd: bool = False,
           divides_head_dim: bool = False, below_head_dim: bool = False) -> Any:
    """A dataclass field for a method option: default, help text and its valid values (:class:`Valid`)."""
    valid = Valid(None if choices is None else tuple(choices), low, high, low_open, high_open, odd,
                  divides_head_dim, below_head_dim)
    return field(default=default, metadata={"help": help, "valid": valid})


def typed_fields(options_cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """Option name -> (resolved type, dataclass field) of an ``Options`` dataclass."""
    hints = typing.get_type_hints(options_cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(options_cls)}


def valid_of(f: dataclasses.Field) -> Valid:
    return f.metadata.get("valid") or Valid()


def checked(method: str, options: Any, head_dim: int | None = None) -> Any:
    """``options`` with every value coerced to its field's type (:func:`coerce`) and checked against
    the declared constraints, those on the head dimension only when ``head_dim`` is given; the first
    value that fails is a KvcError naming the method and the flag."""
    values = {}
    for name, (kind, f) in typed_fields(type(options)).items():
        value = coerce(getattr(options, name), kind, f"{method}: {flag(name)}")
        problem = valid_of(f).problem(value, head_dim)
        if problem:
            raise KvcError(f"{method}: {flag(name)} must {problem}, got {show(value)}")
        values[name] = value
    return dataclasses.replace(options, **values)


def _optional(kind: Any) -> tuple[Any, bool]:
    """(the type inside Optional[...], whether None is allowed)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = typing.get_args(kind)
        return next(a for a in args if a is not type(None)), type(None) in args
    return kind, False


def convert(text: str, kind: Any, option: str) -> Any:
    """A command-line string as a value of the option's type (bool, int, float, str, optional, tuple)."""
    inner, nullable = _optional(kind)
    if inner is not kind:
        if text.lower() in ("none", "null") and nullable:
            return None
        return convert(text, inner, option)
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (tuple, list):
        return typing.get_origin(kind)(convert(t.strip(), args[0], option) for t in text.split(",") if t.strip())
    try:
        if kind is bool:
            if text.lower() not in TRUE + FALSE:
                raise ValueError
            return text.lower() in TRUE
        if kind is int:
            value = float(text)
            if not value.is_integer():
                raise ValueError
            return int(value)
        return kind(text)
    except ValueError:
        raise KvcError(f"{option} expects {type_name(kind)}, got {text!r}") from None


def coerce(value: Any, kind: Any, option: str) -> Any:
    """A Python value as the option's type: strings go through :func:`convert`; other values must
    already be of the type (an integral float for an int, an int for a float, a list for a tuple)."""
    if isinstance(value, str):
        return convert(value, kind, option)
    inner, nullable = _optional(kind)
    if value is None and nullable:
        return None
    origin = typing.get_origin(inner)
    if origin in (tuple, list) and isinstance(value, (tuple, list)):
        return origin(coerce(v, typing.get_args(inner)[0], option) for v in value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if inner is bool and isinstance(value, bool):
        return value
    if inner is int and number and float(value).is_integer():
        return int(value)
    if inner is float and number:
        return float(value)
    if inner is str and isinstance(value, str):
        return value
    raise KvcError(f"{option} expects {type_name(kind)}, got {value!r}")
