"""StreamingLLM (Xiao et al., ICLR 2024, arXiv:2309.17453): attention sinks + a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..protocol import LayerKV, option
from ..eviction import BudgetEvictor, recent


class StreamingLLM(BudgetEvictor):
    """Keep the first ``--sinks`` tokens and the most recent ones; score-free, the same for every head.

    The window is ``--window`` tokens, or (``--window 0``) whatever the budget leaves after the sinks.
    """

    name = "streamingllm"
    summary = "eviction: attention sinks + recent window"
    paper = "Xiao et al., Efficient Streaming Language Models with Attention Sinks, arXiv:2309.17453"

    @dataclass
    class Options(BudgetEvictor.Options):
        sinks: int = option(4, "first tokens always kept (attention sinks)", low=0)
        window: int = option(0, "recent tokens kept; 0 = the budget minus the sinks", low=0)

    def select(self, layer: LayerKV) -> Tensor:
        S, H, T, _ = layer.shape
        if self.options.window:
            sinks, window = self.options.sinks, self.options.window
        else:
            total = self.count(layer)
            sinks = min(self.options.sinks, total)
            window = total - sinks
        positions = torch.arange(T, device=layer.k.device)
        # StreamingLLM sec. 3.2: cache = initial sink tokens + rolling window of recent tokens
        return ((positions < sinks) | recent(T, window, layer.k.device)).expand(S, H, T)
