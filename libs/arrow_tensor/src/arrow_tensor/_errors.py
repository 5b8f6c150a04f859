"""The error types of arrow_tensor: one base, a few precise subclasses.

The bottom of the package: every layer raises these, and this module imports nothing of ours.
"""

from __future__ import annotations

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
    "ShmHandleError",
    "StaleHandleError",
    "TransportError",
    "UnsupportedTensorError",
    "VersionError",
]


class ArrowTensorError(ValueError):
    """Base class of every error arrow_tensor raises on purpose."""


class UnsupportedTensorError(ArrowTensorError, TypeError):
    """The value cannot be encoded (unknown type, dtype, layout or device)."""


class MetadataError(ArrowTensorError):
    """The metadata of a message is missing keys, has wrong types or inconsistent values."""


class NotATensorMessageError(MetadataError):
    """The message carries no arrow_tensor metadata at all: it was sent by someone else."""


class VersionError(MetadataError):
    """The message was written by a wire-format version this decoder does not read."""


class PayloadError(ArrowTensorError):
    """The Arrow array does not hold what the metadata describes (type, nulls, size)."""


class ConfigError(ArrowTensorError):
    """A node setting (an ``env:`` variable in the dataflow YAML) has a value we cannot use."""


class ChecksumError(ArrowTensorError):
    """``verify=True`` found a content, dtype or shape that differs from what was sent."""


class IncompleteTransferError(PayloadError):
    """A value sent in several chunks was lost, duplicated, reordered or inconsistent.

    Only that value is dropped; later values from the same sender are unaffected.
    """


class ShmHandleError(MetadataError):
    """A loaned-memory handle is malformed, foreign to this dataflow or outside its pool."""


class StaleHandleError(PayloadError):
    """A loaned-memory handle names memory that is gone or reused (producer exited, lease over)."""


class PoolExhaustedError(ArrowTensorError):
    """Every slot of a loaned-memory pool stayed loaned or held for the whole wait."""


class TransportError(ArrowTensorError):
    """A transport was asked for that this value or output cannot take (``send(transport=...)``)."""


class CudaUnavailableError(ArrowTensorError):
    """This process cannot share or open CUDA memory (no CUDA, no legacy IPC, unknown device)."""


class BatchError(ArrowTensorError):
    """Items cannot be stacked into one batch, or a batched value cannot be split per item."""
