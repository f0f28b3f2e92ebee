"""Which layers and positions: the ``--layers 0,2,5-9`` style of index lists, checked before expanding."""

from __future__ import annotations

from .errors import KvcError


def parse_index_list(spec: str, option: str, upper: int) -> list[int]:
    """A comma list of indices and inclusive ranges ('0,4-7') within 0..upper-1."""
    values: set[int] = set()
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise KvcError(f"{option} {spec!r}: expected a list like '0,2,5-9'") from None
        if first > last:
            raise KvcError(f"{option} {spec!r}: the range {first}-{last} is reversed, so empty "
                           f"(write {last}-{first})")
        if first < 0 or last >= upper:  # checked before a range is expanded
            raise KvcError(f"{option} {spec!r}: values must lie in 0..{upper - 1}")
        values.update(range(first, last + 1))
    return sorted(values)


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """'all' / None, or a comma list of layer indices and ranges."""
    if spec in (None, "", "all"):
        return list(range(num_layers))
    return parse_index_list(spec, "--layers", num_layers)
