"""The ``kvc`` command line: a thin shell over the library.

Bad input raises ``KvcError`` anywhere below; here it becomes one line on stderr and exit code 2
(``--debug``, anywhere on the command line, also shows the traceback). So do usage errors of the
argument parser and files that cannot be read or written (``OSError``); anything else is an internal
error, exit 3; Ctrl-C prints "kvc: aborted" and exits 130.
"""

from __future__ import annotations

import functools
import sys
import traceback

import importlib
import pkgutil

import click
import typer

from . import commands
from .console import one_line
from .lazy import LazyModule
from ..errors import KvcError

INTERNAL_ERROR = 3  # distinct from 1 (a regression found by `kvc check`) and 2 (bad input)
ABORTED = 130  # 128 + SIGINT, the shell's code for Ctrl-C
# recent typer bundles its own copy of click (typer._click) whose classes are not click's: catch both
USAGE_ERRORS = tuple({click.ClickException, getattr(typer, "TyperException", click.ClickException)})
EXITS = tuple({click.exceptions.Exit, typer.Exit})
ABORTS = tuple({click.exceptions.Abort, typer.Abort, KeyboardInterrupt})

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline KV-cache profiling and compression for transformer LMs.")

threads = LazyModule("kvc.threads")


def computing(command):
    """``command`` run after ``kvc.threads.cpu_threads()``: torch's threads capped at the cores this
    process may use. Applied when the command runs, after parsing, so ``--help`` stays torch-free."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        threads.cpu_threads()
        return command(*args, **kwargs)

    return run


# Each module in kvc/commands defines NAME and command() (and optionally CONTEXT_SETTINGS for
# click, e.g. to accept method options, and TORCH_FREE = True for a command that computes nothing
# with torch); adding a command = adding a module.
for _info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
    _module = importlib.import_module(f"{commands.__name__}.{_info.name}")
    _command = _module.command if getattr(_module, "TORCH_FREE", False) else computing(_module.command)
    app.command(_module.NAME, context_settings=getattr(_module, "CONTEXT_SETTINGS", None))(_command)


def main(argv: list[str] | None = None) -> int:
    """Run ``kvc`` with ``argv`` and return the exit code: 0 success, 1 a regression (kvc check),
    2 bad input (one line on stderr), 3 an internal error, 130 interrupted (Ctrl-C)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        result = app(args=args, prog_name="kvc", standalone_mode=False)
    except EXITS as exit_:
        result = exit_.exit_code
    except USAGE_ERRORS as err:  # whatever click or typer's bundled click raises while parsing
        return usage_error(err)
    except ABORTS:
        result = ABORTED
    except KvcError as err:
        return fail(f"kvc: error: {err}", err.exit_code, debug)
    except OSError as err:  # a file that cannot be read or written: bad input, not a bug
        where = f"{err.filename}: " if err.filename else ""
        return fail(f"kvc: error: {where}{err.strerror or err}", 2, debug)
    except Exception as err:
        return fail(f"kvc: internal error: {type(err).__name__}: {err} (rerun with --debug for the "
                    "traceback)", INTERNAL_ERROR, debug)
    if result == ABORTED:  # typer turns KeyboardInterrupt into Exit(130) before it reaches us
        print("kvc: aborted", file=sys.stderr)
    return result if isinstance(result, int) else 0


def usage_error(err: Exception) -> int:
    """Exit 2 with one line naming the command's --help (the help itself when no arguments were given)."""
    ctx = getattr(err, "ctx", None)
    command = ctx.command_path if ctx is not None else "kvc"
    if type(err).__name__ == "NoArgsIsHelpError":  # typer has printed the help; click puts it in the message
        if err.format_message():
            print(err.format_message())
        return fail(f"kvc: error: {command} needs arguments (see its help above)", 2)
    return fail(f"kvc: error: {err.format_message()} (see {command} --help)", 2)


def fail(line: str, code: int, debug: bool = False) -> int:
    """Print ``line`` as one line on stderr (the traceback before it with --debug); return ``code``."""
    if debug:
        traceback.print_exc()
    print(one_line(line), file=sys.stderr)
    return code


def entry() -> None:
    sys.exit(main())
