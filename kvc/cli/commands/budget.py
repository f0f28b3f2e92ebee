"""``kvc budget``: KV-cache memory across context lengths, fp16 against compressed."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

import kvc

from ..console import err, human_bytes, out
from ..options import Force, JsonOut, MethodOptions
from ...errors import KvcError
from ...io.atomic import check_outputs, emit_json
from ..lazy import LazyModule

options = LazyModule("kvc.compression.options")

NAME = "budget"
CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def command(
    ctx: typer.Context,
    model: str = typer.Option(None, "--model", "-m", help="Hub id, HF directory, config.json or GGUF file (default: the default model)."),
    layers: int = typer.Option(None, "--layers", help="Explicit geometry: number of layers."),
    kv_heads: int = typer.Option(None, "--kv-heads", help="Explicit geometry: KV heads per layer (GQA)."),
    head_dim: int = typer.Option(None, "--head-dim", help="Explicit geometry: head dimension."),
    sliding_window: int = typer.Option(None, "--sliding-window", help="Explicit geometry: window of the sliding layers."),
    sliding: str = typer.Option(None, "--sliding-layers", help="Which layers slide: all (default), '0-4,6' or pattern:N (every N-th layer full)."),
    context: str = typer.Option("1024,4k,32k,128k", "--context", help="Context lengths, comma-separated (k = 1024)."),
    batch: int = typer.Option(1, "--batch", help="Sequences held at once."),
    method: str = typer.Option(None, "--method", help="Compressed form by the method's nominal bits per entry (kvc methods: nominal bits); its options follow as --name value."),
    opt: MethodOptions = [],
    from_json: Path = typer.Option(None, "--from-json", help="Take the measured bits per entry from kvc compress --json output."),
    json_path: JsonOut = None,
    force: Force = False,
) -> None:
    """KV-cache bytes per token, per sequence and per batch across context lengths.

    Method options (see kvc methods) follow --method as --name value, e.g. --bits 2 --group-size 32.
    """
    check_outputs([json_path], force, inputs=[from_json, model])
    params, extra = {}, list(ctx.args)
    if method is not None:
        params, extra = options.parse_method_args(options.get(method), extra, opt)
    elif extra or opt:
        raise KvcError(f"{extra[0] if extra else '--opt ' + opt[0]} needs --method")
    if extra:
        raise KvcError(f"unexpected argument {extra[0]!r}")
    report = kvc.budget(model, layers=layers, kv_heads=kv_heads, head_dim=head_dim, sliding_window=sliding_window,
                        sliding_layers=sliding, context=context, batch=batch, method=method,
                        from_json=from_json, **params).to_json()
    console = err if json_path == "-" else out
    console.print(_table(report))
    emit_json(json_path, report, force)
    if json_path not in (None, "-"):
        console.print(f"wrote {json_path}")


def _table(report: dict) -> Table:
    geo, comp, batch = report["geometry"], report["compressed"], report["batch"]
    heads = sorted(set(geo["kv_heads"]))
    windows = [w for w in geo["windows"] if w is not None]
    title = (f"KV cache of {geo['name']}: {geo['num_layers']} layers x "
             f"{'/'.join(map(str, heads))} KV heads x head_dim {geo['key_dim']}"
             + (f"/{geo['value_dim']}" if geo["value_dim"] != geo["key_dim"] else "")
             + (f", {len(windows)} layers capped at {max(windows)} tokens" if windows else "")
             + f", batch {batch}")
    caption = (f"Per token before window caps: fp16 {human_bytes(report['fp16']['bytes_per_token'])}"
               + (f"; {comp['method']} {human_bytes(comp['bytes_per_token'])} (K {comp['k_bits']:.3g} + "
                  f"V {comp['v_bits']:.3g} bits per entry"
                  + (f", last {comp['fp16_tokens']} tokens in fp16" if comp["fp16_tokens"] else "")
                  + ("" if comp["source"] == "rule" else f", measured in {comp['source']}") + ")"
                  if comp else "")
               + ". KB/MB/GB = 10^3/10^6/10^9 bytes.")
    table = Table(title=title, caption=caption)
    table.add_column("context", justify="right")
    table.add_column("fp16 /token", justify="right")
    table.add_column("fp16 /seq", justify="right")
    table.add_column(f"fp16 x{batch}", justify="right")
    if comp:
        table.add_column(f"{comp['method']} /seq", justify="right")
        table.add_column(f"{comp['method']} x{batch}", justify="right")
        table.add_column("saving", justify="right")
    for row in report["contexts"]:
        fp16, small = row["fp16"], row["compressed"]
        cells = [f"{row['context']:,}", human_bytes(fp16["per_token"]), human_bytes(fp16["per_sequence"]),
                 human_bytes(fp16["total"])]
        if small:
            cells += [human_bytes(small["per_sequence"]), human_bytes(small["total"]), f"{row['ratio']:.2f}x"]
        table.add_row(*cells)
    return table
