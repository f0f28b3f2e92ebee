"""Shared rich consoles: results on stdout, progress and notes on stderr.

Strings print as text: markup is off (``[/x]`` cannot break a table nor ``[link=...]`` make a
hyperlink) and control characters show as escapes (``\\x1b`` cannot colour the terminal or move its
cursor), whatever a file, a path or metadata holds. Styled text is built with ``rich.text.Text``.
"""

import re
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..units import human_bytes  # noqa: F401 (the commands format sizes with it)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _escaped(match: re.Match) -> str:
    return match.group().encode("unicode_escape").decode()


def printable(text: str) -> str:
    """``text`` with control characters other than newline and tab shown as escapes (\\x1b)."""
    return _CONTROL_BUT_LINES.sub(_escaped, text)


def one_line(text: str) -> str:
    """``text`` on one line: newlines and the other control characters shown as escapes (\\n)."""
    return _CONTROL.sub(_escaped, text)


class TextConsole(Console):
    """A rich console that prints every string as text (no markup, control characters escaped)."""

    def __init__(self, **kwargs):
        super().__init__(markup=False, **kwargs)

    def render_str(self, text: str, **kwargs):
        return super().render_str(printable(text), **kwargs)

    def print(self, *objects, **kwargs) -> None:
        """Off a terminal (a pipe, a file) tables print at their natural width: rich would cut them
        to 80 columns (``-2.7e-...`` for a number, ``eoptshri...`` for a header)."""
        tables = [o for o in objects if isinstance(o, Table)]
        if not tables or self.is_terminal:
            return super().print(*objects, **kwargs)
        width = self.width
        unbounded = self.options.update_width(1_000_000)
        self.width = max(width, *(self.measure(t, options=unbounded).maximum for t in tables))
        try:
            super().print(*objects, **kwargs)
        finally:
            self.width = width


out = TextConsole()
err = TextConsole(stderr=True)


def progress_bar() -> Progress:
    """A transient bar on stderr, shown on a terminal only (elsewhere it would leave an empty line)."""
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)


@contextmanager
def progress_task(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar on stderr, driven by the API's ``progress(done, total, what)`` callback."""
    with progress_bar() as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total, what: bar.update(task, completed=done, total=total, description=what)
