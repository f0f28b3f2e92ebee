"""kvc: offline KV-cache profiling and compression for transformer language models."""

__version__ = "0.1.0"
