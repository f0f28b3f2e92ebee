"""The committed method catalogue is what the registry describes, and `kvc methods` reads it without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kvc
from kvc.compression import catalogue
from kvc.compression.options import describe

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "scipy")


def test_committed_catalogue_is_the_registry():
    assert catalogue.read_text() == catalogue.render(describe()), (
        f"kvc/compression/catalogue.json is out of date with the registry; run {catalogue.REGENERATE}")
    assert kvc.methods() == {m["name"]: m for m in json.loads(json.dumps(describe()))}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


# kvc/cli/__init__.py imports the app, which imports every command module (kvc compress imports torch);
# the probe loads the package without its __init__, so that only the methods command's own imports count
COMMAND = """
import importlib, json, sys, types
from pathlib import Path
import kvc
package = types.ModuleType("kvc.cli")
package.__path__ = [str(Path(kvc.__file__).parent / "cli")]
sys.modules["kvc.cli"] = package
importlib.import_module("kvc.cli.commands.methods").command(as_json={as_json})
print(json.dumps(sorted(set({heavy}) & set(sys.modules))), file=sys.stderr)
"""


@pytest.mark.parametrize("as_json", [True, False])
def test_methods_command_imports_no_torch(as_json):
    proc = _python(COMMAND.format(as_json=as_json, heavy=HEAVY))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []
    if as_json:
        assert [m["name"] for m in json.loads(proc.stdout)["methods"]] == list(kvc.methods())
    else:
        assert "turboquant" in proc.stdout and "divides head_dim" in proc.stdout


def test_kvc_methods_api_imports_no_torch():
    proc = _python(f"import json, sys, kvc; n = len(kvc.methods()); "
                   f"print(json.dumps([n, sorted(set({HEAVY}) & set(sys.modules))]))")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [len(kvc.methods()), []]

