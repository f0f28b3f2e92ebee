"""``kvc info``: metadata and tensor table of any kvc file."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ...io.capture import FORMAT as CAPTURE_FORMAT, CaptureFile
from ...io.compressed import FORMAT as COMPRESSED_FORMAT, CompressedFile
from ..console import human_bytes, out
from ..options import PrintJson
from ...errors import KvcError
from ...io.header import ITEM_BYTES, read_header


def read_kvc_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[list[int], str]]]:
    """Metadata and {tensor: (shape, dtype)} of a kvc safetensors file, checked to be one of ours
    and validated by its format's reader."""
    header = read_header(path)
    meta = header.metadata
    shapes = {k: (list(info.shape), info.dtype) for k, info in header.tensors.items()}
    if not str(meta.get("format", "")).startswith("kvc-"):
        raise KvcError(f"{path} is a safetensors file but not a kvc file (no 'format: kvc-*' metadata)")
    if meta["format"] == CAPTURE_FORMAT:
        CaptureFile(path)
    elif meta["format"] == COMPRESSED_FORMAT:
        CompressedFile(path)
    return meta, shapes


NAME = "info"
TORCH_FREE = True  # reads headers only (kvc info stays torch-free)


def command(path: Path = typer.Argument(..., help="A kvc file (capture or compressed)."),
            as_json: PrintJson = False) -> None:
    """Print the metadata and the tensor table of a kvc file."""
    meta, shapes = read_kvc_header(path)
    if as_json:
        out.print_json(json.dumps({"metadata": meta, "tensors": {
            k: {"shape": s, "dtype": d} for k, (s, d) in shapes.items()}}))
        return
    table = Table(title=f"{path}: metadata", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key in sorted(meta):
        value = meta[key]
        table.add_row(key, value if len(value) <= 400 else value[:400] + " ...")
    out.print(table)
    tensors = Table(title="tensors")
    for col in ("name", "shape", "dtype", "size"):
        tensors.add_column(col, justify="right" if col == "size" else "left")
    total = 0
    for name in sorted(shapes, key=_natural):
        shape, dtype = shapes[name]
        size = ITEM_BYTES[dtype]
        for s in shape:
            size *= s
        total += size
        tensors.add_row(name, "x".join(map(str, shape)) or "scalar", dtype, human_bytes(size))
    tensors.add_row("total", "", "", human_bytes(total), style="bold")
    out.print(tensors)


def _natural(name: str) -> list[tuple[int, int, str]]:
    """'layers.10.k' after 'layers.9.k': numbers by value, before words."""
    return [(0, int(p), "") if p.isdecimal() else (1, 0, p) for p in name.split(".")]
