"""Capture K, V and Q of every attention layer of a transformers causal LM.

Two hooks, both through transformers' public extension points, so every model family that uses
them (Llama, Mistral, Qwen2/3, Gemma3, Phi3, ...) works without per-family code:
- an attention function registered in ``AttentionInterface`` records the q, k, v that attention
  consumes: keys after RoPE exactly as the cache stores them, values, queries after RoPE,
  per KV head (GQA-native: ``repeat_kv`` happens later, inside the wrapped function);
- the modeling module's ``apply_rotary_pos_emb`` is wrapped to record its inputs (queries and
  keys before RoPE, after q_norm/k_norm) and the cos/sin it used. A model that never calls it has
  no RoPE, and then only k, v, q are stored.

Sequences run one batch at a time and each batch's slices go straight to their place in the
output file (``StreamingSafetensorsWriter``), so peak memory is the model plus one batch.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..attention import AttentionSpec, describe, spec_of
from ..io.capture import CaptureMeta, tensor_key
from ..errors import KvcError
from .load import text_config
from ..io.safetensors import StreamingSafetensorsWriter
from ..rope import cos_sin

CAPTURE_ATTENTION = "kvc_capture"


@dataclass
class _Recorder:
    """Collects, per layer, the tensors of the forward pass in flight."""

    layers: set[int]
    q_positions: torch.Tensor
    records: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    attention: dict[int, AttentionSpec] = field(default_factory=dict)
    cos_sin: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    pending_rope: tuple | None = None
    stop_after_last: bool = False  # end the forward pass once the last wanted layer is recorded

    def on_rope(self, q, k, cos, sin):
        self.pending_rope = (q, k, cos, sin)

    def on_attention(self, module, q, k, v, kwargs):
        layer = module.layer_idx
        rope, self.pending_rope = self.pending_rope, None
        self.attention[layer] = spec_of(module, kwargs)
        if layer not in self.layers:
            return
        pos = self.q_positions.to(q.device)
        rec = {"k": k, "v": v, "q": q.index_select(2, pos)}
        if rope is not None:
            q_pre, k_pre, cos, sin = rope
            rec.update(k_pre=k_pre, q_pre=q_pre.index_select(2, pos))
            self.cos_sin[layer] = (cos[0].float().cpu(), sin[0].float().cpu())
        self.records[layer] = {name: t.detach().to("cpu", copy=True) for name, t in rec.items()}
        if self.stop_after_last and layer == max(self.layers):
            raise _LayersDone


class _LayersDone(Exception):
    """Raised from the attention hook: the layers above the last wanted one need not run."""


_ACTIVE: list[_Recorder] = []


def _register_capture_attention(base: str) -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    def attention(module, query, key, value, attention_mask, **kwargs):
        if _ACTIVE:
            _ACTIVE[-1].on_attention(module, query, key, value, kwargs)
        inner = ALL_ATTENTION_FUNCTIONS[base] if base != "eager" else _eager(module)
        return inner(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE_ATTENTION, attention)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS[base])


def _eager(module):
    return sys.modules[type(module).__module__].eager_attention_forward


@contextlib.contextmanager
def recording(model, recorder: _Recorder):
    """Install the hooks on ``model`` for the duration of the block."""
    base = model.config._attn_implementation or "sdpa"
    if base == CAPTURE_ATTENTION:
        raise RuntimeError("capture hooks are already installed on this model")
    _register_capture_attention(base if base in ("sdpa", "eager") else "sdpa")
    modules = {sys.modules[type(m).__module__] for m in model.modules() if hasattr(m, "layer_idx")}
    patched = []
    for mod in modules:
        original = getattr(mod, "apply_rotary_pos_emb", None)
        if original is None:
            continue

        def wrapped(q, k, cos, sin, *args, _original=original, **kwargs):
            recorder.on_rope(q, k, cos, sin)
            return _original(q, k, cos, sin, *args, **kwargs)

        mod.apply_rotary_pos_emb = wrapped
        patched.append((mod, original))
    model.set_attn_implementation(CAPTURE_ATTENTION)
    _ACTIVE.append(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.remove(recorder)
        model.set_attn_implementation(base)
        for mod, original in patched:
            mod.apply_rotary_pos_emb = original


def parse_index_list(spec: str, option: str, upper: int) -> list[int]:
    """A comma list of indices and inclusive ranges ('0,4-7') within 0..upper-1."""
    values: set[int] = set()
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise KvcError(f"{option} {spec!r}: expected a list like '0,2,5-9'") from None
        if first > last:
            raise KvcError(f"{option} {spec!r}: the range {first}-{last} is reversed, so empty "
                           f"(write {last}-{first})")
        if first < 0 or last >= upper:  # checked before a range is expanded
            raise KvcError(f"{option} {spec!r}: values must lie in 0..{upper - 1}")
        values.update(range(first, last + 1))
    return sorted(values)


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """'all' / None, or a comma list of layer indices and ranges."""
    if spec in (None, "", "all"):
        return list(range(num_layers))
    return parse_index_list(spec, "--layers", num_layers)


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
    the rest is read off the model and the captured tensors.
    """
    start = time.perf_counter()
    num_seqs, seq_len = input_ids.shape
    device = next(model.parameters()).device
    recorder = _Recorder(set(layers), q_positions, stop_after_last=True)
    writer = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(recording(model, recorder))
        for first in range(0, num_seqs, batch_size):
            batch = input_ids[first:first + batch_size].to(device)
            recorder.records.clear()
            with contextlib.suppress(_LayersDone):
                model(input_ids=batch, use_cache=False)
            missing = [layer for layer in layers if layer not in recorder.records]
            if missing:
                raise KvcError(f"{type(model).__name__}: attention of layers {missing} was not "
                               "seen; this architecture does not use transformers' AttentionInterface")
            if writer is None:
                capture_meta = _metadata(model, recorder, layers, meta, num_seqs, seq_len)
                specs = _tensor_specs(recorder, num_seqs, q_positions, seq_len)
                writer = stack.enter_context(StreamingSafetensorsWriter(
                    out_path, specs, capture_meta.to_strings(), force=force))
                writer.write("q_positions", 0, q_positions)
            writer.write("input_ids", first, batch.cpu())
            for layer, rec in recorder.records.items():
                for name, tensor in rec.items():
                    _check_finite(tensor, layer, name)
                    writer.write(tensor_key(layer, name), first, tensor)
            if progress is not None:
                progress(batch.shape[0])
    first_rec = recorder.records[layers[0]]
    return CaptureSummary(
        path=str(out_path), layers=layers, num_kv_heads=first_rec["k"].shape[1],
        num_heads=first_rec["q"].shape[1], head_dim=first_rec["k"].shape[-1], num_seqs=num_seqs,
        seq_len=seq_len, num_query_positions=len(q_positions), has_rope="k_pre" in first_rec,
        bytes_written=len(writer.header) + writer.data_bytes, seconds=time.perf_counter() - start,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        weights=meta.get("weights") or "not recorded", framing=_describe_framing(meta.get("special_tokens")),
        attention=describe({L: recorder.attention[L] for L in layers}))


def _describe_framing(special_tokens: dict | None) -> str:
    if special_tokens is None:
        return "not recorded"
    if not special_tokens["added"]:
        return "bare text (--no-special-tokens)"
    return special_tokens["text"] or "bare text (the tokenizer adds no special tokens)"


def _check_finite(tensor, layer, name):
    if not torch.isfinite(tensor).all():
        raise KvcError(f"layer {layer} {name}: the model produced NaN or Inf (try --dtype float32)")


def _tensor_specs(recorder, num_seqs, q_positions, seq_len):
    specs = {"q_positions": (torch.int64, (len(q_positions),)),
             "input_ids": (torch.int64, (num_seqs, seq_len))}
    for layer, rec in recorder.records.items():
        for name, t in rec.items():
            specs[tensor_key(layer, name)] = (t.dtype, (num_seqs, *t.shape[1:]))
    return specs


def _metadata(model, recorder, layers, meta, num_seqs, seq_len) -> CaptureMeta:
    config = text_config(model.config)
    first = recorder.records[layers[0]]
    num_layers = config.num_hidden_layers
    sliding = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or (
        ["sliding_attention" if sliding else "full_attention"] * num_layers)
    return CaptureMeta(
        model=meta["model"], model_revision=meta.get("model_revision", ""),
        architecture=(getattr(model.config, "architectures", None) or [type(model).__name__])[0],
        num_layers=num_layers, num_heads=first["q"].shape[1], num_kv_heads=first["k"].shape[1],
        head_dim=first["k"].shape[-1], rope=_rope_metadata(model, config, recorder),
        layer_types=list(layer_types), dtype=str(first["k"].dtype).removeprefix("torch."),
        seq_len=seq_len, num_seqs=num_seqs, text_source=meta["text_source"],
        text_sha256=meta["text_sha256"], kvc_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        sliding_window=sliding if any("sliding" in t for t in layer_types) else None,
        attention=[recorder.attention[L].to_json() if L in recorder.attention else None
                   for L in range(num_layers)],
        special_tokens=meta.get("special_tokens"), weights=meta.get("weights", ""),
        extra={"query_positions": json.dumps("all" if len(recorder.q_positions) == seq_len
                                             else recorder.q_positions.tolist())})


def _rope_metadata(model, config, recorder) -> dict | None:
    """Per layer: the inverse frequencies and scaling that produced the recorded cos/sin.

    The exact float32 ``inv_freq`` is taken from the model's rotary buffers (the one whose angles
    match the layer's recorded cos/sin), so RoPE is reproduced offline to the dtype's precision.
    """
    if not recorder.cos_sin:
        return None
    candidates = [b.detach().float().cpu() for name, b in model.named_buffers() if name.endswith("inv_freq")]
    per_layer = {}
    for layer, (cos, sin) in sorted(recorder.cos_sin.items()):
        rotary_dims = cos.shape[-1]
        if not torch.allclose(cos[:, : rotary_dims // 2], cos[:, rotary_dims // 2:]):
            raise KvcError("this model's RoPE does not use the rotate-half layout; kvc cannot "
                           "store its pre-RoPE keys")
        scaling = float(cos[0, 0])  # cos(0) = attention_scaling
        positions = torch.arange(cos.shape[0])
        inv_freq = next((c for c in candidates if c.numel() == rotary_dims // 2 and torch.allclose(
            cos_sin(positions, c, scaling)[0], cos, atol=1e-5)), None)
        if inv_freq is None:  # no buffer matches: read the angles off position 1
            inv_freq = torch.atan2(sin[1, : rotary_dims // 2], cos[1, : rotary_dims // 2])
        per_layer[str(layer)] = {"inv_freq": inv_freq.tolist(), "attention_scaling": scaling,
                                 "rotary_dims": rotary_dims}
    rope_params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    top_layer = min(per_layer, key=int)
    top = per_layer[top_layer]
    rope = {"style": "rotate_half", "theta": _theta(config, rope_params), "scaling": rope_params,
            **top,
            "per_layer": {k: v for k, v in per_layer.items() if v != top}}
    return json.loads(json.dumps(rope, default=str))


def _theta(config, rope_params):
    if isinstance(rope_params, dict):
        if "rope_theta" in rope_params:
            return rope_params["rope_theta"]
        return {k: v.get("rope_theta") for k, v in rope_params.items() if isinstance(v, dict)} or None
    return getattr(config, "rope_theta", None)
