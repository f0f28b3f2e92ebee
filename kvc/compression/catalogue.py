"""The method catalogue: what ``kvc methods`` and ``kvc.methods()`` list, read without importing torch.

``catalogue.json`` (next to this module, package data of the wheel) is generated from the live
registry (:func:`kvc.compression.options.describe`) and committed; tests/test_catalogue.py checks that
it is current. After adding or changing a method, regenerate it::

    python -m kvc.compression.catalogue

This module imports json and importlib.resources only (the registry's method modules import torch).
"""

from __future__ import annotations

import json
from importlib import resources

FILE = "catalogue.json"
REGENERATE = "python -m kvc.compression.catalogue"


def render(described: list[dict]) -> str:
    """The text of catalogue.json for ``describe()``'s list."""
    return json.dumps({"generated_by": REGENERATE, "methods": described}, indent=1) + "\n"


def read_text() -> str:
    return resources.files(__package__).joinpath(FILE).read_text(encoding="utf-8")


def methods() -> dict[str, dict]:
    """The compression methods (``kvc methods --json``): name -> {"name", "kind", "summary", "paper",
    "nominal_bits", "options"}; ``nominal_bits`` says whether ``kvc budget --method`` takes it; each
    option a dict of "name", "flag", "type", "default", "choices", "valid" (its declared valid values,
    e.g. "[1, 8]" or ">= 1, divides head_dim", or None) and "help". Combine an eviction method with a
    tensor compressor as ``"EVICTOR+COMPRESSOR"``."""
    return {m["name"]: m for m in json.loads(read_text())["methods"]}


if __name__ == "__main__":  # regenerate from the registry, which imports torch
    from pathlib import Path

    from ..io.atomic import write_text
    from .options import describe

    target = Path(__file__).with_name(FILE)
    write_text(target, render(describe()), force=True)
    print(f"wrote {target}")
