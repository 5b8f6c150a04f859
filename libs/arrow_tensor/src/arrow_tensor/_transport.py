"""The one place that decides how an encoded value travels through dora.

Today: every value goes inline (``send_output`` of the encoded array). Later transports
(one-copy raw samples, chunking past dora's per-message cap, shared-memory pools, CUDA IPC)
plug in here, behind ``send`` and ``Receiver``, so nodes never choose a transport themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _schema
from ._api import decode, encode
from ._errors import MetadataError

RESERVED_KEYS = ("timestamp", "_framing", "_schema_hash", "request_id", "goal_id", "goal_status")


def user_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate user metadata for dora: no reserved or ``at.`` keys, plain Python values only."""
    out: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise MetadataError(f"metadata keys must be str, got {type(key).__name__} {key!r}")
        if key.startswith(_schema.PREFIX) or key in RESERVED_KEYS or key.startswith("__dora"):
            raise MetadataError(f"metadata key {key!r} is reserved (by arrow_tensor or dora)")
        out[key] = _plain(key, value)
    return out


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


def send(
    node: Any,
    output_id: str,
    value: Any,
    metadata: Mapping[str, Any] | None = None,
    *,
    checksum: bool = False,
) -> None:
    """Encode ``value`` and send it on ``output_id`` of the dora ``node``."""
    extra = user_metadata(metadata)
    array, meta = encode(value, checksum=checksum)
    meta.update(extra)
    node.send_output(output_id, array, meta)


class Receiver:
    """Turns received (array, metadata) pairs into decoded values.

    Stateful so that transports spanning several messages (chunks) can reassemble.
    ``receive`` returns ``None`` while a value is incomplete.
    """

    def __init__(self, writable: bool = False, verify: bool = False) -> None:
        self.writable = writable
        self.verify = verify

    def receive(self, array: Any, metadata: Mapping[str, Any]) -> Any | None:
        """Decode one message; raises ArrowTensorError subclasses for bad input."""
        return decode(array, metadata, writable=self.writable, verify=self.verify)
