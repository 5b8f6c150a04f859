"""Node settings from environment variables (the ``env:`` block of a dataflow YAML).

One helper, :func:`setting`, reads one variable and turns it into a typed value with a
*parser*; the parsers below say what they expect, so every bad value is rejected with the
variable's name, the value received and what was expected, before the node starts working::

    seed = setting("SEED", integer(minimum=0), 0)
    sizes = setting("SIZES", size_list(), [0, 4096])
    device = setting("DEVICE", choice("auto", "cpu", "cuda"), "auto")

A parser is any callable ``str -> value`` that raises ``ValueError(<what was expected>)``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

from ._errors import ConfigError

__all__ = [
    "boolean",
    "choice",
    "duration",
    "format_size",
    "integer",
    "number",
    "setting",
    "size",
    "size_list",
    "text",
    "text_list",
]

T = TypeVar("T")

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {None: 1.0, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def setting(
    name: str,
    parse: Callable[[str], T],
    default: T,
    *,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Read the environment variable ``name`` through ``parse``.

    Parameters
    ----------
    name:
        The variable, as written under ``env:`` in the dataflow YAML.
    parse:
        One of this module's parsers (``integer()``, ``size()``, ``choice(...)``...) or any
        callable that raises ``ValueError`` whose message says what it expected.
    default:
        Returned when the variable is unset or blank (it is not parsed).
    environ:
        Where to look instead of ``os.environ`` (tests).

    Returns
    -------
    The parsed value, or ``default``.

    Raises
    ------
    ConfigError
        Naming the variable, the value received and what was expected.
    """
    env = os.environ if environ is None else environ
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return parse(raw.strip())
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is invalid: expected {exc}") from None


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """Parser of a whole number within ``[minimum, maximum]`` (underscores allowed)."""
    expected = "an integer" + _bounds(minimum, maximum)

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(expected) from None
        _check_bounds(value, minimum, maximum, expected)
        return value

    return parse


def number(minimum: float | None = None, maximum: float | None = None) -> Callable[[str], float]:
    """Parser of a finite real number within ``[minimum, maximum]``."""
    expected = "a number" + _bounds(minimum, maximum)

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(expected) from None
        if not math.isfinite(value):
            raise ValueError(expected)
        _check_bounds(value, minimum, maximum, expected)
        return value

    return parse


def boolean(raw: str) -> bool:
    """Parser of a switch: 1/true/yes/on or 0/false/no/off (any case)."""
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"a boolean, one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}")


def choice(*options: str) -> Callable[[str], str]:
    """Parser of one of ``options`` (case-insensitive; returns the option as spelled here)."""
    by_lower = {option.lower(): option for option in options}

    def parse(raw: str) -> str:
        found = by_lower.get(raw.lower())
        if found is None:
            raise ValueError(f"one of {', '.join(options)}")
        return found

    return parse


def text(raw: str) -> str:
    """Parser of any non-blank string (stripped)."""
    return raw


def text_list(raw: str) -> list[str]:
    """Parser of a comma-separated list of non-empty items."""
    items = [item.strip() for item in raw.split(",")]
    if not all(items):
        raise ValueError("a comma-separated list of non-empty items, like 'a,b,c'")
    return items


def size(raw: str) -> int:
    """Parser of a byte count: ``0``, ``4096``, ``4KiB``, ``1MB``, ``1.5GiB``.

    K, M, G and T are powers of 1024 with or without ``i``/``B`` (``64MB`` is 64 MiB), as in
    dora's ``shared_memory_pool_size``.
    """
    match = _SIZE.match(raw)
    if match is None or (match.group(3).lower() == "i" and not match.group(2)):
        raise ValueError("a size in bytes like 0, 4096, 4KiB, 1MiB or 64MB (powers of 1024)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value != int(value):
        raise ValueError("a whole number of bytes")
    return int(value)


def size_list() -> Callable[[str], list[int]]:
    """Parser of a comma-separated list of sizes (see :func:`size`), e.g. ``0,4KiB,64MiB``."""

    def parse(raw: str) -> list[int]:
        try:
            return [size(item) for item in text_list(raw)]
        except ValueError:
            raise ValueError(
                "a comma-separated list of sizes like 0,4KiB,1MiB,64MiB (powers of 1024)"
            ) from None

    return parse


def duration(raw: str) -> float:
    """Parser of a duration in seconds: ``30``, ``30s``, ``500ms``, ``2m``, ``1h``."""
    match = _DURATION.match(raw)
    if match is None:
        raise ValueError("a duration like 30, 30s, 500ms, 2m or 1h")
    unit = match.group(2).lower() if match.group(2) else None
    return float(match.group(1)) * _DURATION_UNITS[unit]


def format_size(nbytes: int) -> str:
    """The shortest exact label for a byte count: ``0B``, ``100B``, ``4KiB``, ``64MiB``."""
    for suffix, unit in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes and nbytes % unit == 0:
            return f"{nbytes // unit}{suffix}"
    return f"{nbytes}B"


def _bounds(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def _check_bounds(
    value: float, minimum: float | None, maximum: float | None, expected: str
) -> None:
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(expected)
