"""Fidelity of a compressed KV cache: tensor and attention metrics."""
