"""Configuration helpers shared by the CLI and the services."""

from __future__ import annotations

import re

__all__ = ["parse_bytes", "format_bytes", "ConfigError"]


class ConfigError(ValueError):
    """A configuration value could not be understood."""


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int) -> int:
    """Parse a byte size such as ``"4GiB"``, ``"100 MB"``, ``"512k"`` or ``1024``.

    Parameters
    ----------
    text : str or int
        Size with an optional decimal (``kB``, ``MB``, ``GB``) or binary (``KiB``, ``MiB``, ``GiB``) unit.

    Returns
    -------
    int
        Number of bytes.

    Raises
    ------
    ConfigError
        If the text is not a non-negative size with a known unit.
    """
    if isinstance(text, bool):
        raise ConfigError(f"not a byte size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"byte size must be >= 0, got {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"not a byte size: {text!r} (examples: 4GiB, 100MB, 65536)")
    number, unit = m.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ConfigError(f"unknown byte unit {unit!r} in {text!r}")
    return int(float(number) * factor)


def format_bytes(n: float) -> str:
    """Format a byte count with a binary unit, e.g. ``1.50 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
