"""End to end: a method's compressed cache inside the model (``kvc eval``).

A context is prefilled once (recording queries and keys before RoPE, ``kvc.model.hooks``); each
layer's K/V goes through the method (``engine.encode_decode``) and into a ``CompressedCache``, a
transformers ``DynamicCache`` whose layers hold the decoded prefix (eviction methods: only the kept
tokens, compacted per KV head and padded, at their original RoPE positions) followed by the tokens
appended later, uncompressed. The same prefill serves the uncompressed baseline and every method.

- Perplexity: each text window = a context of C tokens (compressed) + N continuation tokens fed with
  teacher forcing; the N predictions made through the compressed cache are scored.
- Retrieval: planted facts ("The pass code of the blue door is 4821.") in corpus text at several
  depths and lengths; the question is appended after the compressed context and the code is decoded
  greedily. Multi-needle: several doors in one context, one question each.

Attention runs through the hooked attention function (``CacheMasks``), which applies each layer's
own mask (per KV head validity of the compacted prefix, causal over the appended tokens), so ragged
per-head and per-layer budgets need no padding tricks in the model.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..attention import AttentionSpec
from ..compression import engine
from ..compression.protocol import Compressor, Decoded, LayerKV
from ..compression.composite import kept_slots
from ..model.hooks import AttentionCall, Hooks, Recorder, hooked
from ..model.text import Corpus, framing
from ..errors import KvcError
from ..io.atomic import atomic_path
from ..model.load import check_positions, input_device, is_causal_lm, text_config
from ..rope import apply_rope

COLORS = ("blue", "red", "green", "yellow", "black", "white", "orange", "purple")
SUBJECTS = ("pass code of the {} door", "serial number of the {} bicycle", "room number of the {} hotel",
            "zip code of the {} house", "locker number of the {} gym", "flight number of the {} plane")
PROMPT_SEED = 0  # needles, codes and haystacks are the same for every method and --seed
ANSWER_TOKENS = 64  # bound on a needle question plus its answer, in tokens
PREFILL_TENSORS = ("q", "k_pre")  # what a prefill's Recorder keeps; K and V come from the model's cache


@dataclass
class Settings:
    """What ``kvc eval`` measures; the defaults finish in minutes on the default model on CPU."""

    contexts: tuple[int, ...] = (256, 512, 1024)  # context lengths (perplexity and retrieval)
    windows: int = 2  # perplexity text windows per context length
    continuation: int = 64  # scored continuation tokens per window
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # needle depth, fraction of the context
    trials: int = 1  # needle prompts per (depth, length) cell
    needles: int = 4  # facts in one multi-needle context (0: skip)
    retrieval: bool = True
    special_tokens: bool = True  # each context starts like a fresh input of the model (its BOS, if any)
    decode_every: int | None = None  # recompress the cache every N continuation tokens (None: prefill only)


# ----------------------------------------------------------------------------- the cache


class CompressedLayer(DynamicLayer):
    """One layer: a decoded prefix standing for ``length`` prompt tokens, then appended tokens.

    keys/values [B, H, P + A, D]; ``valid`` [B, H, P] marks the real prefix slots (None: all);
    ``slots`` [B, H, P] their token positions within the prefix (None: 0..P-1), whose first token
    sits at absolute position ``offset`` (a sliding-window layer keeps only the prompt's tail).
    ``spec``: the layer's attention; its mask applies to the absolute positions of every key.
    """

    def __init__(self, keys: Tensor, values: Tensor, valid: Tensor | None, length: int,
                 slots: Tensor | None = None, offset: int = 0, spec: AttentionSpec = AttentionSpec()):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values, self.valid, self.slots = keys, values, valid, slots
        self.prefix, self.length, self.offset, self.spec = keys.shape[-2], length, offset, spec

    def fresh(self) -> "CompressedLayer":
        """The same prefix without the tokens appended since."""
        P = self.prefix
        return CompressedLayer(self.keys[..., :P, :], self.values[..., :P, :], self.valid, self.length,
                               self.slots, self.offset, self.spec)

    def get_seq_length(self) -> int:
        """Tokens seen (prompt + appended), so new tokens get their true RoPE positions."""
        return self.length + self.keys.shape[-2] - self.prefix

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2] + query_length, self.length - self.prefix

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.valid is not None:
            self.valid = self.valid.repeat_interleave(repeats, dim=0)
        if self.slots is not None:
            self.slots = self.slots.repeat_interleave(repeats, dim=0)

    def mask(self, query_length: int) -> Tensor:
        """bool [B, H, Q, K]: valid prefix slots and appended tokens that the layer's mask shows the
        last ``query_length`` tokens (causal, and within the sliding window if the layer has one)."""
        B, H, K, _ = self.keys.shape
        device = self.keys.device
        appended = K - self.prefix
        queries = self.length + appended - query_length + torch.arange(query_length, device=device)
        slots = torch.arange(self.prefix, device=device) if self.slots is None else self.slots
        prefix = self.spec.visible(queries, slots + self.offset).expand(B, H, query_length, self.prefix)
        if self.valid is not None:
            prefix = prefix & self.valid[:, :, None, :]
        tail = self.spec.visible(queries, self.length + torch.arange(appended, device=device))
        return torch.cat([prefix, tail.expand(B, H, -1, -1)], dim=-1)


class CompressedCache(DynamicCache):
    """A ``DynamicCache`` of ``CompressedLayer``s (transformers 5.x)."""

    def __init__(self, layers: list[CompressedLayer]):
        Cache.__init__(self, layers=layers)

    def repeat(self, n: int) -> "CompressedCache":
        """Each sequence repeated n times (in place), to ask several questions of one context."""
        for layer in self.layers:
            layer.batch_repeat_interleave(n)
        return self


def uncompressed_cache(layers: Sequence[LayerKV], dtype: torch.dtype) -> CompressedCache:
    return CompressedCache([decoded_layer(Decoded(l.k, l.v), l, dtype) for l in layers])


def decoded_layer(decoded: Decoded, layer: LayerKV, dtype: torch.dtype) -> CompressedLayer:
    """The cache layer of a decoded prefix; evicted tokens dropped, kept ones compacted per head."""
    length = layer.offset + layer.shape[2]
    if decoded.keep is None:
        return CompressedLayer(decoded.k.to(dtype), decoded.v.to(dtype), None, length,
                               offset=layer.offset, spec=layer.attention)
    positions, valid = kept_slots(decoded.keep)
    index = positions[..., None].expand(-1, -1, -1, decoded.k.shape[-1])
    return CompressedLayer(decoded.k.gather(2, index).to(dtype), decoded.v.gather(2, index).to(dtype),
                           valid, length, positions, layer.offset, layer.attention)


# ----------------------------------------------------------------------------- attention


class CacheMasks(Hooks):
    """Hooks that give each layer the mask of its ``CompressedLayer`` in ``cache``."""

    def __init__(self, cache: CompressedCache):
        self.cache = cache

    def attention(self, call: AttentionCall) -> Tensor:
        return self.cache.layers[call.layer].mask(call.query.shape[2])


class RecordingMasks(CacheMasks):
    """``CacheMasks`` that also records every layer's queries (``Recorder``) for the next recompression."""

    def __init__(self, cache: CompressedCache, recorder: Recorder):
        super().__init__(cache)
        self.recorder = recorder

    def attention(self, call: AttentionCall) -> Tensor:
        self.recorder.attention(call)
        return super().attention(call)


def cache_argument(model) -> str:
    """The name of the model's cache argument: ``cache`` from transformers 5.2x, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward(model, ids: Tensor, cache: Cache, **kwargs) -> Tensor:
    """Logits of ``model`` on ``ids`` with ``cache``."""
    return model(input_ids=ids, use_cache=True, **{cache_argument(model): cache}, **kwargs).logits


# ----------------------------------------------------------------------------- prefill, compress


def prefill(model, input_ids: Tensor) -> list[LayerKV]:
    """Every layer's cached K, V (after and before RoPE) and its queries of ``input_ids`` [B, T]
    (``prefill_layers``)."""
    device = input_device(model)
    recorder = Recorder(set(range(text_config(model.config).num_hidden_layers)), names=PREFILL_TENSORS)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), hooked(model, recorder):
        _forward(model, input_ids.to(device), cache, logits_to_keep=1)
    return prefill_layers(model, recorder, cache)


def prefill_layers(model, recorder: Recorder, cache: Cache) -> list[LayerKV]:
    """The layers of a prefill that ``recorder`` (every layer, every query) watched fill ``cache``:
    K, V float32 as the model's own cache holds them (a sliding-window layer keeps only the prompt's
    last tokens, ``LayerKV.offset`` says where they start, and that is what gets compressed), with
    the queries and keys before RoPE of the same tokens."""
    num_layers = text_config(model.config).num_hidden_layers
    missing = sorted(set(range(num_layers)) - set(recorder.records))
    if missing:
        raise KvcError(f"{type(model).__name__}: attention of layers {missing} was not seen; this "
                       "architecture does not use transformers' AttentionInterface")
    rope = recorder.rope_metadata(model)
    layers = []
    for L in range(num_layers):
        rec, kept = recorder.records.pop(L), cache.layers[L]
        T, device = rec["q"].shape[2], kept.keys.device
        offset = T - kept.keys.shape[2]
        k_pre = rec.get("k_pre")
        layers.append(LayerKV(layer=L, k=kept.keys.float(), v=kept.values.float(),
                              q=rec["q"][:, :, offset:].to(device, torch.float32),
                              q_positions=torch.arange(T - offset, device=device),
                              k_pre=None if k_pre is None else k_pre[:, :, offset:].to(device, torch.float32),
                              rope=rope, num_layers=num_layers, attention=recorder.specs[L],
                              offset=offset))
    return layers


@dataclass
class Compressed:
    """A compressed prefill: the cache layers and the stored bits (``Encoded.nbits``), fully counted."""

    layers: list[CompressedLayer]
    bits: int
    entries: int  # K entries + V entries
    bits_paper: list[float | None]
    proxies: list[Any] = field(default_factory=list)  # engine.LayerResult per layer, when measured

    def cache(self) -> CompressedCache:
        return CompressedCache([layer.fresh() for layer in self.layers])


def compress(compressor: Compressor, layers: Sequence[LayerKV], dtype: torch.dtype,
             measure: bool = False, query_stride: int = 1) -> Compressed:
    """Every layer through the method (``engine.encode_decode``); ``measure``: with the compress
    engine's metrics too (from every ``query_stride``-th query, ``engine.measure``)."""
    out, bits, entries, paper, proxies = [], 0, 0, [], []
    by_index = {layer.layer: layer for layer in layers}
    for group in engine.groups(compressor, list(by_index), layers[0].num_layers):
        members = [by_index[L] for L in group]
        with torch.inference_mode():
            results = engine.encode_decode_group(compressor, members)
        for layer, (encoded, decoded, head_bits) in zip(members, results):
            if measure:
                with torch.inference_mode():
                    proxies.append(engine.measure(layer, encoded, decoded, head_bits, query_stride))
            out.append(decoded_layer(decoded, layer, dtype))
            bits += encoded.nbits()
            entries += 2 * layer.entries
            paper.append(encoded.bits_paper)
    return Compressed(out, bits, entries, paper, proxies)


# ----------------------------------------------------------------------------- scoring


def continuation_logprobs(model, cache: CompressedCache, ids: Tensor) -> Tensor:
    """log p [B, N, V] of the next token after each of ``ids`` [B, N], fed after ``cache``."""
    with torch.inference_mode(), hooked(model, CacheMasks(cache)):
        return _forward(model, ids.to(cache.layers[0].keys.device), cache).float().log_softmax(-1)


def token_positions(cl: CompressedLayer) -> Tensor:
    """[B, H, P + A]: the absolute position of every token a layer holds (prefix slots, then appended)."""
    B, H, K, _ = cl.keys.shape
    device = cl.keys.device
    slots = torch.arange(cl.prefix, device=device).expand(B, H, -1) if cl.slots is None else cl.slots
    appended = cl.length + torch.arange(K - cl.prefix, device=device)
    return torch.cat([slots + cl.offset, appended.expand(B, H, -1)], -1)


def cache_layers(cache: CompressedCache, recorder: Recorder, rope: dict | None, num_layers: int) -> list[LayerKV]:
    """The cache as the method sees it at a recompression, one ``LayerKV`` per layer: its live
    tokens (the decoded prefix, compacted per KV head as ``CompressedLayer`` holds it, then the tokens
    appended since) in order, K after RoPE at their true positions and K before RoPE by undoing it,
    and the queries of the appended tokens (``recorder``). Key j of the layer is its j-th live
    token, so the appended tokens' queries sit at P + 0..A-1 and see every earlier token (causal)."""
    layers = []
    for L, cl in enumerate(cache.layers):
        appended = cl.keys.shape[-2] - cl.prefix
        device = cl.keys.device
        positions = token_positions(cl)
        k = cl.keys.float()
        layers.append(LayerKV(
            layer=L, k=k, v=cl.values.float(), q=recorder.records.pop(L)["q"].to(device, torch.float32),
            q_positions=cl.prefix + torch.arange(appended, device=device),
            k_pre=None if rope is None else apply_rope(k, positions, rope, L, inverse=True),
            rope=rope, num_layers=num_layers, attention=cl.spec, seen=cl.length - cl.offset + appended))
    return layers


def recompress(compressor: Compressor, cache: CompressedCache, recorder: Recorder, rope: dict | None,
               dtype: torch.dtype) -> Compressed:
    """The cache after one more pass of the method (``kvc eval --decode-every``): every layer's live
    tokens (``cache_layers``) through ``engine.encode_decode_group``; keys the method decoded before
    RoPE are rotated at their true positions; a token evicted now or earlier stays out (docs/eval.md)."""
    layers = cache_layers(cache, recorder, rope, len(cache.layers))
    out, bits, entries, paper = [], 0, 0, []
    for group in engine.groups(compressor, [l.layer for l in layers], len(layers)):
        members = [layers[L] for L in group]
        with torch.inference_mode():
            results = engine.encode_decode_group(compressor, members)
        for layer, (encoded, decoded, _) in zip(members, results):
            cl = cache.layers[layer.layer]
            B, H, K, D = layer.shape
            appended = K - cl.prefix
            positions = token_positions(cl)
            live = torch.ones(B, H, K, dtype=torch.bool, device=layer.k.device)
            if cl.valid is not None:
                live[..., :cl.prefix] = cl.valid
            if decoded.keep is not None:
                live &= decoded.keep
            k = (decoded.k if decoded.k_pre is None or rope is None
                 else apply_rope(decoded.k_pre, positions, rope, layer.layer))
            index, valid = kept_slots(live)
            rows = index[..., None].expand(-1, -1, -1, D)
            out.append(CompressedLayer(k.gather(2, rows).to(dtype), decoded.v.gather(2, rows).to(dtype),
                                       None if bool(valid.all()) else valid, cl.length + appended,
                                       positions.gather(2, index), 0, cl.spec))
            bits += encoded.nbits()
            entries += 2 * B * H * layer.seen * D  # per token seen, evicted ones included, as for a prefill
            paper.append(encoded.bits_paper)
    return Compressed(out, bits, entries, paper)


def decoding_logprobs(model, compressor: Compressor, cache: CompressedCache, ids: Tensor, every: int,
                      rope: dict | None, dtype: torch.dtype, res: "MethodResult") -> Tensor:
    """log p [B, N, V] of the next token after each of ``ids`` [B, N] fed after ``cache`` in blocks of
    ``every`` tokens, the cache recompressed by the method after each block but the last
    (``recompress``; its bits counted under the task "decoding")."""
    logps = []
    for start in range(0, ids.shape[1], every):
        recorder = Recorder(set(range(len(cache.layers))), names=("q",))
        with torch.inference_mode(), hooked(model, RecordingMasks(cache, recorder)):
            logps.append(_forward(model, ids[:, start:start + every].to(cache.layers[0].keys.device),
                                  cache).float().log_softmax(-1))
        if start + every < ids.shape[1]:
            compressed = recompress(compressor, cache, recorder, rope, dtype)
            res.count("decoding", compressed)
            res.recompressions += 1
            cache = compressed.cache()
    return torch.cat(logps, 1)


def greedy(model, cache: CompressedCache, prompt: Tensor, steps: int) -> Tensor:
    """Greedy continuation [B, steps] of ``prompt`` [B, Q] fed after ``cache``."""
    tokens, x = [], prompt.to(cache.layers[0].keys.device)
    with torch.inference_mode(), hooked(model, CacheMasks(cache)):
        for _ in range(steps):
            x = _forward(model, x, cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
            tokens.append(x)
    return torch.cat(tokens, dim=1).cpu()


@dataclass
class TokenStats:
    """Sums over scored tokens: NLL of the baseline and the method, KL(base || method), top-1 agreement."""

    tokens: int = 0
    nll_base: float = 0.0
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0

    def add(self, base: Tensor, logp: Tensor, targets: Tensor) -> None:
        target = targets[..., None].to(base.device)
        self.tokens += targets.numel()
        self.nll_base -= float(base.gather(-1, target).sum())
        self.nll -= float(logp.gather(-1, target).sum())
        self.kl += float((base.exp() * (base - logp)).sum())  # KL(p || q) = sum p log(p / q)
        self.agree += int((base.argmax(-1) == logp.argmax(-1)).sum())

    def report(self) -> dict[str, float]:
        ppl_base, ppl = math.exp(self.nll_base / self.tokens), math.exp(self.nll / self.tokens)  # ppl = exp(mean NLL)
        return {"tokens": self.tokens, "ppl_base": ppl_base, "ppl": ppl, "delta": ppl - ppl_base,
                "delta_rel": ppl / ppl_base - 1, "kl": self.kl / self.tokens,
                "top1_agree": self.agree / self.tokens}


# ----------------------------------------------------------------------------- prompts


def corpus_ids(tokenizer, corpus: Corpus, needed: int) -> list[int]:
    """At least ``needed`` token ids from the start of the corpus (tokenizing only what it takes)."""
    chars = needed * 6
    while True:
        ids = tokenizer(corpus.text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= needed or chars >= len(corpus.text):
            break
        chars *= 2
    if len(ids) < needed:
        raise KvcError(f"{corpus.source} has {len(ids)} tokens; these settings need {needed}: give "
                       "more text (--text) or ask for fewer/shorter contexts")
    return ids[:needed]


@dataclass
class Needle:
    """A planted fact, "The pass code of the blue door is 4821.", and its question."""

    subject: str
    code: str

    @property
    def fact(self) -> str:
        return f" The {self.subject} is {self.code}."

    @property
    def question(self) -> str:
        return f"\n\nThe {self.subject} is"


class Prompts:
    """Needle prompts built at the token level, so every prompt of a length has exactly that length.

    Each fact of a multi-needle context has its own subject template: a 135M model retrieves by
    matching the question's wording, and cannot tell "the blue door" from "the red door" apart.
    """

    def __init__(self, tokenizer, haystack: list[int], seed: int = PROMPT_SEED):
        self.tok = tokenizer
        self.haystack = haystack
        self.rng = random.Random(seed)
        pieces = tokenizer.batch_decode([[i] for i in haystack])
        self.boundaries = [i + 1 for i, p in enumerate(pieces) if p.rstrip(" ").endswith((".", "\n"))]
        self.answer_steps = len(self.encode(" 0000"))
        self.pad = self.encode("\n")[-1]

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def needles(self, k: int) -> list[Needle]:
        """k facts with distinct subjects, random colors and 4-digit codes."""
        return [Needle(subject.format(self.rng.choice(COLORS)), str(self.rng.randint(1000, 9999)))
                for subject in self.rng.sample(SUBJECTS, k)]

    def questions(self, needles: Sequence[Needle]) -> Tensor:
        """[k, Q]: each needle's question, left-padded with newlines to one length."""
        ids = [self.encode(n.question) for n in needles]
        width = max(map(len, ids))
        return torch.tensor([[self.pad] * (width - len(q)) + q for q in ids])

    def context(self, start: int, length: int, needles: Sequence[tuple[float, Needle]]) -> list[int]:
        """``length`` tokens of haystack from ``start``, each needle at the sentence start at or before its depth."""
        facts = [self.encode(n.fact) for _, n in needles]
        hay = self.haystack[start:start + length - sum(map(len, facts))]
        starts = [0] + [b - start for b in self.boundaries if 0 < b - start < len(hay)] + [len(hay)]
        cuts = [max(b for b in starts if b <= round(d * len(hay))) for d, _ in needles]
        out, last = [], 0
        for cut, fact in sorted(zip(cuts, facts), key=lambda x: x[0]):
            out += hay[last:cut] + fact
            last = cut
        return out + hay[last:]

    def retrieved(self, tokens: Tensor, needles: Sequence[Needle]) -> list[bool]:
        """Whether each greedy answer starts with the needle's code."""
        texts = self.tok.batch_decode(tokens.tolist())
        return [bool(m) and m.group(1) == n.code for m, n in
                zip((re.match(r"\s*(\d+)", t) for t in texts), needles)]


# ----------------------------------------------------------------------------- the evaluation


@dataclass
class MethodResult:
    """Running totals of one method across the evaluation."""

    ppl: dict[int, TokenStats] = field(default_factory=dict)
    bits: dict[str, list[int]] = field(default_factory=lambda: {"perplexity": [0, 0], "retrieval": [0, 0]})
    bits_paper: list[float | None] = field(default_factory=list)
    proxies: list[Any] = field(default_factory=list)
    single: dict[tuple[int, float], list[bool]] = field(default_factory=dict)
    multi: dict[int, list[bool]] = field(default_factory=dict)
    seconds: float = 0.0
    recompressions: int = 0  # cache recompressions during decoding (--decode-every)

    def count(self, task: str, c: Compressed) -> None:
        bits = self.bits.setdefault(task, [0, 0])
        bits[0] += c.bits
        bits[1] += c.entries
        self.bits_paper += c.bits_paper


def _grid(cells: dict, lengths, depths) -> list[list[float]]:
    return [[sum(cells[(L, d)]) / len(cells[(L, d)]) for L in lengths] for d in depths]


def evaluate(model, tokenizer, corpus: Corpus, compressors: Sequence[Compressor],
             settings: Settings = Settings(), measure: bool = False,
             progress: Callable[[str], None] | None = None, query_stride: int = 1) -> list[dict[str, Any]]:
    """Perplexity and retrieval of each compressor against the uncompressed cache; one dict each.

    The prefills and the baseline are shared by all compressors. ``measure``: also the compress
    engine's tensor metrics on the perplexity prefills (the proxies of ``kvc compress``), from every
    ``query_stride``-th query.
    """
    check(settings)
    check_model(model.config, settings)
    dtype = next(model.parameters()).dtype
    tick = progress or (lambda _: None)
    results = [MethodResult() for _ in compressors]
    base_single: dict[tuple[int, float], list[bool]] = {}
    base_multi: dict[int, list[bool]] = {}
    prefix = framing(tokenizer, settings.special_tokens).prefix  # a causal LM's context gets no suffix
    n_ppl = sum(settings.windows * (C + settings.continuation + 1 - len(prefix)) for C in settings.contexts)
    ids = corpus_ids(tokenizer, corpus, n_ppl + (settings.trials * max(settings.contexts)
                                                  if settings.retrieval else 0))

    def run_all(layers: list[LayerKV], task: str, score: Callable[..., Any], measured: bool = False) -> list[Any]:
        """score(cache, compressor, result) of each compressor's compressed prefill."""
        outs = []
        for compressor, res in zip(compressors, results):
            start = time.perf_counter()
            c = compress(compressor, layers, dtype, measure=measured, query_stride=query_stride)
            res.count(task, c)
            res.proxies += c.proxies
            cache = c.cache()
            del c  # the decoded prefix is then the cache's alone: each layer's append frees it, no second copy
            outs.append(score(cache, compressor, res))
            del cache
            res.seconds += time.perf_counter() - start
            tick(f"{task}: {compressor.name}")
        return outs

    offset = 0
    for C in settings.contexts:  # perplexity
        body = C + settings.continuation + 1 - len(prefix)
        windows = torch.tensor([prefix + ids[offset + i * body:offset + (i + 1) * body]
                                for i in range(settings.windows)])
        offset += settings.windows * body
        layers = prefill(model, windows[:, :C])
        fed, targets = windows[:, C:-1], windows[:, C + 1:]
        base = continuation_logprobs(model, uncompressed_cache(layers, dtype), fed)
        tick(f"perplexity {C}: prefill")
        rope = layers[0].rope

        def score(cache: CompressedCache, compressor: Compressor, res: MethodResult) -> Tensor:
            if settings.decode_every is None:
                return continuation_logprobs(model, cache, fed)
            return decoding_logprobs(model, compressor, cache, fed, settings.decode_every, rope, dtype, res)

        for res, logp in zip(results, run_all(layers, "perplexity", score, measure)):
            res.ppl.setdefault(C, TokenStats()).add(base, logp, targets)
        del layers, base

    if settings.retrieval:
        prompts = Prompts(tokenizer, ids[n_ppl:])
        for L in settings.contexts:
            for trial in range(settings.trials):
                start = trial * max(settings.contexts)
                needles = [prompts.needles(1)[0] for _ in settings.depths]
                batch = torch.tensor([prefix + prompts.context(start, L - len(prefix), [(d, n)])
                                      for d, n in zip(settings.depths, needles)])
                for key, found in _retrieve(model, prompts, batch, needles, dtype, run_all):
                    for d, ok in zip(settings.depths, found):
                        (base_single if key is None else results[key].single).setdefault((L, d), []).append(ok)
                tick(f"needle {L}: trial {trial + 1}")
                if settings.needles:
                    needles = prompts.needles(settings.needles)
                    depths = [(i + 0.5) / settings.needles for i in range(settings.needles)]
                    batch = torch.tensor([prefix + prompts.context(start, L - len(prefix), list(zip(depths, needles)))])
                    for key, found in _retrieve(model, prompts, batch, needles, dtype, run_all):
                        (base_multi if key is None else results[key].multi).setdefault(L, []).extend(found)
                    tick(f"multi-needle {L}: trial {trial + 1}")

    return [_report(c, r, settings, base_single, base_multi, dtype) for c, r in zip(compressors, results)]


def _retrieve(model, prompts: Prompts, batch: Tensor, needles: Sequence[Needle], dtype, run_all):
    """(None, baseline hits), then (i, hits of compressor i); one context serves several questions."""
    layers = prefill(model, batch)
    question = prompts.questions(needles)
    repeat = question.shape[0] // batch.shape[0]

    def answer(cache: CompressedCache, *_) -> list[bool]:
        return prompts.retrieved(greedy(model, cache.repeat(repeat), question, prompts.answer_steps), needles)

    yield None, answer(uncompressed_cache(layers, dtype))
    yield from enumerate(run_all(layers, "retrieval", answer))


def check(s: Settings) -> None:
    """Refuse impossible settings with one clear line."""
    if not s.contexts or min(s.contexts) < 16:
        raise KvcError("--contexts must be lengths of at least 16 tokens")
    if s.windows < 1 or s.continuation < 1:
        raise KvcError("--windows and --continuation must be >= 1")
    if s.retrieval and (s.trials < 1 or not s.depths or not all(0 <= d <= 1 for d in s.depths)):
        raise KvcError("--trials must be >= 1 and --depths fractions in [0, 1]")
    if s.needles < 0 or s.needles > len(SUBJECTS):
        raise KvcError(f"--needles must lie in 0..{len(SUBJECTS)}")
    every = s.decode_every
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise KvcError(f"--decode-every must be a positive integer (tokens), not {every!r}")


def check_model(config, s: Settings) -> None:
    """Refuse, from its config alone, a model kvc eval cannot run: an encoder, or one whose positions
    do not cover the longest sequence the settings need."""
    if not is_causal_lm(config):
        kind = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise KvcError(f"kvc eval scores a causal LM's next-token predictions; {kind} is an encoder "
                       "(bidirectional attention, no cache to compress during decoding)")
    check_positions(config, longest_sequence(s), "--contexts")


def longest_sequence(s: Settings) -> int:
    """Tokens of the longest sequence the model sees: a context and its continuation, or a needle
    context, its question and the answer (bounded by ANSWER_TOKENS)."""
    return max(s.contexts) + max(s.continuation + 1, ANSWER_TOKENS if s.retrieval else 0)


def steps(s: Settings, methods: int) -> int:
    """Progress ticks of ``evaluate`` for ``methods`` compressors."""
    groups = len(s.contexts) * s.trials * (1 + (s.needles > 0)) if s.retrieval else 0
    return len(s.contexts) * (1 + methods) + groups * (1 + methods)


def _report(compressor: Compressor, r: MethodResult, s: Settings, base_single, base_multi,
            dtype: torch.dtype) -> dict[str, Any]:
    total = TokenStats()
    for stats in r.ppl.values():
        for f in dataclasses.fields(TokenStats):
            setattr(total, f.name, getattr(total, f.name) + getattr(stats, f.name))
    bits = {task: b / e if e else None for task, (b, e) in r.bits.items()}
    prefills = [x for task, x in r.bits.items() if task != "decoding"]  # the compressed prompts
    all_bits, all_entries = sum(b for b, _ in prefills), sum(e for _, e in prefills)
    out: dict[str, Any] = {
        "method": compressor.name, "params": compressor.params(),
        "bits_per_entry": all_bits / all_entries, "baseline_bits_per_entry": torch.finfo(dtype).bits,
        "bits_per_entry_paper": (None if any(p is None for p in r.bits_paper)
                                 else sum(r.bits_paper) / len(r.bits_paper)),
        "perplexity": {**total.report(), "bits_per_entry": bits["perplexity"],
                       "contexts": [{"context": C, **st.report()} for C, st in r.ppl.items()]},
        "settings": {**dataclasses.asdict(s), "prompt_seed": PROMPT_SEED},
        "seconds": round(r.seconds, 3)}
    if s.decode_every is not None:
        out["decoding"] = {"every": s.decode_every, "recompressions": r.recompressions,
                           "bits_per_entry": bits.get("decoding")}
    if r.proxies:
        run = engine.RunResult(compressor.name, compressor.params(), {}, r.proxies, "", "", 0.0)
        out["proxies"] = engine.aggregate(run.heads())
    if s.retrieval:
        depths, lengths = list(s.depths), list(s.contexts)
        single = {"lengths": lengths, "depths": depths,
                  "accuracy_base": _grid(base_single, lengths, depths),
                  "accuracy": _grid(r.single, lengths, depths),
                  "overall_base": _mean(base_single), "overall": _mean(r.single)}
        out["retrieval"] = {"bits_per_entry": bits["retrieval"], "single": single}
        if s.needles:
            out["retrieval"]["multi"] = {
                "needles": s.needles, "lengths": lengths,
                "accuracy_base": [sum(base_multi[L]) / len(base_multi[L]) for L in lengths],
                "accuracy": [sum(r.multi[L]) / len(r.multi[L]) for L in lengths],
                "overall_base": _mean(base_multi), "overall": _mean(r.multi)}
    return out


def _mean(cells: dict) -> float:
    hits = [x for v in cells.values() for x in v]
    return sum(hits) / len(hits)


def end_to_end(model, tokenizer, corpus: Corpus, compressors: Sequence[Compressor],
               settings: Settings = Settings(contexts=(512,), retrieval=False)) -> list[dict[str, float | None]]:
    """The end-to-end columns ``kvc sweep`` adds per method: perplexity delta (relative), next-token
    KL and top-1 agreement against the uncompressed cache, needle accuracy when measured."""
    rows = []
    for r in evaluate(model, tokenizer, corpus, compressors, settings):
        single = r.get("retrieval", {}).get("single")
        rows.append({"e2e_bits_per_entry": r["bits_per_entry"], "ppl_delta_rel": r["perplexity"]["delta_rel"],
                     "next_token_kl": r["perplexity"]["kl"], "top1_agree": r["perplexity"]["top1_agree"],
                     "needle_accuracy": single["overall"] if single else None})
    return rows


def plot_retrieval(result: dict[str, Any], path, force: bool = False) -> None:
    """Depth x length heatmaps of needle accuracy, uncompressed beside the method (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = result["retrieval"]["single"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(single["lengths"]), 0.6 * len(single["depths"]) + 2),
                             sharey=True, constrained_layout=True)
    for ax, key, title in zip(axes, ("accuracy_base", "accuracy"), ("uncompressed", result["method"])):
        grid = single[key]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(single["lengths"])), single["lengths"])
        ax.set_yticks(range(len(single["depths"])), [f"{d:g}" for d in single["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(f"{title}: {single['overall_base' if key == 'accuracy_base' else 'overall']:.0%}")
    axes[0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes, label="retrieval accuracy")
    fig.suptitle(f"needle retrieval, {result['method']} at {result['bits_per_entry']:.2f} bits per entry")
    with atomic_path(path, force) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
