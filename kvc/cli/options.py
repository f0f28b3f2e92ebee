"""Option types shared by the commands: an option that means the same in several commands is
declared once here, with its flag and help text; a command gives it a default,
``device: Device = "auto"``.

Options that share a flag but not a meaning stay in their command: ``kvc bench --device`` (a CUDA
device, default cuda), ``--layers`` as a number of layers (bench, budget, synth), ``--seed`` of
synthetic data (bench, synth), ``kvc synth --dtype`` (the stored dtype), ``kvc sweep --opt``
(``[method.]key=value`` for the methods that have the option).

Only typer here: ``kvc --help`` and ``kvc <command> --help`` import nothing heavy.
"""

from pathlib import Path
from typing import Annotated, List, Optional

import typer

Device = Annotated[str, typer.Option("--device", help="auto|cpu|cuda|cuda:N")]
Layers = Annotated[str, typer.Option("--layers", help="'all' or a list like '0,2,5-9'.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")]
JsonOut = Annotated[Optional[str], typer.Option(
    "--json", metavar="FILE|-", help="Write the results as JSON to this file ('-': stdout, the tables go to stderr).")]
PrintJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]

# methods
MethodSeed = Annotated[Optional[int], typer.Option(
    "--seed", help="The method's random seed (rotations, sketches, sampling).")]
MethodOptions = Annotated[List[str], typer.Option(
    "--opt", help="Method option key=value (repeatable); or pass it as --key value.")]
Seeds = Annotated[int, typer.Option(
    "--seeds", help="Run the method with N seeds (--seed, --seed + 1, ...) and report each metric as the "
    "mean with its 95% Student-t interval.")]
ComputeDtype = Annotated[str, typer.Option("--dtype", help="Compute dtype: float32|float64.")]
PlanFile = Annotated[Optional[Path], typer.Option(
    "--plan", help="A plan file (kvc plan, docs/plan.md) instead of --method: a method per layer, K or V and KV head.")]
QueryStride = Annotated[int, typer.Option(
    "--query-stride", help="Measure with every N-th captured query (the method sees all).")]

# models and text
ModelDtype = Annotated[str, typer.Option("--dtype", help="Model dtype: auto|float32|bfloat16|float16.")]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code")]
DeviceMap = Annotated[Optional[str], typer.Option(
    "--device-map", help="auto: a model larger than the device or RAM, its layers placed by accelerate over "
    "the GPUs, the CPU and disk (--device is then not used).")]
MaxMemory = Annotated[Optional[str], typer.Option(
    "--max-memory", help="With --device-map auto: memory per device, e.g. '0=20GB,cpu=60GB' (a bare size is "
    "the CPU's); what does not fit is offloaded to disk.")]
Text = Annotated[Optional[str], typer.Option(
    "--text", help="UTF-8 text file (default: the English docs shipped with CPython).")]
