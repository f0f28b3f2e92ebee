"""Run a compressor over a capture layer by layer, audit its bits, measure it; the compressed file.

Streaming: one layer (one group of layers, for a method that stores arrays shared by adjacent
layers: ``Compressor.groups``) is loaded, encoded, decoded, measured and freed before the next. The decode
always reads the JSON round trip of the method's metadata, exactly what ``kvc decompress`` reads.

Bit accounting: every array of ``Encoded`` counts. Arrays named ``k``/``k.*`` belong to K,
``v``/``v.*`` to V; any other array (eviction indices, shared tables) is split evenly between them.
Per head, a method's ``head_bits`` is used when it offers one, else each tensor's bits are split
evenly over the KV heads.

The compressed file's layout is kvc.io.compressed's; ``decompress`` rebuilds the method from it,
checks its options and geometry before decoding and audits every decoded layer.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .. import __version__
from ..io import schema
from ..io.capture import CaptureFile, CaptureMeta, tensor_key
from ..io.compressed import CompressedFile, array_key, compressed_metadata
from ..errors import KvcError, MethodFailure
from ..io.safetensors import SAFETENSORS_DTYPES, StreamingSafetensorsWriter, save_safetensors
from ..rope import apply_rope
from .options import method_options
from .protocol import Compressor, Decoded, Encoded, LayerKV, check_finite
from .registry import build, get
from ..metrics.fidelity import layer_metrics

TENSORS = ("k", "v", "kv")
META_SLACK_BYTES = 1024  # JSON metadata allowed per layer beyond 1% of its array bytes


# ----------------------------------------------------------------------------- layers


def load_layer(capture: CaptureFile, layer: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> LayerKV:
    """One layer of a capture on ``device`` in ``dtype`` (keys before RoPE when stored)."""
    k_pre = capture.tensor(layer, "k_pre", dtype, device) if capture.has(layer, "k_pre") else None
    return LayerKV(layer=layer, k=capture.tensor(layer, "k", dtype, device),
                   v=capture.tensor(layer, "v", dtype, device), q=capture.tensor(layer, "q", dtype, device),
                   q_positions=capture.q_positions.to(device), k_pre=k_pre, rope=capture.meta.rope,
                   num_layers=capture.meta.num_layers, attention=capture.meta.layer_attention(layer))


def shell_layer(meta: CaptureMeta, layer: int, device: torch.device | str = "cpu") -> LayerKV:
    """A layer with the capture's shapes and RoPE but zero data (views of one zero, nothing
    allocated): what decoding needs."""
    zero = torch.zeros((), device=device)
    kv = zero.expand(meta.num_seqs, meta.num_kv_heads, meta.seq_len, meta.head_dim)
    return LayerKV(layer=layer, k=kv, v=kv, q=zero.expand(meta.num_seqs, meta.num_heads, 0, meta.head_dim),
                   q_positions=torch.zeros(0, dtype=torch.int64, device=device),
                   k_pre=kv if meta.rope is not None else None, rope=meta.rope,
                   num_layers=meta.num_layers, attention=meta.layer_attention(layer))


# ----------------------------------------------------------------------------- bits


def tensor_bits(encoded: Encoded) -> dict[str, float]:
    """Stored bits of K and of V (arrays of neither are split evenly between them)."""
    own = {t: sum(a.numel() * a.element_size() * 8 for n, a in encoded.arrays.items()
                  if n == t or n.startswith(f"{t}.")) for t in ("k", "v")}
    shared = encoded.nbits() - own["k"] - own["v"]
    return {t: own[t] + shared / 2 for t in own}


def head_bits(compressor: Compressor, encoded: Encoded, layer: LayerKV) -> dict[str, Tensor]:
    """Stored bits per KV head [H] of K and V, audited against the arrays' total."""
    H = layer.shape[1]
    totals = tensor_bits(encoded)
    offered = compressor.head_bits(encoded, layer)
    if offered is None:
        return {t: torch.full((H,), totals[t] / H, dtype=torch.float64) for t in totals}
    bits = {t: offered[t].detach().double().cpu() for t in totals}
    for t in totals:
        if bits[t].shape != (H,) or not math.isclose(float(bits[t].sum()), totals[t], rel_tol=1e-9, abs_tol=1):
            raise MethodFailure(f"method {compressor.name}: per-head bits of {t} sum to "
                                f"{float(bits[t].sum()):.0f}, but its arrays hold {totals[t]:.0f} bits")
    return bits


# ----------------------------------------------------------------------------- one layer


@dataclass
class LayerResult:
    layer: int
    bits: dict[str, Tensor]  # "k", "v" -> stored bits per KV head [H]
    entries: int  # entries per KV head and tensor: S * T * D
    bits_paper: float | None
    metrics: dict[str, dict[str, Tensor]]  # "k", "v", "kv" -> metric -> [H]
    evicts: bool  # the method marked tokens as evicted (Decoded.keep)


def _json_meta(name: str, layer: int, meta: dict) -> dict:
    try:
        return json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise MethodFailure(f"method {name}: layer {layer} metadata is not plain JSON ({err}); "
                            "tensors belong in Encoded.arrays") from err


def _audit(compressor: Compressor, layer: LayerKV, encoded: Encoded, decoded: Decoded) -> None:
    """Fail loudly on wrong shapes, NaN/Inf, data hidden in metadata, bits below those asked, or
    K and V returned unchanged below 16 bits per entry."""
    name, L = compressor.name, layer.layer
    S, H, T, D = layer.shape
    for label, t, shape in (("k", decoded.k, (S, H, T, D)), ("v", decoded.v, (S, H, T, D)),
                            ("keep", decoded.keep, (S, H, T))):
        if t is not None and tuple(t.shape) != shape:
            raise MethodFailure(f"method {name} decoded {label} of shape {tuple(t.shape)} in layer {L}, "
                                f"expected {shape}")
    check_finite(name, L, decoded.k)
    check_finite(name, L, decoded.v)
    meta_bytes = len(json.dumps(encoded.meta))
    if meta_bytes > META_SLACK_BYTES + encoded.nbits() / 8 / 100:
        raise MethodFailure(f"method {name} keeps {meta_bytes} bytes of JSON metadata in layer {L}; "
                            "data belongs in Encoded.arrays, where it is counted")
    asked = getattr(compressor.options, "bits", None)
    bpe = encoded.nbits() / (2 * layer.entries)
    if isinstance(asked, (int, float)) and not isinstance(asked, bool):
        if decoded.keep is None and bpe < asked - 1e-9:
            raise MethodFailure(f"method {name} was asked for {asked} bits per entry but stores "
                                f"{bpe:.4f} in layer {L}")
        if asked < 16 <= bpe:
            raise MethodFailure(f"method {name} was asked for {asked} bits per entry but stores "
                                f"{bpe:.2f} in layer {L}: compression was not applied")
    if bpe < 16 and torch.equal(decoded.k, layer.k) and torch.equal(decoded.v, layer.v):
        raise MethodFailure(f"method {name} returned K and V unchanged at {bpe:.2f} bits per "
                            f"entry in layer {L}: compression was not applied")


def encode_decode(compressor: Compressor, layer: LayerKV) -> tuple[Encoded, Decoded, dict[str, Tensor]]:
    """The one audited path of a layer through a method (``encode_decode_group`` of one layer)."""
    return encode_decode_group(compressor, [layer])[0]


def groups(compressor: Compressor, layers: list[int], num_layers: int) -> list[list[int]]:
    """The method's groups of ``layers`` (``Compressor.groups``), checked to cover them in order."""
    cut = compressor.groups(list(layers), num_layers)
    if [L for group in cut for L in group] != list(layers) or not all(cut):
        raise MethodFailure(f"method {compressor.name} grouped layers {list(layers)} as {cut}")
    return cut


def encode_decode_group(compressor: Compressor, layers: list[LayerKV]
                        ) -> list[tuple[Encoded, Decoded, dict[str, Tensor]]]:
    """The one audited path of a group of layers (``Compressor.groups``; one layer for most methods)
    through a method (``kvc compress``, ``kvc eval``, ``kvc.compressing``): validate, encode, decode
    through the JSON round trip of the metadata (what ``kvc decompress`` reads), audit (``_audit``,
    ``head_bits``).

    Returns per layer the stored arrays, the reconstruction and the stored bits per KV head [H] of K and V.
    """
    for layer in layers:
        compressor.validate(layer)
    raw = compressor.encode_group(layers)
    encoded = [Encoded(r.arrays, _json_meta(compressor.name, layer.layer, r.meta), r.bits_paper)
               for r, layer in zip(raw, layers)]
    decoded = compressor.decode_group(encoded, layers)
    if not len(raw) == len(decoded) == len(layers):
        raise MethodFailure(f"method {compressor.name} returned {len(raw)} encoded and {len(decoded)} decoded "
                            f"layers for the group {[layer.layer for layer in layers]}")
    out = []
    for layer, enc, dec in zip(layers, encoded, decoded):
        _audit(compressor, layer, enc, dec)
        out.append((enc, dec, head_bits(compressor, enc, layer)))
    return out


def measure(layer: LayerKV, encoded: Encoded, decoded: Decoded, bits: dict[str, Tensor],
            query_stride: int = 1) -> LayerResult:
    """The tensor metrics of one encoded and decoded layer (``encode_decode``).

    The metrics use every ``query_stride``-th captured query.
    """
    metrics = layer_metrics(layer.k, decoded.k, layer.v, decoded.v, layer.q[:, :, ::query_stride],
                            layer.q_positions[::query_stride], decoded.keep, layer.attention)
    metrics = {t: {m: x.detach().cpu() for m, x in ms.items()} for t, ms in metrics.items()}
    S, H, T, D = layer.shape
    return LayerResult(layer.layer, bits, S * T * D, encoded.bits_paper, metrics, decoded.keep is not None)


# ----------------------------------------------------------------------------- a run


def _value(x: float) -> float | None:
    return x if math.isfinite(x) else None


def aggregate(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """Mean of every metric over head rows, per tensor (NaN/None ignored)."""
    out: dict[str, dict[str, float | None]] = {}
    for t in TENSORS:
        mine = [r for r in rows if r["tensor"] == t]
        names = [n for n in (mine[0] if mine else {}) if n not in ("layer", "head", "tensor")]
        out[t] = {}
        for n in names:
            values = [r[n] for r in mine if r[n] is not None]
            out[t][n] = _value(sum(values) / len(values)) if values else None
    return out


@dataclass
class RunResult:
    method: str
    params: dict[str, Any]
    source: dict[str, Any]
    layers: list[LayerResult]
    device: str
    dtype: str
    seconds: float
    encoded: dict[int, Encoded] = field(default_factory=dict)

    def bits_per_entry(self, tensor: str = "kv") -> float:
        """Fully counted stored bits per entry of K, V or both ("kv")."""
        parts = ("k", "v") if tensor == "kv" else (tensor,)
        bits = sum(float(r.bits[t].sum()) for r in self.layers for t in parts)
        entries = sum(r.entries * len(r.bits[t]) for r in self.layers for t in parts)
        return bits / entries

    def bits_per_entry_paper(self) -> float | None:
        papers = [r.bits_paper for r in self.layers]
        return None if any(p is None for p in papers) else sum(papers) / len(papers)

    def heads(self) -> list[dict[str, Any]]:
        """One row per (layer, KV head, tensor) with bits per entry and the metrics."""
        rows = []
        for r in self.layers:
            for h in range(len(r.bits["k"])):
                for t in TENSORS:
                    bits = (float(r.bits["k"][h] + r.bits["v"][h]) / 2 if t == "kv"
                            else float(r.bits[t][h])) / r.entries
                    rows.append({"layer": r.layer, "head": h, "tensor": t, "bits_per_entry": bits,
                                 **{m: _value(float(x[h])) for m, x in r.metrics[t].items()}})
        return rows

    def to_json(self) -> dict[str, Any]:
        heads = self.heads()
        summary = aggregate(heads)
        for t in TENSORS:
            summary[t]["bits_per_entry"] = self.bits_per_entry(t)
        return {"method": self.method, "params": self.params,
                "bits_per_entry": self.bits_per_entry(), "bits_per_entry_paper": self.bits_per_entry_paper(),
                "summary": summary, "heads": heads, "capture": self.source,
                "run": {"device": self.device, "dtype": self.dtype, "seconds": round(self.seconds, 3),
                        "kvc_version": __version__}}


def run(compressor: Compressor, capture: CaptureFile, layers: list[int] | None = None,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, keep_encoded: bool = False,
        query_stride: int = 1, progress: Callable[[int], None] | None = None) -> RunResult:
    """Compress and measure ``layers`` (default all) of a capture; keep the CPU arrays if asked."""
    layers = capture.layers if layers is None else layers
    missing = sorted(set(layers) - set(capture.layers))
    if missing:
        raise KvcError(f"{capture.path} has no layers {missing}; it holds {capture.layers}")
    start = time.perf_counter()
    results, encoded = [], {}
    for group in groups(compressor, layers, capture.meta.num_layers):
        loaded = [load_layer(capture, L, device, dtype) for L in group]
        for layer, (enc, dec, bits) in zip(loaded, encode_decode_group(compressor, loaded)):
            results.append(measure(layer, enc, dec, bits, query_stride))
            if keep_encoded:
                encoded[layer.layer] = Encoded({n: a.detach().to("cpu", copy=True) for n, a in enc.arrays.items()},
                                               enc.meta, enc.bits_paper)
            if progress:
                progress(layer.layer)
        del loaded
    meta = capture.meta
    source = {"path": str(capture.path), "model": meta.model, "layers": list(layers),
              "num_seqs": meta.num_seqs, "seq_len": meta.seq_len, "num_heads": meta.num_heads,
              "num_kv_heads": meta.num_kv_heads, "head_dim": meta.head_dim,
              "query_positions": int(capture.q_positions.numel()), "query_stride": query_stride}
    return RunResult(compressor.name, compressor.params(), source, results, str(device),
                     str(dtype).removeprefix("torch."), time.perf_counter() - start, encoded)


# ----------------------------------------------------------------------------- compressed file


def write_compressed(path: str | os.PathLike, result: RunResult, capture: CaptureFile,
                     force: bool = False) -> None:
    """The compressed form of a run (``keep_encoded=True``), written atomically."""
    tensors = {array_key(L, name): a for L, enc in result.encoded.items() for name, a in enc.arrays.items()}
    metadata = compressed_metadata(result.method, result.params,
                                   {L: (enc.meta, enc.bits_paper) for L, enc in result.encoded.items()},
                                   any(r.evicts for r in result.layers), capture.meta, result.bits_per_entry())
    save_safetensors(path, tensors, metadata, force)


def compressor_of(cf: CompressedFile) -> Compressor:
    """The method that wrote a compressed file, its options checked against their declared types and
    against the source's geometry (``validate``), before anything is decoded."""
    where = f"{cf.path}: metadata"
    try:
        cls = get(cf.method)
    except KvcError as err:
        raise KvcError(f"{where} method: {err}") from None
    try:
        compressor = build(cf.method, **method_options(cls, cf.params))
        for layer in cf.layers:
            compressor.validate(shell_layer(cf.source, layer))
    except KvcError as err:
        raise KvcError(f"{where} params: {err}") from None
    return compressor


def decode_group(compressor: Compressor, cf: CompressedFile, group: list[int],
                 device: torch.device | str = "cpu") -> list[Decoded]:
    """Decode one group of layers (``Compressor.groups``) of a compressed file and audit the result:
    data that the method cannot decode, or that decodes to the wrong shape or to NaN/Inf, is one
    error naming the layer."""
    src = cf.source
    shape = (src.num_seqs, src.num_kv_heads, src.seq_len, src.head_dim)
    where = ", ".join(map(str, group))
    try:
        decoded = compressor.decode_group([Encoded(cf.arrays(L, device), *cf.layer_meta(L)) for L in group],
                                          [shell_layer(src, L, device) for L in group])
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as err:  # the method read arrays or metadata that are not what it wrote
        why = str(err) if isinstance(err, KvcError) else f"{type(err).__name__}: {err}"
        raise KvcError(f"{cf.path}: layer {where} does not decode with {cf.method} (arrays or "
                       f"layers.{group[0]}.meta altered?): {why}") from err
    for layer, dec in zip(group, decoded):
        for label, t, want in (("k", dec.k, shape), ("v", dec.v, shape), ("keep", dec.keep, shape[:3])):
            if t is not None and tuple(t.shape) != want:
                raise KvcError(f"{cf.path}: layer {layer} decodes to {label} of shape {list(t.shape)}, but the "
                               f"source metadata needs {list(want)}")
        if not (torch.isfinite(dec.k).all() and torch.isfinite(dec.v).all()):
            raise KvcError(f"{cf.path}: layer {layer} decodes to NaN or Inf")
        if dec.keep is not None and not cf.evicts:
            raise KvcError(f"{cf.path}: metadata evicts is false, but {cf.method} evicts tokens in layer {layer}")
    return decoded


def decompress(path: str | os.PathLike, out: str | os.PathLike, device: torch.device | str = "cpu",
               queries: str | os.PathLike | None = None, force: bool = False,
               progress: Callable[[int], None] | None = None) -> CompressedFile:
    """Decode every layer of a compressed file into a capture-format v1 file.

    K, V (and K before RoPE, when the model has RoPE) are the reconstructions in float32; eviction
    methods add ``layers.{L}.keep`` (bool [S, H, T]). ``queries``: a capture of the same tokens
    whose q, q_pre, q_positions and input_ids are copied, so the result can be measured again.
    """
    cf = CompressedFile(path)
    src = cf.source
    kv_shape = (src.num_seqs, src.num_kv_heads, src.seq_len, src.head_dim)
    names = ["k", "v"] + (["k_pre"] if src.rope is not None else [])
    schema.check_allocation(4 * len(names) * math.prod(kv_shape), "decoding one layer in float32",
                            f"{cf.path} (source metadata {'x'.join(map(str, kv_shape))})")
    compressor = compressor_of(cf)
    specs = {tensor_key(L, n): (torch.float32, kv_shape) for L in cf.layers for n in names}
    if cf.evicts:
        specs.update({tensor_key(L, "keep"): (torch.bool, kv_shape[:3]) for L in cf.layers})
    source_q = _query_capture(queries, cf) if queries is not None else None
    if source_q is not None:
        specs.update(_query_specs(source_q, cf.layers))
    meta = {**src.to_strings(), "decompressed_from": json.dumps(
        {"file": str(cf.path), "method": cf.method, "params": cf.params})}
    with StreamingSafetensorsWriter(out, specs, meta, force=force) as writer:
        if source_q is not None:
            for key in ("q_positions", "input_ids"):
                if key in specs:
                    writer.write(key, 0, getattr(source_q, key))
        for L, decoded in ((L, d) for group in groups(compressor, cf.layers, src.num_layers)
                           for L, d in zip(group, decode_group(compressor, cf, group, device))):
            tensors = {"k": decoded.k, "v": decoded.v}
            if src.rope is not None:
                tensors["k_pre"] = (decoded.k_pre if decoded.k_pre is not None else apply_rope(
                    decoded.k, torch.arange(src.seq_len, device=decoded.k.device), src.rope, L, inverse=True))
            if cf.evicts:  # a layer the method left whole keeps every token
                tensors["keep"] = (decoded.keep if decoded.keep is not None
                                   else torch.ones(kv_shape[:3], dtype=torch.bool))
            if source_q is not None:
                tensors.update({n: source_q.tensor(L, n) for n in ("q", "q_pre") if source_q.has(L, n)})
            for n, t in tensors.items():
                writer.write(tensor_key(L, n), 0, t.to(specs[tensor_key(L, n)][0]))
            if progress:
                progress(L)
    return cf


def _query_capture(path: str | os.PathLike, cf: CompressedFile) -> CaptureFile:
    """The capture whose queries go with the compressed file's tokens (same geometry and text)."""
    capture = CaptureFile(path)
    mine, theirs = cf.source, capture.meta
    for key in ("num_seqs", "seq_len", "num_heads", "num_kv_heads", "head_dim", "text_sha256"):
        if getattr(mine, key) != getattr(theirs, key):
            raise KvcError(f"--queries {path}: {key} is {getattr(theirs, key)!r}, but the compressed "
                           f"file's source has {getattr(mine, key)!r}")
    return capture


def _query_specs(capture: CaptureFile, layers: list[int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    dtypes = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
    shapes = capture.shapes()
    keys = ["q_positions", "input_ids"] + [tensor_key(L, n) for L in layers for n in ("q", "q_pre")]
    return {k: (dtypes[shapes[k][1]], shapes[k][0]) for k in keys if k in shapes}
