"""kvc.threads.cpu_threads: torch's intra-op threads never exceed the cores the process may use."""

from __future__ import annotations

import os

import pytest
import torch

import kvc
import kvc.threads
from kvc.threads import cpu_threads


@pytest.fixture
def two_threads(monkeypatch):
    """torch at 2 threads as if it had chosen them itself, no OMP_NUM_THREADS; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(kvc.threads, "_STARTING_THREADS", 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def _cores(monkeypatch, n):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))


def test_capped_at_the_cores_allowed(two_threads, monkeypatch):
    _cores(monkeypatch, 1)
    assert cpu_threads() == 1 and torch.get_num_threads() == 1
    assert cpu_threads() == 1 and torch.get_num_threads() == 1  # again: nothing changes


def test_never_raised(two_threads, monkeypatch):
    _cores(monkeypatch, 8)
    assert cpu_threads() == 2 and torch.get_num_threads() == 2


def test_omp_num_threads_is_kept(two_threads, monkeypatch):
    _cores(monkeypatch, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads() == 2 and torch.get_num_threads() == 2


def test_a_count_set_after_import_is_kept(two_threads, monkeypatch):
    _cores(monkeypatch, 1)
    monkeypatch.setattr(kvc.threads, "_STARTING_THREADS", 3)  # torch started at 3; 2 is the user's
    assert cpu_threads() == 2 and torch.get_num_threads() == 2


def test_api_and_computing_commands_apply_it(two_threads, monkeypatch, run, tmp_path):
    _cores(monkeypatch, 1)
    kvc.synth(tmp_path / "api.safetensors", layers=1, kv_heads=1, heads=1, head_dim=8, seq_len=16, num_seqs=1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    code, _, err = run("synth", "-o", tmp_path / "cli.safetensors", "--layers", 1, "--kv-heads", 1,
                       "--heads", 1, "--head-dim", 8, "--seq-len", 16, "--num-seqs", 1)
    assert code == 0, err
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    code, _, err = run("methods")  # computes nothing: left alone
    assert code == 0, err
    assert torch.get_num_threads() == 2
