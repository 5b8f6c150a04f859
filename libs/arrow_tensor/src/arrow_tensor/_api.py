"""The public verbs: ``encode`` picks the codec for a value, ``decode`` for a message kind."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from . import _schema
from ._errors import MetadataError

# Message kind (``at.kind``) -> (private module, function(array, meta, writable, verify)).
# Modules are imported on first use so that ``import arrow_tensor`` stays light.
_DECODERS: dict[str, tuple[str, str]] = {
    _schema.KIND_TENSOR: ("._codec", "decode_tensor"),
}


def encode(x: Any, checksum: bool = False) -> tuple[pa.Array, dict[str, Any]]:
    """Encode a tensor as a 1-D Arrow array plus flat metadata.

    Parameters
    ----------
    x:
        A ``torch.Tensor`` on the CPU or a ``numpy.ndarray`` of any supported dtype and
        layout.
    checksum:
        Attach an xxh3-64 checksum of dtype, shape, layout and content (``at.checksum``),
        checked by ``decode(..., verify=True)``.

    Returns
    -------
    (array, metadata)
        ``array`` is a 1-D ``pyarrow`` unsigned-integer array: over the tensor's own memory
        when its layout is dense (no copy), else over one compacted copy. ``metadata`` is a
        flat dict of ``at.``-prefixed keys that dora carries intact; add your own keys
        beside them.

    Raises
    ------
    UnsupportedTensorError
        For anything without an exact wire form; the message names the alternative.
    """
    from ._codec import encode_tensor

    return encode_tensor(x, checksum=checksum)


def decode(
    array: Any, metadata: Mapping[str, Any], writable: bool = False, verify: bool = False
) -> Any:
    """Rebuild exactly what ``encode`` was given.

    Parameters
    ----------
    array, metadata:
        What ``encode`` returned, or what dora delivered (``event["value"]``,
        ``event["metadata"]``). Keys arrow_tensor does not own (dora's ``timestamp``,
        your own) are ignored.
    writable:
        ``False`` (default): a zero-copy view of the received buffer that must not be
        written; numpy results are flagged read-only, torch has no such flag (see the
        read-only contract in the README). ``True``: a private, writable copy with the
        same layout.
    verify:
        Check the ``at.checksum`` written by ``encode(..., checksum=True)``; a message
        without one raises ``ChecksumError``.

    Returns
    -------
    The same kind that was encoded (torch in, torch out; numpy in, numpy out) with the same
    dtype, shape and bits, and for dense layouts the same strides.

    Raises
    ------
    NotATensorMessageError, VersionError, MetadataError, PayloadError, ChecksumError
        Subclasses of ``ArrowTensorError``; the message says what was received and what
        was expected.
    """
    meta = _schema.check_envelope(metadata)
    kind = _schema.require(meta, _schema.KEY_KIND, str)
    target = _DECODERS.get(kind)
    if target is None:
        raise MetadataError(
            f"unknown message kind {kind[:40]!r}; this decoder reads {sorted(_DECODERS)}"
        )
    module = importlib.import_module(target[0], __package__)
    return getattr(module, target[1])(array, meta, writable=writable, verify=verify)
