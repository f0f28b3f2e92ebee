"""Start-up: help, ``kvc methods`` and ``kvc info`` import neither torch, scipy, transformers nor
matplotlib (checked with ``python -X importtime``); tables are never cut off a terminal."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from rich.table import Table

from kvc.cli.app import app
from kvc.cli.console import TextConsole

HEAVY = {"torch", "scipy", "transformers", "matplotlib"}
COMMANDS = sorted(command.name for command in app.registered_commands)


def imported(*argv: str) -> set[str]:
    """Top-level packages a fresh ``python -m kvc ARGV`` imports (it must exit 0)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "kvc", *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert lines, "no -X importtime output"
    return {name.split(".")[0] for name in lines}


def test_the_command_list_is_complete():
    assert {"analyze", "budget", "capture", "check", "compress", "info", "methods", "sweep"} <= set(COMMANDS)


@pytest.mark.parametrize("argv", [["--help"], *([name, "--help"] for name in COMMANDS), ["methods"],
                                  ["methods", "--json"]], ids=" ".join)
def test_help_and_methods_import_nothing_heavy(argv):
    assert imported(*argv) & HEAVY == set()


@pytest.mark.parametrize("as_json", [False, True])
def test_info_imports_nothing_heavy(synth_capture, as_json):
    assert imported("info", str(synth_capture()), *(["--json"] if as_json else [])) & HEAVY == set()


def test_the_check_sees_a_heavy_import():
    """The probe itself: a command that does load torch is seen doing it."""
    assert "torch" in imported("budget", "--layers", "2", "--kv-heads", "1", "--head-dim", "8",
                               "--method", "int", "--bits", "4", "--context", "64")


def test_tables_print_whole_off_a_terminal():
    console = TextConsole(file=io.StringIO(), width=80)
    assert not console.is_terminal
    table = Table(*(f"eoptshrinkq_{i}" for i in range(10)))
    table.add_row(*(f"-2.7{i}e-04" for i in range(10)))
    console.print(table)
    text = console.file.getvalue()
    assert "…" not in text
    assert all(f"eoptshrinkq_{i}" in text and f"-2.7{i}e-04" in text for i in range(10))
