"""Method options: the one parser for ``--name value`` / ``--opt key=value`` on the command line and
for keyword arguments in Python (``kvc.method(name, **options)``), and the registry's description.

Options come from the method's ``Options`` dataclass; hyphens and underscores both work in names, and
values are converted to (command line) or checked against (Python) the field's type
(:mod:`kvc.compression.fields`). ``build`` then checks the declared constraints, and ``validate``
those on the head dimension on the first layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from ..errors import KvcError
from .fields import coerce, convert, flag, type_name, typed_fields, valid_of
from .protocol import Compressor, Evictor, TensorCompressor, declares_nominal_bits
from .registry import available, build, get

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _field(cls: type[Compressor], name: str, fields: Mapping[str, Any], spell=flag) -> str:
    key = name.replace("-", "_")
    if key not in fields:
        raise KvcError(f"method {cls.name} has no option {spell(name)}; valid options: "
                       f"{', '.join(map(spell, fields))} (see kvc methods)")
    return key


def parse_method_args(cls: type[Compressor], tokens: list[str], assignments: list[str]
                      ) -> tuple[dict[str, Any], list[str]]:
    """(options, positional arguments) from ``--name value`` tokens and ``key=value`` assignments."""
    fields = typed_fields(cls.Options)
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
    fields = typed_fields(cls.Options)
    params = {}
    for name, value in options.items():
        key = _field(cls, name, fields, spell=str)
        params[key] = coerce(value, fields[key][0], key)
    return params


def method(name: str, **options: Any) -> Compressor:
    """A configured compressor: ``method("turboquant", bits=2.5)``; ``evictor+compressor`` combines two.

    Options are validated as ``kvc compress --name value`` validates them (unknown names, types,
    declared constraints); those on the head dimension (e.g. a group size dividing head_dim) and
    those that depend on the data are checked on the first layer compressed.
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
    """Every registered method: name, kind, summary, paper, whether ``kvc budget`` takes it
    (``nominal_bits``) and options (name, flag, type, default, choices, valid values, help)."""
    methods = []
    for name, cls in available().items():
        kind = "eviction" if issubclass(cls, Evictor) else "tensor" if issubclass(cls, TensorCompressor) else "other"
        options = []
        for field_name, (kind_, f) in typed_fields(cls.Options).items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            valid = valid_of(f)
            options.append({"name": field_name, "flag": flag(field_name), "type": type_name(kind_),
                            "default": default, "choices": list(valid.choices) if valid.choices else None,
                            "valid": valid.text(), "help": f.metadata.get("help", "")})
        methods.append({"name": name, "kind": kind, "summary": cls.summary, "paper": cls.paper,
                        "nominal_bits": declares_nominal_bits(cls), "options": options})
    return methods
