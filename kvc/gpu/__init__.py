"""CUDA kernels for the hot paths (``kernels/*.cu``, loaded with cupy.RawModule), behind a torch fallback.

Design and numbers: docs/gpu.md. The seam for the compression methods is the set of functions below;
each equals a torch reference expression (named in its docstring) and falls back to it whenever the
kernel cannot run (no GPU or no cupy, a CPU tensor, an unsupported shape, a failed self-check)::

    from kvc import gpu
    packed, norms = gpu.tq_mse_encode_packed(x, bits, rotation, codebook)   # TurboQuant-mse + pack
    x_hat = gpu.tq_mse_decode_packed(packed, bits, shape, norms, rotation, codebook)
    logits = gpu.tq_score_packed(q, packed, bits, shape, norms, rotation, codebook)  # q K_hat^T
    out = gpu.tq_value_packed(w, packed, bits, shape, norms, rotation, codebook)     # w V_hat
    packed, scale, zero = gpu.minmax_quantize_packed(x, bits, group)          # KIVI / int + pack
    x_hat = gpu.minmax_dequantize_packed(packed, bits, shape, scale, zero)
    shrinkage = gpu.eoptshrink_batched(blocks, device="cuda")                 # kvc.analysis.rmt on the GPU

``gpu.available()`` says whether the kernels can run; ``gpu.require(device)`` raises the one-line
KvcError of ``--device cuda`` without a GPU or without cupy.
"""

from .ops import (eoptshrink_batched, minmax_dequantize_packed, minmax_quantize_packed, tq_mse_decode_packed,
                  tq_mse_encode_packed, tq_score_packed, tq_value_packed)
from .runtime import available, kernels_dir, missing, require, require_device

__all__ = ["available", "require", "require_device", "missing", "kernels_dir", "tq_mse_encode_packed", "tq_mse_decode_packed",
           "tq_score_packed", "tq_value_packed", "minmax_quantize_packed", "minmax_dequantize_packed",
           "eoptshrink_batched"]
