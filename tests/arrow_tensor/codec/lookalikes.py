"""Hostile str subclasses shared by test modules (imported by name: pytest puts this
folder on ``sys.path``)."""

from __future__ import annotations

CACHED_TEXT = "numpy;float32;3,4;0,1"
"""The header the tests decode (and so cache) first: float32 [3, 4], C order."""


class Spoof(str):
    """A str subclass that hashes and compares like ``CACHED_TEXT``, whatever it holds."""

    def __hash__(self) -> int:
        return hash(CACHED_TEXT)

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False
