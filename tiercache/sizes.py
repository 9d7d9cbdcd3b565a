"""Parsing of byte capacities such as ``"512MiB"`` or ``4_000_000``."""

from __future__ import annotations

import numbers
import operator
import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str | None, what: str = "capacity") -> int:
    """Return ``value`` as a number of bytes.

    Accepts a non-negative ``int`` (or another integer type, such as a numpy integer: taken as the
    ``int``), ``None`` (meaning 0, i.e. disabled) or a string made of a number and an optional unit:
    ``B``, decimal ``KB/MB/GB/TB`` (also ``K/M/G/T``) or binary ``KiB/MiB/GiB/TiB``; units are
    case-insensitive.  Raises ``ValueError`` naming ``what`` for anything else (``bool``, floats,
    negative numbers).
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a byte count or a size string like '512MiB', not {value!r}")
    if not isinstance(value, int) and isinstance(value, numbers.Integral):  # numpy integers
        value = operator.index(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what} must not be negative, got {value}")
        return value
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{what}: cannot parse size {value!r}; use bytes or a string like '512MiB' or '4GiB'")
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
        return int(number)
    raise ValueError(f"{what} must be an int or a size string like '512MiB', not {type(value).__name__}")


def format_size(nbytes: int) -> str:
    """Human-readable binary size (``"1.5 MiB"``) for messages and reports."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
