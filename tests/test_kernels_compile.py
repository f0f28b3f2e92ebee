"""Every kernel in kernels/*.cu compiles: nvcc -ptx for sm_80 and sm_90 (CI has nvcc, no GPU).

One nvcc invocation per architecture (all sources at once), the two in parallel, with the options the
kernels are loaded with at run time (kvc.gpu.sources.KERNEL_OPTIONS). Where libnvrtc is found
(a CUDA toolkit, or the nvidia-cuda-nvrtc pip package that cupy uses), the sources are also compiled
with NVRTC exactly as cupy.RawModule does at run time (common header inlined).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvc.gpu.sources import KERNEL_FILES, KERNEL_OPTIONS, kernel_source, kernels_dir

ARCHS = ("sm_80", "sm_90")
SOURCES = sorted(kernels_dir().glob("*.cu"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and Path(root, "bin", "nvcc").is_file():
            return str(Path(root, "bin", "nvcc"))
    return None


def test_every_kernel_file_is_known():
    names = {p.stem for p in SOURCES}
    assert names, f"no kernels in {kernels_dir()}"
    assert set(KERNEL_FILES.values()) <= names
    for path in SOURCES:  # every kernel a source defines is launchable by name
        for entry in re.findall(r'extern "C" __global__ void (\w+)\(', path.read_text()):
            assert KERNEL_FILES.get(entry) == path.stem, f"{path.name}: {entry} missing from KERNEL_FILES"


def test_nvcc_ptx_sm80_sm90(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda): the CUDA toolkit is not installed")
    procs = {}
    for arch in ARCHS:
        out = tmp_path / arch
        out.mkdir()
        cmd = [nvcc, "-ptx", f"-arch={arch}", *KERNEL_OPTIONS, "-Werror", "all-warnings",
               f"-I{kernels_dir()}", "-odir", str(out), *map(str, SOURCES)]
        procs[arch] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for arch, proc in procs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"nvcc -ptx -arch={arch} failed:\n{log}"
        for src in SOURCES:
            ptx = (tmp_path / arch / f"{src.stem}.ptx").read_text()
            target = arch.replace("sm_", "")
            assert f".target sm_{target}" in ptx
            for entry, name in KERNEL_FILES.items():
                if name == src.stem:
                    assert f".entry {entry}(" in ptx, f"{entry} not in {src.name} PTX for {arch}"


def _libnvrtc() -> str | None:
    candidates = []
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates += sorted(glob.glob(str(Path(root, "lib64", "libnvrtc.so*"))))
    for entry in sys.path:  # the nvidia-cuda-nvrtc-cu12 wheel that cupy-cuda12x uses
        candidates += sorted(glob.glob(str(Path(entry, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))))
    for path in candidates:
        if "builtins" in path or ".alt." in path:
            continue
        try:
            ctypes.CDLL(path)
            return path
        except OSError:
            continue
    return None


@pytest.mark.parametrize("name", sorted(set(KERNEL_FILES.values())))
def test_nvrtc_compiles_the_runtime_source(name):
    path = _libnvrtc()
    if path is None:
        pytest.skip("libnvrtc not found (no CUDA toolkit libraries, no nvidia-cuda-nvrtc wheel); nvcc covers it")
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    for arch in ("compute_80", "compute_90"):
        prog = ctypes.c_void_p()
        rc = lib.nvrtcCreateProgram(ctypes.byref(prog), kernel_source(name).encode(), f"{name}.cu".encode(),
                                    0, None, None)
        assert rc == 0, lib.nvrtcGetErrorString(rc)
        opts = [o.encode() for o in (*KERNEL_OPTIONS, f"--gpu-architecture={arch}")]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(max(size.value, 1))
        lib.nvrtcGetProgramLog(prog, log)
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        assert rc == 0, f"NVRTC ({path}) {name}.cu for {arch}: {lib.nvrtcGetErrorString(rc)}\n{log.value.decode()}"
