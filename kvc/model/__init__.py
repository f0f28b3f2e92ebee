"""A model and its text in, a capture out: loading, text windows, hooks, synthetic captures."""
