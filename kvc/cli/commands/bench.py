"""``kvc bench``: encode/decode throughput of the GPU kernels vs the copy bandwidth and the torch reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..console import err, out
from ...errors import KvcError
from ...io.safetensors import check_writable, write_json

NAME = "bench"


def command(
    capture: Optional[Path] = typer.Argument(None, metavar="[CAPTURE]",
                                             help="Capture file; default: a synthetic 30-layer, 8k-token capture."),
    layers: int = typer.Option(30, "--layers", help="Layers to synthesize (or the first N layers of CAPTURE)."),
    tokens: int = typer.Option(8192, "--tokens", help="Tokens per sequence of the synthetic capture."),
    kv_heads: int = typer.Option(3, "--kv-heads", help="KV heads of the synthetic capture."),
    head_dim: int = typer.Option(64, "--head-dim", help="Head dimension of the synthetic capture."),
    q_per_kv: int = typer.Option(3, "--q-per-kv", help="Query heads per KV head (scoring rows)."),
    bits: int = typer.Option(2, "--bits", help="Bits per entry (TurboQuant 1..4; KIVI groups)."),
    rotation: str = typer.Option("hadamard", "--rotation", help="TurboQuant rotation: hadamard (fused "
                                 "in the kernel) or haar (torch GEMM, kernel quantizes and packs)."),
    group_size: int = typer.Option(32, "--group-size", help="KIVI group size."),
    repeats: int = typer.Option(10, "--repeats", help="Timed runs per operation (median reported)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed runs before timing."),
    attention: bool = typer.Option(True, "--attention/--no-attention",
                                   help="Also time scoring and value accumulation from packed codes."),
    device: str = typer.Option("cuda", "--device", help="cuda|cuda:N"),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic data and the rotation."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the results JSON to this file ('-': stdout)."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the table as markdown (for docs/gpu.md)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing JSON file."),
) -> None:
    """Time the GPU kernels against the device copy bandwidth and the torch reference, side by side.

    Needs a CUDA GPU and cupy (the gpu extra: pip install cupy-cuda12x). See docs/gpu.md.
    """
    from ...gpu.bench import BenchOptions, print_report, run_bench
    from ...gpu.runtime import require

    if not device.startswith("cuda"):
        raise KvcError(f"kvc bench times the CUDA kernels: --device must be cuda or cuda:N, not {device!r}")
    require(device)  # one line naming what is missing, exit 2
    if json_path not in (None, "-"):
        check_writable(Path(json_path), force)
    options = BenchOptions(capture=capture, layers=layers, tokens=tokens, kv_heads=kv_heads, head_dim=head_dim,
                           q_per_kv=q_per_kv, bits=bits, rotation=rotation, group_size=group_size,
                           repeats=repeats, warmup=warmup, device=device, seed=seed, attention=attention)
    console = err if json_path == "-" else out
    result = run_bench(options, log=lambda line: err.print(line, markup=False, highlight=False))
    print_report(result, console, markdown=markdown)
    if json_path == "-":
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    elif json_path is not None:
        write_json(json_path, result.to_json(), force=force)
