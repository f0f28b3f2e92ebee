"""``kvc compress``: one method over a capture; bits per entry and fidelity per layer and head.

Method options come from the method's ``Options`` dataclass: ``--group-size 32`` or
``--opt group_size=32`` (hyphens and underscores both work), converted to the field's type.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, List, Optional

import torch
import typer
from rich import box
from rich.table import Table

from ...io.capture import CaptureFile
from ...compression.protocol import option_fields
from ..console import err, human_bytes, out, progress_bar
from ...errors import KvcError
from ...io.safetensors import check_outputs, emit_json
from ...gpu import require_device

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


# ----------------------------------------------------------------------------- method options


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def convert(text: str, kind: Any, option: str) -> Any:
    """A command-line string as a value of the option's type (bool, int, float, str, optional, tuple)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        return convert(text, next(a for a in args if a is not type(None)), option)
    if typing.get_origin(kind) in (tuple, list):
        return typing.get_origin(kind)(convert(t.strip(), args[0], option) for t in text.split(",") if t.strip())
    try:
        if kind is bool:
            if text.lower() not in TRUE + FALSE:
                raise ValueError
            return text.lower() in TRUE
        if kind is int:
            value = float(text)
            if not value.is_integer():
                raise ValueError
            return int(value)
        return kind(text)
    except ValueError:
        raise KvcError(f"{option} expects {type_name(kind)}, got {text!r}") from None


def parse_method_args(cls, tokens: list[str], assignments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(options, positional arguments) from ``--name value`` tokens and ``key=value`` assignments."""
    fields = option_fields(cls)

    def field_of(name: str) -> str:
        key = name.replace("-", "_")
        if key not in fields:
            raise KvcError(f"method {cls.name} has no option {flag(name)}; valid options: "
                           f"{', '.join(map(flag, fields))} (see kvc methods)")
        return key

    params: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--") and len(token) > 2:
            name, eq, text = token[2:].partition("=")
            key = name.replace("-", "_")
            if key.startswith("no_") and fields.get(key[3:], (None,))[0] is bool and not eq:
                key, eq, text = key[3:], "=", "false"
            key = field_of(key)
            if not eq:
                if fields[key][0] is bool:
                    text = "true"
                elif i + 1 < len(tokens):
                    i, text = i + 1, tokens[i + 1]
                else:
                    raise KvcError(f"{flag(key)} needs a value")
            params[key] = convert(text, fields[key][0], flag(key))
        elif token.startswith("-") and len(token) > 1:
            raise KvcError(f"unknown option {token}; method {cls.name} takes "
                           f"{', '.join(map(flag, fields))} (see kvc methods)")
        else:
            positional.append(token)
        i += 1
    for item in assignments:
        name, eq, text = item.partition("=")
        if not eq:
            raise KvcError(f"--opt {item!r}: expected key=value")
        key = field_of(name.strip())
        params[key] = convert(text.strip(), fields[key][0], flag(key))
    return params, positional


def compute_dtype(name: str) -> torch.dtype:
    if name not in COMPUTE_DTYPES:
        raise KvcError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {name!r}")
    return COMPUTE_DTYPES[name]


# ----------------------------------------------------------------------------- tables

COLUMNS = (("bits", "kv", "bits_per_entry"), ("K mse", "k", "mse_rel"), ("V mse", "v", "mse_rel"),
           ("ip bias", "k", "ip_bias_rel"), ("slope", "k", "ip_slope"), ("KL", "kv", "attn_kl"),
           ("out err", "kv", "attn_out_rel"), ("top8", "kv", "attn_topk_overlap"))


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) >= 1e-2 or x == 0 else f"{x:.1e}"


def results_tables(result: dict, worst: int = 5) -> list[Table]:
    """Per-layer averages with the overall row, and the worst heads by attention-output error."""
    from ...compression.engine import aggregate

    heads = result["heads"]
    per_layer = Table(title=f"{result['method']}: per-layer averages", box=box.SIMPLE_HEAD)
    per_layer.add_column("layer", justify="right")
    for title, _, _ in COLUMNS:
        per_layer.add_column(title, justify="right")
    for L in sorted({r["layer"] for r in heads}):
        summary = aggregate([r for r in heads if r["layer"] == L])
        per_layer.add_row(str(L), *(fmt(summary[t].get(m)) for _, t, m in COLUMNS))
    per_layer.add_row("all", *(fmt(result["summary"][t].get(m)) for _, t, m in COLUMNS), style="bold")
    rows = {(r["layer"], r["head"], r["tensor"]): r for r in heads}
    kv = sorted((r for r in heads if r["tensor"] == "kv"),
                key=lambda r: -(r["attn_out_rel"] if r["attn_out_rel"] is not None else float("inf")))
    worst_table = Table(title=f"worst {worst} heads by attention-output error", box=box.SIMPLE_HEAD)
    for col in ("layer", "head", *(title for title, _, _ in COLUMNS[1:])):
        worst_table.add_column(col, justify="right")
    for r in kv[:worst]:
        key = (r["layer"], r["head"])
        worst_table.add_row(str(r["layer"]), str(r["head"]),
                            *(fmt(rows[(*key, t)].get(m)) for _, t, m in COLUMNS[1:]))
    return [per_layer, worst_table]


def overall_line(result: dict) -> str:
    paper = result["bits_per_entry_paper"]
    s = result["summary"]
    return (f"{result['method']}: {result['bits_per_entry']:.4f} bits per entry (K {s['k']['bits_per_entry']:.4f}, "
            f"V {s['v']['bits_per_entry']:.4f}" + (f"; paper's count {paper:.4f}" if paper is not None else "")
            + f"), K mse {fmt(s['k']['mse_rel'])}, V mse {fmt(s['v']['mse_rel'])}, "
            f"attention output error {fmt(s['kv']['attn_out_rel'])}")


# ----------------------------------------------------------------------------- command

NAME = "compress"
CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def command(
    ctx: typer.Context,
    capture: Optional[str] = typer.Argument(None, metavar="CAPTURE", help="Capture file (kvc capture, kvc synth)."),
    method: str = typer.Option(..., "--method", "-m", help="Method (kvc methods), or EVICTOR+COMPRESSOR, e.g. snapkv+turboquant."),
    opt: List[str] = typer.Option([], "--opt", help="Method option key=value (repeatable); or pass it as --key value."),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the compressed form (safetensors)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the results JSON to this file ('-': stdout, tables go to stderr)."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|cuda:N"),
    layers: str = typer.Option("all", "--layers", help="'all' or a list like '0,2,5-9'."),
    dtype: str = typer.Option("float32", "--dtype", help="Compute dtype: float32|float64."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (rotations, sketches, sampling)."),
    query_stride: int = typer.Option(1, "--query-stride", help="Measure with every N-th captured query (the method sees all)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
) -> None:
    """Compress a capture with one method; report bits per entry and fidelity per layer and head.

    Method options (see kvc methods) follow as --name value, e.g. --bits 2 --group-size 32.
    """
    from ...compression import engine
    from ...compression.protocol import build, get

    cls = get(method)
    params, positional = parse_method_args(cls, ([capture] if capture else []) + list(ctx.args), opt)
    if len(positional) != 1:
        raise KvcError(f"expected one CAPTURE file, got {len(positional)}: {' '.join(positional) or 'none'}")
    if seed is not None:
        params["seed"] = seed
    if query_stride < 1:
        raise KvcError("--query-stride must be >= 1")
    compressor = build(cls.name, **params)
    check_outputs([out_path, json_path], force, inputs=[positional[0]])
    source = CaptureFile(positional[0])
    selected = source.select_layers(layers)
    torch.manual_seed(compressor.options.seed)
    with progress_bar() as bar:
        task = bar.add_task(f"{cls.name}", total=len(selected))
        result = engine.run(compressor, source, selected, require_device(device), compute_dtype(dtype),
                            keep_encoded=out_path is not None, query_stride=query_stride,
                            progress=lambda _: bar.advance(task))
    report = result.to_json()
    console = err if json_path == "-" else out
    for table in results_tables(report):
        console.print(table)
    console.print(overall_line(report))
    if out_path is not None:
        engine.write_compressed(out_path, result, source, force=force)
        console.print(f"wrote {out_path}: {human_bytes(out_path.stat().st_size)} "
                      f"({human_bytes(sum(e.nbits() for e in result.encoded.values()) / 8)} of packed arrays)")
    emit_json(json_path, report, force)
