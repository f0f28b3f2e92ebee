"""A method's compressed cache inside the model: perplexity and needle retrieval (``kvc eval``),
and generation with it (``compressing``)."""

from .generate import compressing

__all__ = ["compressing"]
