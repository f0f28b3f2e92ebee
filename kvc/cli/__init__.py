"""The ``kvc`` command line: a thin shell over the library."""

from .app import app, entry, main

__all__ = ["app", "entry", "main"]
