"""kvc: offline KV-cache profiling and compression for transformer language models.

The public API (docs/api.md)::

    import kvc
    cap = kvc.capture("path/to/model", out="capture.safetensors", seq_len=256, num_seqs=2)
    analysis = kvc.analyze(cap)                     # spectra, ranks, outlier channels per head
    result = kvc.compress(cap, "turboquant", bits=2) # bits per entry and fidelity per head
    evaluation = kvc.evaluate("turboquant", "path/to/model", bits=2)  # perplexity, retrieval
    with kvc.compressing(model, "turboquant", bits=2):  # a loaded model generates on the compressed cache
        model.generate(input_ids, max_new_tokens=32)

This face is lazy: ``import kvc`` imports nothing heavy (no torch); a name is imported from its
module on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = "kvc.api"
# name -> (module, attribute)
_EXPORTS = {name: (_API, name) for name in (
    "capture", "load", "load_model", "synth", "analyze", "compress", "decompress", "methods", "method", "sweep",
    "evaluate", "budget", "plan", "load_plan", "Capture", "Analysis", "Compression", "Sweep", "Evaluation", "Budget",
    "Plan")}
_EXPORTS["KvcError"] = ("kvc.errors", "KvcError")
_EXPORTS["write_text"] = ("kvc.io.atomic", "write_text")  # atomic, as every file kvc writes: no torch
_EXPORTS["bit_saving"] = ("kvc.metrics.pareto", "bit_saving")  # equal-error bits between two fronts: no torch
_EXPORTS["mean_ci"] = ("kvc.metrics.seeds", "mean_ci")  # mean and Student-t interval over seeds: no torch
_EXPORTS["methods"] = ("kvc.compression.catalogue", "methods")  # the committed catalogue: no torch
_EXPORTS["compressing"] = ("kvc.eval.generate", "compressing")  # with kvc.compressing(model, ...): generate

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
