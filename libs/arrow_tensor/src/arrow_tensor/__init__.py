"""arrow_tensor: exact tensor <-> Arrow messages for dora-rs dataflows.

Four verbs: ``encode`` turns a tensor (or a structure of them) into a 1-D Arrow array plus
flat metadata and ``decode`` rebuilds the same value (dtype, shape, layout, bits) as a
zero-copy, read-only-by-contract view; ``send`` puts a value on a dora node's output the
fastest way its receivers can take it, and a ``Receiver`` turns every message of an input
back into values (chunked ones included). The node API is ``arrow_tensor.node``; the wire
format is specified in SPEC.md, the code's layout in ARCHITECTURE.md.
"""

from __future__ import annotations

from ._errors import (
    ArrowTensorError,
    BatchError,
    ChecksumError,
    ConfigError,
    CudaUnavailableError,
    IncompleteTransferError,
    MetadataError,
    NotATensorMessageError,
    PayloadError,
    PoolExhaustedError,
    ShmHandleError,
    StaleHandleError,
    TransportError,
    UnsupportedTensorError,
    VersionError,
)
from .transport._messages import Receiver, decode, encode
from .transport._send import send

__all__ = [
    "ArrowTensorError",
    "BatchError",
    "ChecksumError",
    "ConfigError",
    "CudaUnavailableError",
    "IncompleteTransferError",
    "MetadataError",
    "NotATensorMessageError",
    "PayloadError",
    "PoolExhaustedError",
    "Receiver",
    "ShmHandleError",
    "StaleHandleError",
    "TransportError",
    "UnsupportedTensorError",
    "VersionError",
    "decode",
    "encode",
    "send",
]
__version__ = "0.1.0"
