"""The one metadata schema: key names, writing and strict validation (see SPEC.md)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import _dtypes
from ._errors import MetadataError, NotATensorMessageError, VersionError

PREFIX = "at."
VERSION = 1
KEY_VERSION = "at.version"
KEY_KIND = "at.kind"
KEY_FRAMEWORK = "at.framework"
KEY_DTYPE = "at.dtype"
KEY_SHAPE = "at.shape"
KEY_PERM = "at.perm"
KEY_CHECKSUM = "at.checksum"

KIND_TENSOR = "tensor"
FRAMEWORKS = ("numpy", "torch")
MAX_NDIM = 64
MAX_ELEMENTS = 1 << 62


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def require(meta: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """``meta[key]`` checked against ``kind`` (bool never passes for int), else MetadataError."""
    if key not in meta:
        raise MetadataError(f"metadata lacks {key!r}; received keys {sorted(meta)[:20]}")
    value = meta[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise MetadataError(f"{key!r} must be {names}, got {_describe(value)}")
    return value


def int_list(meta: Mapping[str, Any], key: str, max_len: int = MAX_NDIM) -> tuple[int, ...]:
    """A list of plain ints under ``key`` (tuples accepted), at most ``max_len`` long."""
    value = require(meta, key, (list, tuple))
    if len(value) > max_len:
        raise MetadataError(f"{key!r} has {len(value)} entries; at most {max_len} are allowed")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise MetadataError(f"{key!r} must be a list of int, got {_describe(value)}")
    return tuple(value)


def check_envelope(meta: object) -> Mapping[str, Any]:
    """Validate that ``meta`` is arrow_tensor metadata of a version we read; return it."""
    if not isinstance(meta, Mapping):
        raise MetadataError(
            f"metadata must be a dict (the second value of at.encode), got {_describe(meta)}"
        )
    if KEY_VERSION not in meta:
        raise NotATensorMessageError(
            f"not an arrow_tensor message: metadata has no {KEY_VERSION!r} key "
            f"(received keys {sorted(meta)[:20]})"
        )
    version = require(meta, KEY_VERSION, int)
    if version != VERSION:
        raise VersionError(
            f"wire-format version {version} is not supported; this decoder reads version "
            f"{VERSION} (upgrade arrow-tensor on the receiver)"
        )
    return meta


@dataclass(frozen=True)
class TensorHeader:
    """What a tensor is, independent of where its bytes travel."""

    dtype: _dtypes.DType
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    framework: str

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Payload size in bytes."""
        return self.numel * self.dtype.itemsize

    @property
    def physical_shape(self) -> tuple[int, ...]:
        """Shape of the C-ordered array the payload bytes form."""
        return tuple(self.shape[p] for p in self.perm)

    def to_metadata(self) -> dict[str, Any]:
        """The flat metadata entries for this header."""
        return {
            KEY_VERSION: VERSION,
            KEY_KIND: KIND_TENSOR,
            KEY_FRAMEWORK: self.framework,
            KEY_DTYPE: self.dtype.name,
            KEY_SHAPE: list(self.shape),
            KEY_PERM: list(self.perm),
        }

    def describe(self) -> str:
        """Canonical one-line text of dtype, shape and permutation (also hashed by checksums)."""
        shape = ",".join(map(str, self.shape))
        perm = ",".join(map(str, self.perm))
        return f"arrow_tensor/{VERSION};{self.dtype.name};[{shape}];[{perm}]"


def parse_header(meta: Mapping[str, Any]) -> TensorHeader:
    """Read and validate a tensor header from metadata already passed by check_envelope."""
    framework = require(meta, KEY_FRAMEWORK, str)
    if framework not in FRAMEWORKS:
        raise MetadataError(f"{KEY_FRAMEWORK!r} must be one of {FRAMEWORKS}, got {framework!r}")
    dtype = _dtypes.lookup(require(meta, KEY_DTYPE, str))
    shape = int_list(meta, KEY_SHAPE)
    if any(d < 0 for d in shape):
        raise MetadataError(f"{KEY_SHAPE!r} has a negative dimension: {list(shape)}")
    if math.prod(shape) > MAX_ELEMENTS:
        raise MetadataError(f"{KEY_SHAPE!r} {list(shape)} has more than 2**62 elements")
    perm = int_list(meta, KEY_PERM)
    if sorted(perm) != list(range(len(shape))):
        raise MetadataError(
            f"{KEY_PERM!r} must be a permutation of 0..{len(shape) - 1} "
            f"for shape {list(shape)}, got {list(perm)}"
        )
    return TensorHeader(dtype, shape, perm, framework)
