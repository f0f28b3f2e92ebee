"""Shared rich consoles: results on stdout, progress and notes on stderr."""

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

out = Console()
err = Console(stderr=True)


def progress_bar() -> Progress:
    """A transient bar on stderr, shown on a terminal only (elsewhere it would leave an empty line)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)


@contextmanager
def progress_task(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar on stderr, driven by the API's ``progress(done, total, what)`` callback."""
    with progress_bar() as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total, what: bar.update(task, completed=done, total=total, description=what)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
