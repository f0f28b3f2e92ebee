"""``kvc decompress``: a compressed file (kvc compress --out) back to a capture-format file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..console import human_bytes, out, progress_bar
from ...io.safetensors import check_outputs
from ...model.load import resolve_device

NAME = "decompress"


def command(
    path: Path = typer.Argument(..., help="Compressed file written by kvc compress --out."),
    out_path: Path = typer.Option(Path("decompressed.safetensors"), "--out", "-o", help="Capture file to write."),
    queries: Optional[Path] = typer.Option(None, "--queries", help="The source capture: copy its queries, so the result can be measured again."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|cuda:N"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
) -> None:
    """Decode every layer with the method that encoded it; write K, V (and K before RoPE)."""
    from ...compression.engine import CompressedFile, decompress

    check_outputs([out_path], force, inputs=[path, queries])
    layers = CompressedFile(path).layers
    with progress_bar() as bar:
        task = bar.add_task("decoding", total=len(layers))
        cf = decompress(path, out_path, resolve_device(device), queries=queries, force=force,
                        progress=lambda _: bar.advance(task))
    out.print(f"wrote {out_path}: {len(layers)} layers decoded with {cf.method} "
              f"({human_bytes(path.stat().st_size)} -> {human_bytes(out_path.stat().st_size)})")
