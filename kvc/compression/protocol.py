"""The compressor protocol and its registry.

A compressor works on one layer's KV (all sequences and KV heads at once, batched):
``encode(layer) -> Encoded`` and ``decode(encoded) -> Decoded``. ``Encoded`` holds exactly the
arrays that would be stored (packed codes, fp16 norms and scales, codebooks, indices, fp16 tails), so
its size in bits is counted from the arrays themselves and cannot drift from what is written to disk.

Adding a method = one new module in ``kvc/compression/methods/`` that defines a ``Compressor``
subclass with a ``name``; the registry discovers it (then ``python -m kvc.compression.catalogue``
refreshes the torch-free list ``kvc methods`` shows). Options are a dataclass (``Options``) whose
fields are declared with :func:`option`: help text and valid values, checked in one place
(:func:`kvc.compression.fields.checked`) when the compressor is built and, for the constraints on
the head dimension, in :meth:`Compressor.validate`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..attention import AttentionSpec
from ..errors import KvcError, MethodFailure
from ..rope import apply_rope
from .fields import checked, option


@dataclass
class LayerKV:
    """One layer of a capture: keys after/before RoPE, values, and the real queries.

    k, k_pre, v: [S, H_kv, T, D]; q: [S, H_q, Tq, D] (after RoPE) at ``q_positions`` [Tq].
    ``rope`` is the capture's RoPE metadata (None on a model without RoPE); ``attention`` is the
    layer's mask and logit transform. Positions count from the layer's first token, which sits at
    absolute (RoPE) position ``offset`` (non-zero for the kept tail of a sliding-window cache).
    ``seen``: the tokens this cache has held, evicted ones included, when some were evicted before
    (``kvc eval --decode-every``; None: T); eviction budgets count against it.
    """

    layer: int
    k: Tensor
    v: Tensor
    q: Tensor
    q_positions: Tensor
    k_pre: Tensor | None = None
    rope: dict | None = None
    num_layers: int = 1
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    offset: int = 0
    seen: int | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.k.shape)  # type: ignore[return-value]

    @property
    def entries(self) -> int:
        """Number of K entries (= number of V entries): S * H_kv * T * D."""
        return self.k.numel()


@dataclass
class Encoded:
    """The compressed form of one layer: the stored arrays plus JSON-able decode parameters.

    ``arrays`` maps a name to a tensor that is stored as is; every bit counted is a bit of these
    arrays. ``bits_paper`` is the bit count by the method paper's own formula (None when the paper
    counts the same way), in bits per entry.
    """

    arrays: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    bits_paper: float | None = None

    def nbits(self, prefix: str = "") -> int:
        """Exact stored bits of the arrays whose name starts with ``prefix`` (all by default)."""
        return sum(a.numel() * a.element_size() * 8 for name, a in self.arrays.items()
                   if name.startswith(prefix))


@dataclass
class Decoded:
    """Reconstruction of one layer: k (after RoPE), v [S, H_kv, T, D]; ``keep`` [S, H_kv, T] bool
    marks the tokens still in the cache (None: all kept; eviction methods set it)."""

    k: Tensor
    v: Tensor
    keep: Tensor | None = None
    k_pre: Tensor | None = None


@dataclass(frozen=True)
class Nominal:
    """Nominal stored bits per K and per V entry at steady state, and how many tokens stay in fp16
    (a recent window or a sink): what ``kvc budget`` sizes a cache with (docs/methods.md#nominal-bits)."""

    k_bits: float
    v_bits: float
    fp16_tokens: int = 0


class Compressor(ABC):
    """One KV-cache compression method. Subclasses set ``name``, ``summary`` and ``Options``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str] = ""

    @dataclass
    class Options:
        seed: int = option(0, "random seed (rotations, sketches, sampling)")

    def __init__(self, options: "Compressor.Options | None" = None):
        self.options = options if options is not None else self.Options()
        self.check_options()

    def reseeded(self, seed: int) -> "Compressor":
        """The same method and options with another ``seed`` (itself when it has that seed)."""
        if self.options.seed == seed:
            return self
        return type(self)(dataclasses.replace(self.options, seed=seed))

    def check_options(self, head_dim: int | None = None) -> None:
        """Check the options (KvcError naming the flag): their declared types and constraints
        (:func:`kvc.compression.fields.checked`; those on the head dimension when it is given).
        Subclasses add rules between options here, and call this one."""
        self.options = checked(self.name, self.options, head_dim)

    def validate(self, layer: LayerKV) -> None:
        """Raise KvcError for options impossible on this layer: :meth:`check_options` at its head
        dimension; subclasses add checks that depend on the data (and call this one)."""
        self.check_options(layer.shape[3])

    @classmethod
    def nominal_bits(cls, options: "Compressor.Options", key_dim: int, value_dim: int) -> Nominal | None:
        """Nominal bits per entry at these head dims (``kvc budget``, docs/methods.md#nominal-bits);
        None: the method declares none. ``options`` passed :meth:`check_options` at both head dims."""
        return None

    @abstractmethod
    def encode(self, layer: LayerKV) -> Encoded:
        """Compress one layer."""

    @abstractmethod
    def decode(self, encoded: Encoded, layer: LayerKV) -> Decoded:
        """Reconstruct one layer; ``layer`` supplies shapes, positions and RoPE (not the data)."""

    def groups(self, layers: list[int], num_layers: int) -> list[list[int]]:
        """``layers`` (ascending) cut into the groups encoded together, in order: one layer each,
        except for a method whose stored arrays serve several layers (MiniCache's merged pairs of
        adjacent layers); ``num_layers``: the model's depth."""
        return [[L] for L in layers]

    def encode_group(self, layers: list[LayerKV]) -> list[Encoded]:
        """Compress one group (:meth:`groups`), one ``Encoded`` per layer; arrays the group shares
        are stored once, in one of them."""
        return [self.encode(layer) for layer in layers]

    def decode_group(self, encoded: list[Encoded], layers: list[LayerKV]) -> list[Decoded]:
        """Reconstruct one group's layers from the ``Encoded`` of every layer of the group."""
        return [self.decode(e, layer) for e, layer in zip(encoded, layers)]

    def head_bits(self, encoded: Encoded, layer: LayerKV) -> dict[str, Tensor] | None:
        """Stored bits per KV head, {"k": [H], "v": [H]}, for methods whose heads differ (ragged
        budgets, per-head ranks). None: every tensor's bits are split evenly over the heads."""
        return None

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def __repr__(self) -> str:
        """``kivi(bits=2, group_size=32, ...)``: the method's name and its options."""
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    def generator(self, layer: int, device: torch.device | str = "cpu") -> torch.Generator:
        """Deterministic generator per (seed, layer)."""
        return torch.Generator(device=device).manual_seed(self.options.seed * 1_000_003 + layer)


def declares_nominal_bits(cls: type[Compressor]) -> bool:
    """Whether a method declares its nominal bits per entry (``kvc budget --method`` takes it)."""
    return cls.nominal_bits.__func__ is not Compressor.nominal_bits.__func__


def check_finite(name: str, layer: int, tensor: Tensor) -> None:
    """Fail loudly when a method produced NaN or Inf."""
    if not torch.isfinite(tensor).all():
        raise MethodFailure(f"method {name} produced NaN/Inf in layer {layer}")


# ----------------------------------------------------------------------------- shared shapes


def rotate_keys(k_pre: Tensor, layer: LayerKV, positions: Tensor | None = None) -> Tensor:
    """Keys after RoPE from keys before it, at the layer's ``positions`` ([T] or [S, H, T]; default
    0..T-1), counted from its first token (absolute position ``layer.offset``)."""
    if layer.rope is None:
        return k_pre
    if positions is None:
        positions = torch.arange(k_pre.shape[-2], device=k_pre.device)
    return apply_rope(k_pre, positions + layer.offset, layer.rope, layer.layer)


class TensorCompressor(Compressor):
    """Base for methods that compress K and V independently, each [S, H_kv, T, D].

    Subclasses implement ``encode_tensor``/``decode_tensor``; ``--keys pre`` compresses keys before
    RoPE and rotates them after decoding (KVQuant sec. 3.2).
    """

    @dataclass
    class Options(Compressor.Options):
        keys: str = option("post", "compress keys before (pre) or after (post) RoPE", choices=("pre", "post"))

    @abstractmethod
    def encode_tensor(self, x: Tensor, kind: str, layer: LayerKV, generator: torch.Generator
                      ) -> tuple[dict[str, Tensor], dict[str, Any], float | None]:
        """Compress x [S, H, T, D], the layer's keys (kind 'k', before or after RoPE per ``--keys``)
        or values ('v'); ``layer`` is the context (queries, RoPE, positions), ``generator`` the
        layer's. Returns (arrays, meta, paper bits/entry)."""

    @abstractmethod
    def decode_tensor(self, arrays: dict[str, Tensor], meta: dict[str, Any], kind: str,
                      shape: tuple[int, ...]) -> Tensor:
        """Reconstruct x [S, H, T, D] (float32) from what ``encode_tensor`` returned."""

    def _keys_source(self, layer: LayerKV) -> Tensor:
        if self.options.keys == "pre" and layer.rope is not None:
            if layer.k_pre is None:
                raise KvcError(f"{self.name} --keys pre needs k_pre, which this capture lacks; "
                               "use --keys post")
            return layer.k_pre
        return layer.k  # without RoPE, keys before and after it are the same

    def encode(self, layer: LayerKV) -> Encoded:
        gen = self.generator(layer.layer, layer.k.device)
        k_arrays, k_meta, k_paper = self.encode_tensor(self._keys_source(layer), "k", layer, gen)
        v_arrays, v_meta, v_paper = self.encode_tensor(layer.v, "v", layer, gen)
        arrays = {**{f"k.{n}": a for n, a in k_arrays.items()}, **{f"v.{n}": a for n, a in v_arrays.items()}}
        paper = None if k_paper is None or v_paper is None else (k_paper + v_paper) / 2
        return Encoded(arrays, {"k": k_meta, "v": v_meta}, paper)

    def decode(self, encoded: Encoded, layer: LayerKV) -> Decoded:
        def part(kind: str) -> Tensor:
            arrays = {n[2:]: a for n, a in encoded.arrays.items() if n.startswith(f"{kind}.")}
            return self.decode_tensor(arrays, encoded.meta[kind], kind, layer.shape)

        k, v = part("k"), part("v")
        if self.options.keys == "pre":
            return Decoded(rotate_keys(k, layer), v, k_pre=k)
        return Decoded(k, v)


class Evictor(Compressor):
    """Base for eviction methods: ``select`` gives the kept tokens, stored in fp16 with indices.

    Storage: kept K and V rows in fp16, their token positions (int16 when T <= 32767, else int32)
    and the kept count per (sequence, head) in int32; ragged, so adaptive budgets cost nothing extra.
    """

    def validate(self, layer: LayerKV) -> None:
        super().validate(layer)
        if not layer.attention.causal:
            raise KvcError(f"{self.name} evicts tokens from a decoder's cache; layer {layer.layer} "
                           "attends bidirectionally (an encoder), which keeps no cache to evict from")

    @abstractmethod
    def select(self, layer: LayerKV) -> Tensor:
        """keep [S, H_kv, T] bool: the tokens that stay in the cache."""

    def encode(self, layer: LayerKV) -> Encoded:
        keep = self.select(layer)
        return Encoded({"k": layer.k[keep].to(torch.float16), "v": layer.v[keep].to(torch.float16),
                        **keep_arrays(keep)}, {})

    def decode(self, encoded: Encoded, layer: LayerKV) -> Decoded:
        S, H, T, D = layer.shape
        keep = keep_mask(encoded.arrays["index"], encoded.arrays["count"], T)
        k = torch.zeros(S, H, T, D, device=keep.device)
        v = torch.zeros_like(k)
        k[keep] = encoded.arrays["k"].float()
        v[keep] = encoded.arrays["v"].float()
        return Decoded(k, v, keep=keep)

    def head_bits(self, encoded: Encoded, layer: LayerKV) -> dict[str, Tensor]:
        rows = encoded.arrays["count"].double().sum(0) * layer.shape[3] * encoded.arrays["k"].element_size() * 8
        side = eviction_side_bits(encoded.arrays["index"], encoded.arrays["count"]) / 2
        return {"k": rows + side, "v": rows + side}


def keep_arrays(keep: Tensor) -> dict[str, Tensor]:
    """The stored form of keep [S, H, T]: kept positions ``index`` (ragged, row-major; int16 when
    T <= 32767, else int32) and ``count`` [S, H] int32. Inverse of :func:`keep_mask`."""
    T = keep.shape[-1]
    index_dtype = torch.int16 if T <= torch.iinfo(torch.int16).max else torch.int32
    positions = torch.arange(T, device=keep.device).expand_as(keep)[keep]
    return {"index": positions.to(index_dtype), "count": keep.sum(-1).to(torch.int32)}


def keep_mask(index: Tensor, count: Tensor, T: int) -> Tensor:
    """keep [S, H, T] from the kept positions ``index`` (ragged, row-major) and counts [S, H]."""
    S, H = count.shape
    keep = torch.zeros(S, H, T, dtype=torch.bool, device=count.device)
    owner = torch.repeat_interleave(torch.arange(S * H, device=keep.device), count.reshape(-1).long())
    keep.view(S * H, T)[owner, index.long().to(keep.device)] = True
    return keep


def eviction_side_bits(index: Tensor, count: Tensor) -> Tensor:
    """Bits of the kept positions and the counts [S, H] per KV head [H] (shared by K and V)."""
    return (index.element_size() * 8 * count.double().sum(0)
            + count.element_size() * 8 * count.shape[0])
