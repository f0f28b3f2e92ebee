"""A method's compressed cache inside the model: perplexity and needle retrieval (``kvc eval``,
:mod:`kvc.eval.evaluate`), and generation with it (``kvc.compressing``, :mod:`kvc.eval.generate`)."""
