"""Quantization numerics as pure, batched torch functions (rows = vectors, any leading dims).

- ``packing``: b-bit codes and sign bits <-> dense uint8 arrays (exact ceil(n*b/8) bytes).
- ``lloyd_max``: Lloyd-Max codebooks (exact Beta(d) sphere marginal, cached on disk; Gaussian
  limit; weighted data fit = KVQuant nuq k-means) and nearest-centroid codes.
- ``rotation``: seeded random rotations, Haar (QR with sign fix) and randomized Hadamard (FWHT).
- ``turboquant``: TQ-mse / TQ-prod encode/decode of rows with fp16 norms; fractional-bit channel split.
- ``qjl``: 1-bit JL sign sketch, asymmetric inner-product estimator, optional orthogonal rows.
- ``uniform``: asymmetric min/max (KIVI) and symmetric integer group quantization, fp16 parameters.
- ``fp8``: e4m3 / e5m2 storage with a calibrated scale.
"""
