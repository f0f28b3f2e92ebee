"""Validation of numeric method options: one clear KvcError line for an impossible value."""

from __future__ import annotations

from typing import Any

from kvc.errors import KvcError


def int_option(method: str, name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (an integral float such as 2.0 is accepted), else KvcError."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok and isinstance(value, float):
        ok = value.is_integer()
    if ok:
        value = int(value)
        ok = value >= low and (high is None or value <= high)
    if not ok:
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        raise KvcError(f"{method} --{name.replace('_', '-')} must be an integer {span}, got {value!r}")
    return value
