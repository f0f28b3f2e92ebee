"""``python -m kvc``: the command line."""

from .cli import entry

entry()
