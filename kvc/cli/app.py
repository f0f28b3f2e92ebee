"""The ``kvc`` command line: a thin shell over the library.

Bad input raises ``KvcError`` anywhere below; here it becomes one line on stderr and exit code 2
(``--debug``, anywhere on the command line, shows the traceback instead).
"""

from __future__ import annotations

import sys
import traceback

import importlib
import pkgutil

import click
import typer

from . import commands
from ..errors import KvcError

INTERNAL_ERROR = 3  # distinct from 1 (a regression found by `kvc check`) and 2 (bad input)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline KV-cache profiling and compression for transformer LMs.")

# Each module in kvc/commands defines NAME and command() (and optionally CONTEXT_SETTINGS for
# click, e.g. to accept method options); adding a command = adding a module.
for _info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
    _module = importlib.import_module(f"{commands.__name__}.{_info.name}")
    app.command(_module.NAME, context_settings=getattr(_module, "CONTEXT_SETTINGS", None))(_module.command)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        result = app(args=args, prog_name="kvc", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as exit_:
        return exit_.exit_code
    except click.ClickException as err:  # usage errors from the argument parser: exit 2
        err.show()
        return err.exit_code
    except click.exceptions.Abort:
        print("kvc: aborted", file=sys.stderr)
        return 130
    except KvcError as err:
        if debug:
            traceback.print_exc()
        print(f"kvc: error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:
        if debug:
            raise
        print(f"kvc: internal error: {type(err).__name__}: {err} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return INTERNAL_ERROR


def entry() -> None:
    sys.exit(main())
