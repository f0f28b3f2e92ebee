"""The wheel carries every kvc package, the kernel sources and the method catalogue, and an installed
kvc finds its kernels and lists its methods.

The wheel is built offline from a copy of the tree (``pip wheel --no-deps --no-build-isolation
--no-index``: the setuptools of the running environment, nothing fetched), installed alone into a
fresh venv (no torch, no numpy), and asked from outside the repository where its kernels are.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kvc.compression import catalogue
from kvc.gpu import sources
from kvc.gpu.sources import COMMON_HEADER, KERNEL_FILES, kernel_source

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _code_packages() -> set[str]:
    """Every package of the source tree: a directory under kvc/ with an __init__.py."""
    return {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kvc").rglob("__init__.py")}


def test_package_list_names_every_package_on_disk():
    data = set(SETUPTOOLS["package-dir"])
    listed = set(SETUPTOOLS["packages"])
    assert data <= listed, "a mapped data package is missing from [tool.setuptools] packages"
    assert listed - data == _code_packages(), "pyproject.toml [tool.setuptools] packages != the kvc packages on disk"


def test_every_kernel_file_is_package_data():
    """Each file of kernels/ (but its README) is matched by the package-data globs of its data package."""
    folders = {ROOT / path: name for name, path in SETUPTOOLS["package-dir"].items()}
    assert ROOT / "kernels" in folders and ROOT / "kernels" / "emulation" in folders
    for path in (ROOT / "kernels").rglob("*"):
        if path.is_dir():
            assert path in folders, f"{path.relative_to(ROOT)} is not mapped in [tool.setuptools.package-dir]"
        elif path.name != "README.md":
            patterns = SETUPTOOLS["package-data"].get(folders[path.parent], [])
            assert any(fnmatch.fnmatch(path.name, p) for p in patterns), f"{path.relative_to(ROOT)} is not package data"


def _run(cmd: list, cwd: Path, env: dict) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


PROBE = """
import importlib.util, json, sys, sysconfig
from kvc.compression.catalogue import methods
from kvc.gpu.sources import kernels_dir, kernel_source
d = kernels_dir()
print(json.dumps({"kernels_dir": str(d.resolve()), "purelib": sysconfig.get_paths()["purelib"],
                  "methods": sorted(methods()),
                  "files": sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()),
                  "turboquant": kernel_source("turboquant"),
                  "torch_installed": importlib.util.find_spec("torch") is not None,
                  "heavy_imported": sorted({"torch", "numpy", "scipy"} & set(sys.modules))}))
"""


def test_wheel_installed_in_a_fresh_venv_finds_its_kernels(tmp_path, monkeypatch):
    monkeypatch.delenv(sources.ENV_KERNELS_DIR, raising=False)  # compare with the repository's kernels/
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KVC_KERNELS_DIR", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    src = tmp_path / "src"  # a copy, so the build writes no build/ or egg-info into the repository
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("kvc", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", dist, src], tmp_path, env)
    (wheel,) = dist.glob("kvc-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "kvc").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    packaged = {f"kvc/gpu/cuda/{n}.cu" for n in set(KERNEL_FILES.values())} | {
        f"kvc/gpu/cuda/{COMMON_HEADER}", "kvc/gpu/cuda/emulation/kvc_emu.cpp", "kvc/gpu/cuda/emulation/kvc_emu.hpp"}
    assert packaged <= names, f"kernel sources missing from the wheel: {sorted(packaged - names)}"
    assert "kvc/compression/catalogue.json" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path, env)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], tmp_path, env)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = json.loads(_run([python, "-I", "-c", PROBE], outside, env))

    assert not probe["torch_installed"], "the fresh venv sees torch: the torch-free import is not tested"
    assert probe["heavy_imported"] == []
    assert probe["methods"] == sorted(catalogue.methods())  # kvc methods works from the wheel, without torch
    kernels = Path(probe["kernels_dir"])
    assert kernels.is_relative_to(Path(probe["purelib"]).resolve()) and kernels.parts[-3:] == ("kvc", "gpu", "cuda")
    assert {p.removeprefix("kvc/gpu/cuda/") for p in packaged} <= set(probe["files"])
    assert probe["turboquant"] == kernel_source("turboquant")  # the repository's text, header inlined


@pytest.mark.parametrize("where", ["repository", "override"])
def test_kernels_dir_outside_a_wheel(where, monkeypatch, tmp_path):
    """A source checkout (editable install) reads kernels/ at the top; $KVC_KERNELS_DIR wins over both."""
    if where == "override":
        monkeypatch.setenv(sources.ENV_KERNELS_DIR, str(tmp_path))
        assert sources.kernels_dir() == tmp_path
    else:
        monkeypatch.delenv(sources.ENV_KERNELS_DIR, raising=False)
        assert not sources.PACKAGED_DIR.exists()
        assert sources.kernels_dir() == ROOT / "kernels"
