"""One hook on a transformers model's attention, shared by capture, eval and ``kvc.compressing``.

Two of transformers' public extension points, so every model family that uses them (Llama,
Mistral, Qwen2/3, Gemma3, Phi3, GPT-2, BERT, ...) works without per-family code:
- one attention function, registered once in ``AttentionInterface`` (as ``kvc_sdpa`` and
  ``kvc_eager``, the base implementation it wraps), sees the q, k, v that attention consumes: keys
  after RoPE exactly as the cache stores them (the cached tokens included), values, queries after
  RoPE, per KV head (GQA-native: ``repeat_kv`` happens later, inside the wrapped function);
- the modeling module's ``apply_rotary_pos_emb`` is wrapped to see its inputs (queries and keys
  before RoPE, after q_norm/k_norm) and the cos/sin it used. A model that never calls it has no RoPE.

``hooked(model, hooks)`` installs both for the duration of a block: each attention call goes to
``hooks.attention``, which may return a mask that replaces the model's own. ``Recorder`` records
the tensors of every layer (capture, eval's prefill).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..attention import AttentionSpec, spec_of
from ..errors import KvcError
from ..rope import cos_sin
from .load import text_config

BASES = ("sdpa", "eager")  # what the hook wraps; any other implementation (flash, flex) runs as sdpa
PREFIX = "kvc_"


@dataclass
class AttentionCall:
    """One layer's attention in a hooked forward pass (the model's own tensors, not copies)."""

    layer: int
    query: Tensor  # [B, H_q, Q, D] after RoPE
    key: Tensor  # [B, H_kv, K, D] after RoPE, cached tokens included
    value: Tensor  # [B, H_kv, K, D]
    spec: AttentionSpec
    rope: tuple[Tensor, Tensor, Tensor, Tensor] | None  # query, key before RoPE, cos, sin (None: no RoPE)


class Hooks:
    """What ``hooked`` does at each attention call; this base changes nothing."""

    def attention(self, call: AttentionCall) -> Tensor | None:
        """Called before each layer's attention. A bool mask [B, H_kv, Q, K] (True: the query sees
        the key) returned here replaces the model's own mask; None keeps it."""
        return None


class LayersDone(Exception):
    """Raised by a ``Recorder`` that stops after its last layer: the layers above need not run."""


@dataclass
class Recorder(Hooks):
    """Records, per layer, k, v and the queries at ``q_positions`` (None: all) of the forward pass in
    flight, plus k and q before RoPE and the cos/sin used, copied to the CPU; every layer's spec.

    With a ``sink``, each layer's tensors go to ``sink(layer, tensors)`` as soon as the layer has run
    (the model's own tensors, not copied) and are not kept: one layer is held at a time. ``names``:
    the tensors recorded (eval takes k and v from the model's own cache and needs no q_pre)."""

    layers: set[int]
    q_positions: Tensor | None = None
    stop_after_last: bool = False  # end the forward pass once the last wanted layer is recorded
    sink: Callable[[int, dict[str, Tensor]], None] | None = None
    names: tuple[str, ...] = ("k", "v", "q", "k_pre", "q_pre")
    records: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    specs: dict[int, AttentionSpec] = field(default_factory=dict)
    cos_sin: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def attention(self, call: AttentionCall) -> None:
        self.specs[call.layer] = call.spec
        if call.layer not in self.layers:
            return None
        rec = {"k": call.key, "v": call.value, "q": call.query}
        if call.rope is not None:
            q_pre, k_pre, cos, sin = call.rope
            rec.update(k_pre=k_pre, q_pre=q_pre)
            self.cos_sin[call.layer] = (cos[0].float().cpu(), sin[0].float().cpu())
        rec = {name: self._queries(t) if name.startswith("q") else t for name, t in rec.items() if name in self.names}
        if self.sink is not None:
            self.sink(call.layer, {name: t.detach() for name, t in rec.items()})
        else:
            self.records[call.layer] = {name: t.detach().to("cpu", copy=True) for name, t in rec.items()}
        if self.stop_after_last and call.layer == max(self.layers):
            raise LayersDone
        return None

    def _queries(self, q: Tensor) -> Tensor:
        return q if self.q_positions is None else q.index_select(2, self.q_positions.to(q.device))

    def rope_metadata(self, model) -> dict | None:
        """Per layer: the inverse frequencies and scaling that produced the recorded cos/sin.

        The exact float32 ``inv_freq`` is taken from the model's rotary buffers (the one whose
        angles match the layer's recorded cos/sin), so RoPE is reproduced offline to the dtype's
        precision. None when nothing was rotated (a model without RoPE).
        """
        if not self.cos_sin:
            return None
        candidates = [b.detach().float().cpu() for name, b in model.named_buffers() if name.endswith("inv_freq")]
        per_layer = {}
        for layer, (cos, sin) in sorted(self.cos_sin.items()):
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
        config = text_config(model.config)
        rope_params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        top = per_layer[min(per_layer, key=int)]
        rope = {"style": "rotate_half", "theta": _theta(config, rope_params), "scaling": rope_params,
                **top, "per_layer": {k: v for k, v in per_layer.items() if v != top}}
        return json.loads(json.dumps(rope, default=str))


def _theta(config, rope_params):
    if isinstance(rope_params, dict):
        if "rope_theta" in rope_params:
            return rope_params["rope_theta"]
        return {k: v.get("rope_theta") for k, v in rope_params.items() if isinstance(v, dict)} or None
    return getattr(config, "rope_theta", None)


# ----------------------------------------------------------------------------- installing


@dataclass
class _Block:
    """One ``hooked`` block: its hooks, the implementation it wraps, the RoPE call not yet paired."""

    hooks: Hooks
    base: str
    pending_rope: tuple | None = None


_BLOCKS: dict[torch.nn.Module, _Block] = {}  # attention module -> the block hooking it
_SDPA: list = []  # transformers' sdpa attention function, set by _register


def _attention(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: ``hooks.attention``, then the wrapped implementation."""
    block = _BLOCKS[module]
    rope, block.pending_rope = block.pending_rope, None
    mask = block.hooks.attention(AttentionCall(module.layer_idx, query, key, value, spec_of(module, kwargs), rope))
    if mask is not None:
        mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)  # KV head h -> query heads hG..hG+G-1
        if block.base == "eager":  # eager adds the mask to the logits
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                ~mask, torch.finfo(query.dtype).min)
        attention_mask = mask
    if block.base == "eager":
        inner = sys.modules[type(module).__module__].eager_attention_forward
    else:
        inner = _SDPA[0]
    return inner(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    """Register ``_attention`` once per base; transformers is imported here, not at kvc's import,
    so that loading the capture code costs no transformers start-up (the model is loaded by then)."""
    if _SDPA:
        return
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    for base in BASES:
        AttentionInterface.register(PREFIX + base, _attention)
        AttentionMaskInterface.register(PREFIX + base, ALL_MASK_ATTENTION_FUNCTIONS[base])
    _SDPA.append(ALL_ATTENTION_FUNCTIONS["sdpa"])


@contextlib.contextmanager
def hooked(model, hooks: Hooks):
    """Send every attention call of ``model`` through ``hooks`` for the duration of the block."""
    original = model.config._attn_implementation or "sdpa"
    if original.startswith(PREFIX):
        raise RuntimeError("kvc hooks are already installed on this model")
    _register()
    block = _Block(hooks, original if original in BASES else "sdpa")
    attention_modules = [m for m in model.modules() if hasattr(m, "layer_idx")]
    patched = []
    try:
        for mod in {sys.modules[type(m).__module__] for m in attention_modules}:
            rotary = getattr(mod, "apply_rotary_pos_emb", None)
            if rotary is None:
                continue

            def wrapped(q, k, cos, sin, *args, _rotary=rotary, **kwargs):
                block.pending_rope = (q, k, cos, sin)
                return _rotary(q, k, cos, sin, *args, **kwargs)

            mod.apply_rotary_pos_emb = wrapped
            patched.append((mod, rotary))
        _BLOCKS.update(dict.fromkeys(attention_modules, block))
        model.set_attn_implementation(PREFIX + block.base)
        yield hooks
    finally:
        model.set_attn_implementation(original)
        for m in attention_modules:
            _BLOCKS.pop(m, None)
        for mod, rotary in patched:
            mod.apply_rotary_pos_emb = rotary
