"""The registry of compression methods: every ``Compressor`` subclass with a ``name`` in a module of
``kvc/compression/methods/`` (adding a method = adding a module), and ``evictor+compressor``
combinations (:mod:`kvc.compression.composite`)."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from ..errors import KvcError
from ..io import schema
from . import methods
from .composite import combine
from .protocol import Compressor, Evictor

_REGISTRY: dict[str, type[Compressor]] = {}


def _discover() -> dict[str, type[Compressor]]:
    if not _REGISTRY:
        for info in pkgutil.iter_modules(methods.__path__):
            module = importlib.import_module(f"{methods.__name__}.{info.name}")
            for obj in vars(module).values():
                if (isinstance(obj, type) and issubclass(obj, Compressor)
                        and obj.__module__ == module.__name__ and "name" in vars(obj)):
                    _REGISTRY[obj.name] = obj
    return _REGISTRY


def available() -> dict[str, type[Compressor]]:
    """Method name -> class, sorted by name."""
    return dict(sorted(_discover().items()))


def get(name: str) -> type[Compressor]:
    """The class of a method; ``evictor+compressor`` names a combination (``composite``), and a
    head-adaptive wrapper takes the eviction method after it (``adakv+h2o``, ``adakv+h2o+kivi``; the
    wrapper alone wraps its default, ``adakv+kivi``)."""
    if "+" in name:
        parts = [get(part) for part in name.split("+")]
        if len(parts) > 1 and hasattr(parts[0], "around") and issubclass(parts[1], Evictor):
            parts[:2] = [parts[0].around(parts[1])]
        if len(parts) == 1:
            return parts[0]
        if len(parts) > 2:
            raise KvcError(f"method {name!r}: a combination is one eviction method and one tensor "
                           "compressor, e.g. snapkv+turboquant")
        return combine(*parts)
    methods = available()
    if name not in methods:
        raise KvcError(f"unknown method {schema.show(name)}; valid methods: {', '.join(methods)}")
    return methods[name]


def build(name: str, **params: Any) -> Compressor:
    """A compressor from its name and option values (unknown options list the valid ones); the
    values are checked against their declared types and constraints."""
    cls = get(name)
    fields = [f.name for f in dataclasses.fields(cls.Options)]
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise KvcError(f"method {name} has no option {', '.join(unknown)}; valid options: "
                       f"{', '.join(fields)}")
    return cls(cls.Options(**params))
