"""Capture K, V and Q of every attention layer of a transformers causal LM.

The model's attention is hooked (``kvc.model.hooks``: transformers' public extension points, so
every model family that uses them works without per-family code) and a ``Recorder`` keeps the
q, k, v that attention consumes: keys after RoPE exactly as the cache stores them, values, queries
after RoPE, per KV head, and, on a model with RoPE, queries and keys before RoPE (after
q_norm/k_norm) with the cos/sin used. A model without RoPE stores only k, v, q.

Sequences run one batch at a time and each layer's slices go straight to their place in the output
file as soon as the layer has run (``LayerWriter``, ``StreamingSafetensorsWriter``), so peak memory
is the model plus one layer of one batch, whatever the number of layers.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import resource
import time
from dataclasses import dataclass

import torch

from .. import __version__
from ..attention import describe
from ..io.capture import CaptureMeta, tensor_key
from ..errors import KvcError
from .hooks import LayersDone, Recorder, hooked
from .load import input_device, text_config
from ..io.safetensors import StreamingSafetensorsWriter
from ..selection import parse_index_list

def parse_query_positions(spec: str | None, seq_len: int) -> torch.Tensor:
    """'all' / None, 'last:N', or a comma list of positions and ranges."""
    if spec in (None, "", "all"):
        return torch.arange(seq_len)
    if spec.startswith("last:"):
        count = int(spec[5:]) if spec[5:].isdigit() else 0
        if not 0 < count <= seq_len:
            raise KvcError(f"--query-positions {spec!r}: N must lie in 1..{seq_len}")
        return torch.arange(seq_len - count, seq_len)
    return torch.tensor(parse_index_list(spec, "--query-positions", seq_len), dtype=torch.int64)


@dataclass
class CaptureSummary:
    path: str
    layers: list[int]
    num_kv_heads: int
    num_heads: int
    head_dim: int
    num_seqs: int
    seq_len: int
    num_query_positions: int
    has_rope: bool
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    weights: str
    framing: str
    attention: str


def capture(model, input_ids: torch.Tensor, out_path, *, meta: dict, layers: list[int],
            q_positions: torch.Tensor, batch_size: int = 1, force: bool = False,
            progress=None) -> CaptureSummary:
    """Run ``input_ids`` [S, T] through ``model`` and write the capture file ``out_path``.

    ``meta`` holds the descriptive metadata (model, model_revision, text_source, text_sha256);
    the rest is read off the model and the captured tensors. Each layer's tensors are written as
    soon as that layer has run (``LayerWriter``): peak memory is the model plus one layer of one batch.
    """
    start = time.perf_counter()
    num_seqs, seq_len = input_ids.shape
    device = input_device(model)
    with contextlib.ExitStack() as stack:
        sink = LayerWriter(stack, out_path, layers, num_seqs, force, specs={
            "q_positions": (torch.int64, (len(q_positions),)), "input_ids": (torch.int64, (num_seqs, seq_len))})
        recorder = Recorder(set(layers), q_positions, stop_after_last=True, sink=sink)
        stack.enter_context(torch.inference_mode())
        stack.enter_context(hooked(model, recorder))
        for first in range(0, num_seqs, batch_size):
            batch = input_ids[first:first + batch_size].to(device)
            sink.first, sink.seen = first, set()
            with contextlib.suppress(LayersDone):
                model(input_ids=batch, use_cache=False)
            missing = [layer for layer in layers if layer not in sink.seen]
            if missing:
                raise KvcError(f"{type(model).__name__}: attention of layers {missing} was not "
                               "seen; this architecture does not use transformers' AttentionInterface")
            if first == 0:
                sink.writer.set_metadata(_metadata(model, recorder, sink.shapes, meta, num_seqs,
                                                   seq_len).to_strings())
                sink.writer.write("q_positions", 0, q_positions)
            sink.writer.write("input_ids", first, batch.cpu())
            if progress is not None:
                progress(batch.shape[0])
    shapes, writer = sink.shapes, sink.writer
    return CaptureSummary(
        path=str(out_path), layers=layers, num_kv_heads=shapes["k"][1][0],
        num_heads=shapes["q"][1][0], head_dim=shapes["k"][1][-1], num_seqs=num_seqs,
        seq_len=seq_len, num_query_positions=len(q_positions), has_rope="k_pre" in shapes,
        bytes_written=len(writer.header) + writer.data_bytes, seconds=time.perf_counter() - start,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        weights=meta.get("weights") or "not recorded", framing=_describe_framing(meta.get("special_tokens")),
        attention=describe({L: recorder.specs[L] for L in layers}))


class LayerWriter:
    """A ``Recorder`` sink that writes each layer's tensors, rows ``first``.. of every tensor, to
    the capture file as soon as the layer has run.

    The file is opened at the first layer seen, whose shapes every layer shares (the format has one
    num_kv_heads, head_dim); its metadata is set once the first batch has run (``set_metadata``).
    """

    def __init__(self, stack: contextlib.ExitStack, out_path, layers: list[int], num_seqs: int, force: bool,
                 specs: dict):
        """``specs``: the tensors other than the layers' (``StreamingSafetensorsWriter``)."""
        self.stack, self.out_path, self.force = stack, out_path, force
        self.layers, self.num_seqs, self.specs = layers, num_seqs, specs
        self.writer: StreamingSafetensorsWriter | None = None
        self.shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}  # name -> dtype, shape past the batch
        self.first_layer = -1
        self.first = 0  # the batch's first sequence
        self.seen: set[int] = set()  # layers written in this batch

    def __call__(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        shapes = {name: (t.dtype, tuple(t.shape[1:])) for name, t in tensors.items()}
        if self.writer is None:
            self.shapes, self.first_layer = shapes, layer
            specs = {tensor_key(L, name): (dtype, (self.num_seqs, *shape))
                     for L in self.layers for name, (dtype, shape) in shapes.items()}
            self.writer = self.stack.enter_context(StreamingSafetensorsWriter(
                self.out_path, {**self.specs, **specs}, None, force=self.force))
        elif shapes != self.shapes:
            raise KvcError(f"layer {layer}'s tensors differ in shape or dtype from layer "
                           f"{self.first_layer}'s; capture them separately (--layers)")
        for name, tensor in tensors.items():
            _check_finite(tensor, layer, name)
            self.writer.write(tensor_key(layer, name), self.first, tensor)
        self.seen.add(layer)


def _describe_framing(special_tokens: dict | None) -> str:
    if special_tokens is None:
        return "not recorded"
    if not special_tokens["added"]:
        return "bare text (--no-special-tokens)"
    return special_tokens["text"] or "bare text (the tokenizer adds no special tokens)"


def _check_finite(tensor, layer, name):
    if not torch.isfinite(tensor).all():
        raise KvcError(f"layer {layer} {name}: the model produced NaN or Inf (try --dtype float32)")


def _metadata(model, recorder, shapes, meta, num_seqs, seq_len) -> CaptureMeta:
    config = text_config(model.config)
    num_layers = config.num_hidden_layers
    sliding = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or (
        ["sliding_attention" if sliding else "full_attention"] * num_layers)
    return CaptureMeta(
        model=meta["model"], model_revision=meta.get("model_revision", ""),
        architecture=(getattr(model.config, "architectures", None) or [type(model).__name__])[0],
        num_layers=num_layers, num_heads=shapes["q"][1][0], num_kv_heads=shapes["k"][1][0],
        head_dim=shapes["k"][1][-1], rope=recorder.rope_metadata(model),
        layer_types=list(layer_types), dtype=str(shapes["k"][0]).removeprefix("torch."),
        seq_len=seq_len, num_seqs=num_seqs, text_source=meta["text_source"],
        text_sha256=meta["text_sha256"], kvc_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        sliding_window=sliding if any("sliding" in t for t in layer_types) else None,
        attention=[recorder.specs[L].to_json() if L in recorder.specs else None
                   for L in range(num_layers)],
        special_tokens=meta.get("special_tokens"), weights=meta.get("weights", ""),
        extra={"query_positions": json.dumps("all" if len(recorder.q_positions) == seq_len
                                             else recorder.q_positions.tolist())})
