"""arrow_tensor: exact tensor <-> Arrow codec for dora-rs dataflows.

``encode`` turns a tensor into a 1-D Arrow array plus flat metadata; ``decode`` rebuilds the
same tensor (dtype, shape, layout, bits) as a zero-copy, read-only-by-contract view.
The wire format is specified in SPEC.md.
"""

from __future__ import annotations

from ._api import decode, encode
from ._errors import (
    ArrowTensorError,
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
    UnsupportedTensorError,
    VersionError,
)

__all__ = [
    "ArrowTensorError",
    "ChecksumError",
    "ConfigError",
    "CudaUnavailableError",
    "IncompleteTransferError",
    "MetadataError",
    "NotATensorMessageError",
    "PayloadError",
    "PoolExhaustedError",
    "ShmHandleError",
    "StaleHandleError",
    "UnsupportedTensorError",
    "VersionError",
    "decode",
    "encode",
]
__version__ = "0.1.0"
