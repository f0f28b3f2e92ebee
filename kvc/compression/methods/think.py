"""ThinK (Xu et al. 2024, arXiv:2407.21018): query-driven pruning of key channels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import KvcError
from ..protocol import LayerKV, Nominal, TensorCompressor, option
from ..eviction import grouped_queries


class ThinK(TensorCompressor):
    """Drop the floor(ratio * D) key channels of least query-weighted magnitude per (sequence, KV
    head); keys keep their other channels in fp16 (head_dim shrinks), values stay fp16 whole.

    Channel c scores ||Q_c||^2 ||K_c||^2 over the observation window's queries (group mean) and all
    keys: the squared Frobenius norm of the channel's contribution Q_c K_c^T to the attention logits
    (ThinK's query-driven channel criterion); kvpress's ``ThinKPress`` ranks the same. Stored: the kept channels' indices per
    (sequence, KV head), counted with the keys. ``snapkv+think`` evicts tokens first.
    """

    name = "think"
    summary = "key channel pruning by query-weighted magnitude (head_dim shrinks); values fp16"
    paper = "Xu et al., ThinK: Thinner Key Cache by Query-Driven Pruning, arXiv:2407.21018"

    @dataclass
    class Options(TensorCompressor.Options):
        keys: str = option("post", "keys after RoPE: the channels the queries meet", choices=("post",))
        ratio: float = option(0.4, "fraction of the key channels pruned", low=0, high=1, high_open=True)
        window: int = option(32, "observation window: the last queries that score the channels", low=1)

    @classmethod
    def nominal_bits(cls, options: Options, key_dim: int, value_dim: int) -> Nominal:
        """K: 16 bits on the kept channels, counted over all d_k (the indices vanish over the
        tokens); V: 16."""
        return Nominal(16 * (key_dim - int(key_dim * options.ratio)) / key_dim, 16.0)

    def channel_scores(self, k: Tensor, layer: LayerKV) -> Tensor:
        """Score [S, H, D] of every key channel of keys ``k``: mean_i q_ic^2 over the queries at the
        last ``window`` captured positions (group mean) x mean_j k_jc^2."""
        if not layer.q_positions.numel():
            raise KvcError(f"{self.name}: the capture has no queries")
        # the last captured positions (after eviction, x holds fewer tokens than the prompt had)
        observing = layer.q_positions > layer.q_positions.max() - self.options.window
        q = grouped_queries(layer)[..., observing.to(layer.q.device), :]
        return q.pow(2).mean(-2).mean(2) * k.pow(2).mean(-2)

    def encode_tensor(self, x: Tensor, kind: str, layer: LayerKV, generator: torch.Generator
                      ) -> tuple[dict[str, Tensor], dict[str, Any], float | None]:
        if kind == "v":
            return {"values": x.to(torch.float16)}, {}, None
        D = x.shape[-1]
        kept = D - int(D * self.options.ratio)
        channels = self.channel_scores(x, layer).topk(kept, dim=-1).indices.sort(-1).values
        values = x.gather(-1, channels[..., None, :].expand(*x.shape[:-1], kept))
        dtype = torch.uint8 if D <= 256 else torch.int16
        return {"values": values.to(torch.float16), "channels": channels.to(dtype)}, {}, None

    def decode_tensor(self, arrays: dict[str, Tensor], meta: dict[str, Any], kind: str,
                      shape: tuple[int, ...]) -> Tensor:
        values = arrays["values"].float()
        if kind == "v":
            return values
        out = values.new_zeros(shape)
        channels = arrays["channels"].long()[..., None, :].expand(*shape[:-1], values.shape[-1])
        return out.scatter_(-1, channels, values)
