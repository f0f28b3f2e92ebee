"""KV-cache compressors: one protocol (``base``), one module per method (``methods/``), metrics."""
