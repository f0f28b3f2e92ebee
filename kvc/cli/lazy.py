"""Modules a command needs only when it runs, so that ``kvc --help`` and ``kvc <command> --help``
start without torch, scipy or transformers."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """``LazyModule("kvc.ci.check")`` stands for that module and imports it on first attribute access
    (nothing enters ``sys.modules`` before that, so nothing else can trigger the import half-way)."""

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attribute)
