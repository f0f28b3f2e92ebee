"""``kvc decompress``: a compressed file (kvc compress --out) back to a capture-format file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

import kvc

from ..console import human_bytes, out, progress_task
from ..options import Device, Force
from ...io.atomic import check_outputs

NAME = "decompress"


def command(
    path: Path = typer.Argument(..., help="Compressed file written by kvc compress --out."),
    out_path: Path = typer.Option(Path("decompressed.safetensors"), "--out", "-o", help="Capture file to write."),
    queries: Optional[Path] = typer.Option(None, "--queries", help="The source capture: copy its queries, so the result can be measured again."),
    device: Device = "auto",
    force: Force = False,
) -> None:
    """Decode every layer with the method that encoded it; write K, V (and K before RoPE)."""
    check_outputs([out_path], force, inputs=[path, queries])
    with progress_task("decoding") as progress:
        cap = kvc.decompress(path, out_path, queries=queries, device=device, force=force, progress=progress)
    out.print(f"wrote {out_path}: {len(cap.layers)} layers decoded with {cap.decompressed_from['method']} "
              f"({human_bytes(path.stat().st_size)} -> {human_bytes(out_path.stat().st_size)})")
