"""``kvc methods``: the compression methods with their options, defaults, valid values and help.

Read from the committed catalogue (``kvc.methods()``, :mod:`kvc.compression.catalogue`), without torch.
"""

from __future__ import annotations

import json

from rich import box
from rich.table import Table
from rich.text import Text

import kvc

from ..console import out
from ..options import PrintJson


NAME = "methods"
TORCH_FREE = True  # the committed catalogue


def command(as_json: PrintJson = False) -> None:
    """List the compression methods with their options and defaults."""
    methods = list(kvc.methods().values())
    if as_json:
        out.print_json(json.dumps({"methods": methods, "combinations": "EVICTOR+COMPRESSOR, e.g. snapkv+turboquant"}))
        return
    table = Table(title="kvc methods (options: kvc compress CAPTURE --method NAME --option value)",
                  box=box.SIMPLE_HEAD, show_lines=True)
    table.add_column("method", style="bold")
    table.add_column("kind")
    table.add_column("options (default, valid values)", overflow="fold")
    for m in methods:
        cell = Text(m["summary"], "italic")
        for o in m["options"]:
            valid = f" (valid: {o['valid']})" if o["valid"] else ""
            cell.append(f"\n{o['flag']} {o['default']}{valid}: {o['help']}", "not italic")
        if m["nominal_bits"]:
            cell.append("\ndeclares nominal bits per entry (kvc budget --method)", "dim not italic")
        table.add_row(m["name"], m["kind"], cell)
    out.print(table)
    out.print("Combine an eviction method with a tensor compressor as EVICTOR+COMPRESSOR, "
              "e.g. --method snapkv+turboquant.")
