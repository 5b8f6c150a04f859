"""User metadata: checked once per key, kept to what dora carries with its type."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._errors import MetadataError
from ..codec import _schema
from ..codec._memo import Memo

RESERVED_KEYS = ("timestamp", "_framing", "_schema_hash", "request_id", "goal_id", "goal_status")
"""dora's own keys: a user key of that name would change what dora does or delivers."""
PLAIN_TYPES = frozenset((bool, int, float, str))
KEYS_OK: Memo[str, None] = Memo(4096)
"""User metadata keys checked before (a node sends the same few over and over)."""


def user_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate user metadata for dora: no reserved or ``at.`` keys, plain Python values only.

    Raises
    ------
    MetadataError
        Naming the key and what it must be.
    """
    out: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        if key not in KEYS_OK:
            _check_key(key)
        out[key] = value if type(value) in PLAIN_TYPES else _plain(key, value)
    return out


def _check_key(key: Any) -> None:
    if not isinstance(key, str):
        raise MetadataError(f"metadata keys must be str, got {type(key).__name__} {key!r}")
    if key.startswith(_schema.PREFIX) or key in RESERVED_KEYS or key.startswith("__dora"):
        raise MetadataError(f"metadata key {key!r} is reserved (by arrow_tensor or dora)")
    if type(key) is str:  # a str subclass could change its mind; only plain str is remembered
        KEYS_OK.remember(key, None)


def _plain(key: str, value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()  # numpy / torch scalars: dora would turn them into their str()
    if isinstance(value, (list, tuple)):
        items = [_plain(key, v) for v in value]
        kinds = {type(v) for v in items}
        if kinds <= {int} or kinds <= {float} or kinds <= {str} or kinds <= {int, float}:
            return [float(v) for v in items] if kinds == {int, float} else items
    raise MetadataError(
        f"metadata {key!r} must be bool, int, float, str or a homogeneous list of "
        f"int/float/str (what dora carries with its type), got {type(value).__name__}"
    )
