"""``kvc methods``: the compression methods with their options, defaults and help."""

from __future__ import annotations

import dataclasses
import json

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from ..console import out
from ...compression.protocol import option_fields
from .compress import flag, type_name


def describe() -> list[dict]:
    """Every registered method: name, kind, summary, paper and options (flag, type, default, help)."""
    from ...compression.protocol import Evictor, TensorCompressor, available

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


NAME = "methods"


def command(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the compression methods with their options and defaults."""
    methods = describe()
    if as_json:
        out.print_json(json.dumps({"methods": methods, "combinations": "EVICTOR+COMPRESSOR, e.g. snapkv+turboquant"}))
        return
    table = Table(title="kvc methods (options: kvc compress CAPTURE --method NAME --option value)",
                  box=box.SIMPLE_HEAD, show_lines=True)
    table.add_column("method", style="bold")
    table.add_column("kind")
    table.add_column("options (default)", overflow="fold")
    for m in methods:
        cell = Text(m["summary"], "italic")
        for o in m["options"]:
            choices = f" ({'|'.join(map(str, o['choices']))})" if o["choices"] else ""
            cell.append(f"\n{o['flag']} {o['default']}{choices}: {o['help']}", "not italic")
        table.add_row(m["name"], m["kind"], cell)
    out.print(table)
    out.print("Combine an eviction method with a tensor compressor as EVICTOR+COMPRESSOR, "
              "e.g. --method snapkv+turboquant.")
