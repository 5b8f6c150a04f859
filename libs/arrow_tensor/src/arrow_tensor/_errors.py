"""The error types of arrow_tensor: one base, a few precise subclasses."""

from __future__ import annotations

__all__ = [
    "ArrowTensorError",
    "ChecksumError",
    "MetadataError",
    "NotATensorMessageError",
    "PayloadError",
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


class ChecksumError(ArrowTensorError):
    """``verify=True`` found a content, dtype or shape that differs from what was sent."""
