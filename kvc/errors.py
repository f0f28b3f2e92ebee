"""Errors that the CLI turns into one clear line and exit code 2."""


class KvcError(Exception):
    """Bad input or an impossible request: shown as one line, exit code 2 (traceback with --debug)."""

    exit_code = 2


class MethodFailure(KvcError):
    """A method did not do what was asked (wrong bit width, NaN, compression not applied)."""
