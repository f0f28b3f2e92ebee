"""Method options: the one parser for ``--name value`` / ``--opt key=value`` on the command line and
for keyword arguments in Python (``kvc.method(name, **options)``), and the registry's description.

Options come from the method's ``Options`` dataclass; hyphens and underscores both work in names, and
values are converted to (command line) or checked against (Python) the field's type. ``build`` then
checks the declared choices, and the method its own constraints on the first layer.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

import torch

from ..errors import KvcError
from .protocol import Compressor, Evictor, TensorCompressor, available, build, get, option_fields

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


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


def _field(cls: type[Compressor], name: str, fields: Mapping[str, Any], spell=flag) -> str:
    key = name.replace("-", "_")
    if key not in fields:
        raise KvcError(f"method {cls.name} has no option {spell(name)}; valid options: "
                       f"{', '.join(map(spell, fields))} (see kvc methods)")
    return key


def parse_method_args(cls: type[Compressor], tokens: list[str], assignments: list[str]
                      ) -> tuple[dict[str, Any], list[str]]:
    """(options, positional arguments) from ``--name value`` tokens and ``key=value`` assignments."""
    fields = option_fields(cls)
    params: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--") and len(token) > 2:
            name, eq, text = token[2:].partition("=")
            key = name.replace("-", "_")
            if key.startswith("no_") and fields.get(key[3:], (None,))[0] is bool and not eq:
                key, eq, text = key[3:], "=", "false"
            key = _field(cls, key, fields)
            if not eq:
                if fields[key][0] is bool:
                    text = "true"
                elif i + 1 < len(tokens):
                    i, text = i + 1, tokens[i + 1]
                else:
                    raise KvcError(f"{flag(key)} needs a value")
            params[key] = convert(text, fields[key][0], flag(key))
        elif token.startswith("-") and len(token) > 1:
            raise KvcError(f"unknown option {token}; method {cls.name} takes "
                           f"{', '.join(map(flag, fields))} (see kvc methods)")
        else:
            positional.append(token)
        i += 1
    for item in assignments:
        name, eq, text = item.partition("=")
        if not eq:
            raise KvcError(f"--opt {item!r}: expected key=value")
        key = _field(cls, name.strip(), fields)
        params[key] = convert(text.strip(), fields[key][0], flag(key))
    return params, positional


def method_options(cls: type[Compressor], options: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments as the method's option values, checked like the command line's."""
    fields = option_fields(cls)
    params = {}
    for name, value in options.items():
        key = _field(cls, name, fields, spell=str)
        params[key] = coerce(value, fields[key][0], key)
    return params


def method(name: str, **options: Any) -> Compressor:
    """A configured compressor: ``method("turboquant", bits=2.5)``; ``evictor+compressor`` combines two.

    Options are validated as ``kvc compress --name value`` validates them (unknown names, types,
    choices); constraints that depend on the data (e.g. a group size dividing head_dim) are
    checked on the first layer compressed.
    """
    cls = get(name)
    return build(cls.name, **method_options(cls, options))


def configured(given: str | Compressor, options: Mapping[str, Any]) -> Compressor:
    """A method name with its options (checked as :func:`method` checks them), or a compressor
    :func:`method` already configured (then no options)."""
    if isinstance(given, Compressor):
        if options:
            raise KvcError(f"method {given.name} is already configured; give its options to "
                           f"kvc.method({given.name!r}, ...), not here ({', '.join(options)})")
        return given
    if not isinstance(given, str):
        raise KvcError(f"method: expected a method name or kvc.method(...), got {type(given).__name__}")
    return method(given, **options)


def compute_dtype(name: str) -> torch.dtype:
    if name not in COMPUTE_DTYPES:
        raise KvcError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {name!r}")
    return COMPUTE_DTYPES[name]


def describe() -> list[dict]:
    """Every registered method: name, kind, summary, paper and options (flag, type, default, help)."""
    methods = []
    for name, cls in available().items():
        kind = "eviction" if issubclass(cls, Evictor) else "tensor" if issubclass(cls, TensorCompressor) else "other"
        options = []
        for field_name, (kind_, f) in option_fields(cls).items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            options.append({"name": field_name, "flag": flag(field_name), "type": type_name(kind_),
                            "default": default, "choices": list(choices) if choices else None,
                            "help": f.metadata.get("help", "")})
        methods.append({"name": name, "kind": kind, "summary": cls.summary, "paper": cls.paper,
                        "options": options})
    return methods
