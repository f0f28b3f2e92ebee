"""``kvc.compressing``: a method applied to the KV cache of ``model.generate`` after the prefill.

Inside the block, a forward pass given an empty cache (the prefill of ``generate``) runs as usual
while a ``Recorder`` watches it; its cache is then compressed layer by layer exactly as ``kvc eval``
compresses a context (``prefill_layers``, ``compress``) and replaced, in place, by the
``CompressedLayer``s of the decoded prefix. Every later forward pass on that cache (the decoding
steps) appends its tokens uncompressed and attends through each layer's own mask (``CacheMasks``):
evicted tokens hidden, sliding-window layers masked by absolute position, as ``kvc eval`` does.
Forward passes without a cache run unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import Tensor
from transformers.cache_utils import Cache

from ..compression.options import configured
from ..compression.protocol import Compressor
from ..errors import KvcError
from ..model.hooks import AttentionCall, Hooks, Recorder, hooked
from ..model.load import is_causal_lm, text_config
from .evaluate import PREFILL_TENSORS, CacheMasks, CompressedLayer, cache_argument, compress, prefill_layers


class Compressing(Hooks):
    """The state of a ``compressing`` block: the method, the cache it compressed last, its bits."""

    def __init__(self, model, compressor: Compressor):
        self.model, self.compressor = model, compressor
        self.argument = cache_argument(model)
        self.num_layers = text_config(model.config).num_hidden_layers
        self.dtype = next(model.parameters()).dtype
        self.recorder: Recorder | None = None  # set during a prefill
        self.masks: CacheMasks | None = None  # set while decoding on a compressed cache
        self.prefills = 0
        self.bits = 0
        self.entries = 0

    @property
    def bits_per_entry(self) -> float | None:
        """Stored bits per K/V entry of every prefill compressed in the block (None before the first)."""
        return self.bits / self.entries if self.entries else None

    def attention(self, call: AttentionCall) -> Tensor | None:
        if self.recorder is not None:
            return self.recorder.attention(call)
        return None if self.masks is None else self.masks.attention(call)

    def before(self, model, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the model: a prefill, a step on a compressed cache, or neither."""
        self.recorder, self.masks = None, None
        cache = kwargs.get(self.argument)
        if cache is None:
            return
        if any(isinstance(layer, CompressedLayer) for layer in cache.layers):
            self.masks = CacheMasks(cache)
            return
        if cache.get_seq_length():
            raise KvcError(f"kvc.compressing: the cache already holds {cache.get_seq_length()} tokens "
                           "that were not compressed; start generate from an empty cache")
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise KvcError("kvc.compressing: padded batches are not supported (the attention mask "
                           "hides tokens); generate prompts of one length, or one at a time")
        self.recorder = Recorder(set(range(self.num_layers)), names=PREFILL_TENSORS)

    def after(self, model, args: tuple, kwargs: dict[str, Any], output) -> None:
        """Forward hook of the model: after a prefill, its cache replaced by the compressed one."""
        if self.recorder is None:
            return
        cache: Cache = kwargs[self.argument]
        recorder, self.recorder = self.recorder, None
        compressed = compress(self.compressor, prefill_layers(model, recorder, cache), self.dtype)
        cache.layers[:] = compressed.layers
        self.prefills += 1
        self.bits += compressed.bits
        self.entries += compressed.entries


@contextlib.contextmanager
def compressing(model, method: str | Compressor, **options: Any):
    """Inside the block, ``model.generate(...)`` runs with ``method`` (a name with options as ``kvc
    compress`` takes them, e.g. ``bits=2``, checked as ``kvc.method`` checks them; or a compressor
    from ``kvc.method``) applied to the prompt's KV cache after the prefill; the tokens generated
    after it are cached uncompressed. Yields the block's ``Compressing`` state
    (``bits_per_entry``). Like kvpress's ``with press(model):``, for one prompt or prompts of one
    length (no padding), greedy, sampling or beam search.
    """
    if not is_causal_lm(model.config):
        raise KvcError("kvc.compressing compresses the cache of a causal LM's generation; "
                       f"{type(model).__name__} is not one")
    state = Compressing(model, configured(method, options))
    with contextlib.ExitStack() as stack:
        stack.enter_context(hooked(model, state))
        for handle in (model.register_forward_pre_hook(state.before, with_kwargs=True),
                       model.register_forward_hook(state.after, with_kwargs=True)):
            stack.callback(handle.remove)
        yield state
