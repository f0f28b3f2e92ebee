"""``kvc synth``: a capture file from the spiked random-matrix model (a known answer)."""

from __future__ import annotations

from pathlib import Path

import typer

import kvc

from ..console import human_bytes, out
from ..options import Force
from ...errors import KvcError
from ...io.atomic import check_outputs


def _numbers(text: str, option: str, kind: type = float) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise KvcError(f"{option} {text!r}: expected comma-separated {what}") from None


NAME = "synth"


def command(
    out_path: Path = typer.Option(Path("synth.safetensors"), "--out", "-o"),
    layers: int = typer.Option(2, "--layers"),
    kv_heads: int = typer.Option(2, "--kv-heads"),
    heads: int = typer.Option(4, "--heads", help="Query heads (a multiple of --kv-heads)."),
    head_dim: int = typer.Option(64, "--head-dim"),
    seq_len: int = typer.Option(256, "--seq-len"),
    num_seqs: int = typer.Option(1, "--num-seqs"),
    strengths: str = typer.Option("6,4,3", "--strengths", help="Spike strengths theta, in units of sigma*sqrt(max(n,d)) (rank = how many; '' for none)."),
    sigma: float = typer.Option(1.0, "--sigma", help="Noise standard deviation per entry."),
    noise: str = typer.Option("white", "--noise", help="white | colored (separable)."),
    outlier_channels: str = typer.Option("", "--outlier-channels", help="Channels to scale up, e.g. '3,17'."),
    outlier_scale: float = typer.Option(8.0, "--outlier-scale"),
    rope: bool = typer.Option(True, "--rope/--no-rope", help="Store k_pre/q_pre and rotate k, q."),
    dtype: str = typer.Option("float32", "--dtype", help="float32|bfloat16|float16"),
    seed: int = typer.Option(0, "--seed"),
    force: Force = False,
) -> None:
    """Write a synthetic capture with planted low-rank structure and outlier channels."""
    check_outputs([out_path], force)
    spikes = _numbers(strengths, "--strengths")
    kvc.synth(out_path, layers=layers, kv_heads=kv_heads, heads=heads, head_dim=head_dim, seq_len=seq_len,
              num_seqs=num_seqs, strengths=spikes, sigma=sigma, noise=noise,
              outlier_channels=_numbers(outlier_channels, "--outlier-channels", int),
              outlier_scale=outlier_scale, rope=rope, dtype=dtype, seed=seed, force=force)
    out.print(f"wrote {out_path}: {layers} layers x {kv_heads} KV heads x {num_seqs}x{seq_len} tokens, "
              f"rank {len(spikes)}, {noise} noise, {human_bytes(out_path.stat().st_size)}")
