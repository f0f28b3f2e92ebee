"""Shared fixtures: the CLI runner, synthetic captures, the real default model."""

from __future__ import annotations

import pytest
import torch

from kvc.cli import main


@pytest.fixture
def run(capsys):
    """run(*args) -> (exit code, stdout, stderr) of ``kvc args``."""

    def _run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return _run


@pytest.fixture
def synth_capture(tmp_path):
    """make(**spec) -> path of a synthetic capture written with kvc.model.synth."""
    from kvc.io.safetensors import save_safetensors
    from kvc.model.synth import SpikedSpec, synthesize

    def _make(name="synth.safetensors", **spec):
        tensors, meta = synthesize(SpikedSpec(**spec))
        path = tmp_path / name
        save_safetensors(path, tensors, meta.to_strings())
        return path

    return _make


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the real default model, SmolLM2-135M-Instruct, float32 on CPU."""
    from kvc.model.load import load_model, resolve_model

    torch.manual_seed(0)
    return load_model(resolve_model(None), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def single_thread():
    """Batched LAPACK calls on 2 shared cores are fastest and steadiest on one thread (use it with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
