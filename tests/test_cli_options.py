"""The option types of kvc/cli/options.py: an option that means the same in several commands reads
the same in each (flag, help, type), and the commands that differ are the documented ones."""

from __future__ import annotations

import typing

import pytest
import typer.main

from kvc.cli import options
from kvc.cli.app import app

COMMANDS = typer.main.get_command(app).commands
SHARED = {name: typing.get_args(value)[1] for name, value in vars(options).items()
          if typing.get_origin(value) is typing.Annotated}
# (command, flag) declared in the command itself: the same flag, another meaning (kvc/cli/options.py)
OWN = {("bench", "--device"), ("bench", "--layers"), ("budget", "--layers"), ("synth", "--layers"),
       ("bench", "--seed"), ("synth", "--seed"), ("synth", "--dtype"), ("sweep", "--opt"), ("plan", "--opt")}


def _options(name: str) -> list:
    """The options of a command (typer may bundle its own click: no isinstance on click's classes)."""
    return [p for p in COMMANDS[name].params if p.param_type_name == "option"]


def _declared(info) -> str:
    """An OptionInfo's flag (typer keeps the first name in ``default`` when used in Annotated)."""
    return info.default


def test_the_shared_types_are_the_expected_ones():
    assert set(SHARED) == {"Device", "Layers", "Force", "JsonOut", "PrintJson", "MethodSeed", "MethodOptions",
                           "ComputeDtype", "QueryStride", "Seeds", "ModelDtype", "Revision", "TrustRemoteCode", "Text",
                           "DeviceMap", "MaxMemory", "PlanFile"}
    assert _declared(SHARED["Device"]) == "--device" and SHARED["Device"].help == "auto|cpu|cuda|cuda:N"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_shared_flag_reads_as_its_type(name):
    """Every option of a command whose flag has a shared type is declared through one of them."""
    by_flag: dict[str, list] = {}
    for info in SHARED.values():
        by_flag.setdefault(_declared(info), []).append(info)
    shared = [p for p in _options(name) if p.opts[0] in by_flag and (name, p.opts[0]) not in OWN]
    for param in shared:
        assert param.help in {info.help for info in by_flag[param.opts[0]]}, (name, param.opts[0], param.help)
    assert shared, f"kvc {name} has no shared option"  # every command has one (--force or --json)


def test_the_exceptions_are_real_and_differ():
    """Each option left in its command exists and does differ from the shared type of its flag."""
    for name, flag in OWN:
        (param,) = [p for p in _options(name) if flag in p.opts]
        assert param.help not in {info.help for info in SHARED.values() if _declared(info) == flag}, (name, flag)


def test_every_command_forces_and_selects_devices_alike():
    helps = {(name, flag): p.help for name in COMMANDS for p in _options(name) for flag in p.opts}
    forced = {name for name, flag in helps if flag == "--force"}
    assert forced == {"analyze", "bench", "budget", "capture", "check", "compress", "decompress", "eval", "plan",
                      "sweep", "synth"}
    assert {helps[(name, "--force")] for name in forced} == {"Overwrite existing output files."}
    assert {name for (name, flag), text in helps.items() if flag == "--device" and text == SHARED["Device"].help} \
        == {"analyze", "capture", "compress", "decompress", "eval", "plan", "sweep"}
    assert {name for (name, flag), text in helps.items() if flag == "--json" and text == SHARED["JsonOut"].help} \
        == {"analyze", "bench", "budget", "check", "compress", "eval", "plan"}
