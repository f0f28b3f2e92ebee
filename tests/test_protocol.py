"""The method protocol's option declarations: every constraint checked in one place, with one message
format naming the flag, when a method is built (all but the head-dim ones) and on a layer (those)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvc.compression.fields import Valid, checked, option
from kvc.compression.protocol import LayerKV
from kvc.compression.registry import available, build
from kvc.errors import KvcError


def _layer(D: int = 64, T: int = 256) -> LayerKV:
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, 2, T, D, generator=g)
    return LayerKV(0, k, v, torch.randn(1, 2, 8, D, generator=g), torch.arange(T - 8, T), k_pre=k)


@pytest.mark.parametrize("valid, text", [
    (Valid(low=1, high=8), "[1, 8]"),
    (Valid(low=0, high=1, low_open=True), "(0, 1]"),
    (Valid(low=0, high=0.5, high_open=True), "[0, 0.5)"),
    (Valid(low=1), ">= 1"),
    (Valid(low=0, low_open=True), "> 0"),
    (Valid(high=4), "<= 4"),
    (Valid(low=1, odd=True), ">= 1, odd"),
    (Valid(low=1, divides_head_dim=True), ">= 1, divides head_dim"),
    (Valid(low=0, below_head_dim=True), ">= 0, < head_dim"),
    (Valid(choices=("mse", "prod")), "mse | prod"),
    (Valid(), None)])
def test_valid_text(valid, text):
    assert valid.text() == text


@pytest.mark.parametrize("valid, value, head_dim, problem", [
    (Valid(low=1, high=4), 5.0, None, "be in [1, 4]"),
    (Valid(low=1, high=4), 1.0, None, None),
    (Valid(low=1, high=4), 4.0, None, None),
    (Valid(low=1, high=4), float("nan"), None, "be in [1, 4]"),
    (Valid(low=0, high=1, low_open=True), 0.0, None, "be in (0, 1]"),
    (Valid(low=0, high=0.5, high_open=True), 0.5, None, "be in [0, 0.5)"),
    (Valid(low=1), 0, None, "be >= 1"),
    (Valid(low=0, low_open=True), 0, None, "be > 0"),
    (Valid(high=4, high_open=True), 4, None, "be < 4"),
    (Valid(low=1, odd=True), 4, None, "be odd"),
    (Valid(choices=("a", "b")), "c", None, "be one of a, b"),
    (Valid(low=1, divides_head_dim=True), 48, None, None),  # the head dim is checked on a layer
    (Valid(low=1, divides_head_dim=True), 48, 64, "divide head_dim 64"),
    (Valid(low=1, divides_head_dim=True), 16, 64, None),
    (Valid(low=0, below_head_dim=True), 64, 64, "be < head_dim 64"),
    (Valid(low=0, below_head_dim=True), 63, 64, None)])
def test_valid_problem(valid, value, head_dim, problem):
    assert valid.problem(value, head_dim) == problem


@dataclasses.dataclass
class _Options:
    bits: float = option(3.0, "bits", low=1, high=4)
    group: int = option(32, "group", low=1, divides_head_dim=True)
    mode: str = option("a", "mode", choices=("a", "b"))


def test_checked_coerces_then_checks_with_one_message_format():
    options = checked("m", _Options(bits=2, group=16.0))
    assert (options.bits, options.group) == (2.0, 16) and type(options.group) is int
    with pytest.raises(KvcError, match=r"^m: --bits must be in \[1, 4\], got 5$"):
        checked("m", _Options(bits=5))
    with pytest.raises(KvcError, match=r"^m: --bits must be in \[1, 4\], got 4\.5$"):
        checked("m", _Options(bits=4.5))
    with pytest.raises(KvcError, match=r"^m: --mode must be one of a, b, got 'c'$"):
        checked("m", _Options(mode="c"))
    with pytest.raises(KvcError, match=r"^m: --group expects int, got 1\.5$"):
        checked("m", _Options(group=1.5))
    assert checked("m", _Options(group=48)).group == 48
    with pytest.raises(KvcError, match=r"^m: --group must divide head_dim 64, got 48$"):
        checked("m", _Options(group=48), head_dim=64)


def test_head_dim_constraints_are_checked_on_the_layer():
    kivi = build("kivi", group_size=48, residual=0)  # no head dim yet: built
    with pytest.raises(KvcError, match=r"^kivi: --group-size must divide head_dim 64, got 48$"):
        kivi.validate(_layer(D=64))
    kivi.validate(_layer(D=96))


def test_combinations_check_their_parts_under_their_own_names():
    with pytest.raises(KvcError, match=r"^snapkv\+kivi: --kernel must be odd, got 4$"):
        build("snapkv+kivi", kernel=4)
    combined = build("snapkv+kivi", group_size=48)
    with pytest.raises(KvcError, match=r"^snapkv\+kivi: --group-size must divide head_dim 64, got 48$"):
        combined.validate(_layer(D=64))


def test_a_direct_construction_is_checked_too():
    cls = available()["turboquant"]
    with pytest.raises(KvcError, match=r"^turboquant: --bits must be in \[1, 4\], got 0$"):
        cls(cls.Options(bits=0))


def test_every_declared_default_is_valid():
    for name, cls in available().items():
        cls().validate(_layer(D=64))  # the defaults pass every constraint at the usual head dim


def test_repr_names_the_method_and_every_option():
    compressor = build("kivi", bits=3, group_size=16)
    text = repr(compressor)
    assert text.startswith("kivi(") and text.endswith(")")
    assert all(f"{key}={value!r}" in text for key, value in compressor.params().items())
    assert "bits=3" in text and "group_size=16" in text
