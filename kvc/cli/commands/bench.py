"""``kvc bench``: encode/decode throughput of the GPU kernels vs the copy bandwidth and the torch reference."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..console import err, out
from ..options import Force, JsonOut
from ... import gpu
from ...errors import KvcError
from ...io.atomic import check_outputs, write_json

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
    json_path: JsonOut = None,
    markdown: bool = typer.Option(False, "--markdown", help="Print the table as markdown (for docs/gpu.md)."),
    force: Force = False,
) -> None:
    """Time the GPU kernels against the device copy bandwidth and the torch reference, side by side.

    Needs a CUDA GPU and cupy (the gpu extra: pip install cupy-cuda12x). See docs/gpu.md.
    """
    if not device.startswith("cuda"):
        raise KvcError(f"kvc bench times the CUDA kernels: --device must be cuda or cuda:N, not {device!r}")
    gpu.require(device)  # one line naming what is missing, exit 2
    check_outputs([json_path], force, inputs=[capture])
    options = gpu.bench.BenchOptions(
        capture=capture, layers=layers, tokens=tokens, kv_heads=kv_heads, head_dim=head_dim, q_per_kv=q_per_kv,
        bits=bits, rotation=rotation, group_size=group_size, repeats=repeats, warmup=warmup, device=device,
        seed=seed, attention=attention)
    console = err if json_path == "-" else out
    result = gpu.bench.run_bench(options, log=lambda line: err.print(line, markup=False, highlight=False))
    print_report(result, console, markdown=markdown)
    if json_path == "-":
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    elif json_path is not None:
        write_json(json_path, result.to_json(), force=force)


# ----------------------------------------------------------------------------- output


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table_rows(result: gpu.bench.BenchResult, with_ms: bool = False) -> list[list[str]]:
    copy_mb = 2 * math.prod(result.shape) * 4 / 1e6
    rows = [["copy (cupy memcpy of X)", f"{copy_mb:.1f}", f"{result.copy_gbs:.0f}", "100%", "-", "-", ""]
            + (["-", "-"] if with_ms else [])]
    for r in result.rows:
        k, t = r.gbs(r.kernel_ms), r.gbs(r.torch_ms)
        row = [r.op, f"{r.bytes / 1e6:.1f}", _fmt(k, ".0f"),
               "-" if k is None else f"{100 * k / result.copy_gbs:.0f}%", _fmt(t, ".0f"),
               "-" if r.kernel_ms is None or r.torch_ms is None else f"{r.torch_ms / r.kernel_ms:.1f}x",
               r.note or r.parity]
        rows.append(row + ([_fmt(r.kernel_ms, ".3f"), _fmt(r.torch_ms, ".3f")] if with_ms else []))
    return rows


HEADERS = ["operation", "MB moved", "kernel GB/s", "% copy", "torch GB/s", "speedup", "parity / note"]


def print_report(result: gpu.bench.BenchResult, console, markdown: bool = False) -> None:
    rows = table_rows(result, with_ms=markdown)
    goals = result.goals()
    head = (f"{result.device}, {result.date}; torch {result.versions['torch']}, cupy {result.versions['cupy']}\n"
            f"data: {result.data}, X = {result.shape} float32")
    if markdown:
        headers = HEADERS + ["kernel ms", "torch ms"]
        lines = [head.replace("\n", "  \n"), "", "| " + " | ".join(headers) + " |",
                 "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
        console.print("\n".join(lines), markup=False, highlight=False)
    else:
        table = Table(title="kvc bench", caption=head)
        for h in HEADERS:
            table.add_column(h, justify="left" if h in ("operation", "parity / note") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if goals["met"] is None:
        console.print("goals: encode not measured")
    else:
        console.print(f"goals: encode at {100 * goals['encode_copy_fraction']:.0f}% of copy bandwidth (goal "
                      f">= {100 * goals['goal_copy_fraction']:.0f}%), {goals['encode_speedup']:.1f}x the torch "
                      f"reference (goal >= {goals['goal_speedup']:.0f}x): {'met' if goals['met'] else 'NOT met'}",
                      markup=False, highlight=False)
