"""KV-cache compressors: one protocol (``protocol``, option declarations in ``fields``), one module
per method (``methods/``), the engine that runs and measures them, and the torch-free ``catalogue``."""
