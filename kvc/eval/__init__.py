"""A method's compressed cache inside the model: perplexity and needle retrieval."""
