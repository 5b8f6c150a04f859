"""The one metadata schema: every ``at.`` key and message kind, writing and strict validation.

Every key any room writes or reads is named here, and nowhere else (SPEC.md documents them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .._errors import MetadataError, NotATensorMessageError, VersionError
from . import _dtypes, _layout
from ._memo import Memo

PREFIX = "at."
VERSION = 2
KEY_VERSION = "at.version"
KEY_KIND = "at.kind"
KEY_TENSOR = "at.tensor"
"""The tensor header, one string: ``<framework>;<dtype>;<shape>;<perm>`` (see SPEC.md)."""
KEY_CHECKSUM = "at.checksum"
KEY_SEQ = "at.seq"
"""The message's number on its output: 0, 1, 2... (SPEC.md, Sequence numbers)."""

# The message kinds (``at.kind``), one per way a value can travel (SPEC.md, Message kinds).
KIND_TENSOR = "tensor"
"""One tensor, its payload in the message."""
KIND_TREE = "tree"
"""A nested dict / list / tuple of tensors and scalars in one buffer (codec._tree)."""
KIND_CHUNK = "chunk"
"""One part of a value too large for one dora message (transport._chunks)."""
KIND_SHM = "shm"
"""A handle to a tensor in a producer's shared-memory pool (memory._host_pool)."""
KIND_CUDA = "cuda"
"""A CUDA IPC descriptor: no payload bytes leave the device (memory.cuda)."""
KIND_PLAIN = "plain"
"""A plain Arrow array as node-hub nodes send it: text, bytes, a flat list (codec._plain)."""
KINDS = (KIND_TENSOR, KIND_TREE, KIND_CHUNK, KIND_SHM, KIND_CUDA, KIND_PLAIN)

# Plain values (SPEC.md, Plain values).
KEY_PLAIN = "at.plain"
"""What the plain array stands for: ``arrow``, ``str``, ``bytes`` or ``list``."""

# Structured payloads (SPEC.md, Structured payloads).
KEY_TREE = "at.tree"
KEY_TREE_NBYTES = "at.nbytes"
KEY_LEAF_FRAMEWORK = "at.leaf.framework"
KEY_LEAF_DTYPE = "at.leaf.dtype"
KEY_LEAF_NDIM = "at.leaf.ndim"
KEY_LEAF_SHAPE = "at.leaf.shape"
KEY_LEAF_PERM = "at.leaf.perm"
KEY_LEAF_OFFSET = "at.leaf.offset"

# Chunks (SPEC.md, Chunks past dora's message cap).
KEY_CHUNK_KIND = "at.chunk.kind"
KEY_CHUNK_STREAM = "at.chunk.stream"
KEY_CHUNK_SEQ = "at.chunk.seq"
KEY_CHUNK_INDEX = "at.chunk.index"
KEY_CHUNK_COUNT = "at.chunk.count"
KEY_CHUNK_OFFSET = "at.chunk.offset"
KEY_CHUNK_TOTAL = "at.chunk.total"
CHUNK_PREFIX = "at.chunk."

# Shared-memory pool handles (SPEC.md, Shared-memory pool handles).
KEY_SHM_POOL = "at.shm.pool"
KEY_SHM_SLOT = "at.shm.slot"
KEY_SHM_GENERATION = "at.shm.gen"
KEY_SHM_SEQ = "at.shm.seq"
KEY_SHM_OFFSET = "at.shm.offset"
KEY_SHM_PROBE = "at.shm.probe"
"""On a message that carries its value itself: a pool its receivers should open, so that
the producer learns they can (Note [Relay-safe handles] in memory._host_pool)."""

# CUDA IPC descriptors (SPEC.md, CUDA IPC descriptors).
KEY_CUDA_BACKEND = "at.cuda.backend"
KEY_CUDA_OFFSET = "at.cuda.offset"
KEY_CUDA_ALLOC = "at.cuda.alloc_size"
KEY_CUDA_UUID = "at.cuda.device_uuid"
KEY_CUDA_PCI = "at.cuda.pci_bus_id"
KEY_CUDA_EVENT = "at.cuda.event"
KEY_CUDA_BLOCK = "at.cuda.block"
KEY_CUDA_SLOT = "at.cuda.slot"
KEY_CUDA_GENERATION = "at.cuda.gen"
KEY_CUDA_SEQ = "at.cuda.seq"

FRAMEWORKS = ("numpy", "torch", "cupy", "pyarrow.cuda")  # the last two: CUDA descriptors only
MAX_NDIM = 64
MAX_ELEMENTS = 1 << 62
MAX_HEADER_CHARS = 4096
"""Longer ``at.tensor`` values are refused unread (valid ones are a few hundred at most)."""
_DIMS = re.compile(r"(?:0|[1-9][0-9]{0,18})(?:,(?:0|[1-9][0-9]{0,18}))*")
"""A shape or permutation field: canonical decimal integers, comma separated."""


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def require(meta: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """``meta[key]`` checked against ``kind`` (bool never passes for int), else MetadataError."""
    if key not in meta:
        raise MetadataError(f"metadata lacks {key!r}; received keys {sorted(map(str, meta))[:20]}")
    value = meta[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise MetadataError(f"{key!r} must be {names}, got {_describe(value)}")
    return value


def require_index(
    meta: Mapping[str, Any],
    key: str,
    minimum: int = 0,
    error: type[MetadataError] = MetadataError,
) -> int:
    """``meta[key]``, an int in ``minimum..2**63-1`` (what a handle's slot, offset or sequence
    number may be), else ``error`` naming the key and the value."""
    value = require(meta, key, int)
    if not minimum <= value < 1 << 63:
        raise error(f"{key!r} must be in {minimum}..2**63-1, got {value}")
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
    if type(meta) is dict and type(meta.get(KEY_VERSION)) is int and meta[KEY_VERSION] == VERSION:
        return meta  # what dora delivers, checked in three steps
    if not isinstance(meta, Mapping):
        raise MetadataError(
            f"metadata must be a dict (the second value of at.encode), got {_describe(meta)}"
        )
    if KEY_VERSION not in meta:
        raise NotATensorMessageError(
            f"not an arrow_tensor message: metadata has no {KEY_VERSION!r} key "
            f"(received keys {sorted(map(str, meta))[:20]})"
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
    """What a tensor is, independent of where its bytes travel.

    Derived values are computed once per header: ``parse_header`` hands out the same header
    object for a stream's repeated metadata, so a receiver derives them once per stream.
    """

    dtype: _dtypes.DType
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    framework: str

    @cached_property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @cached_property
    def nbytes(self) -> int:
        """Payload size in bytes."""
        return self.numel * self.dtype.itemsize

    @cached_property
    def physical_shape(self) -> tuple[int, ...]:
        """Shape of the C-ordered array the payload bytes form."""
        return tuple(self.shape[p] for p in self.perm)

    @cached_property
    def inverse_perm(self) -> tuple[int, ...]:
        """The permutation that turns the physical array back into the logical tensor."""
        return tuple(_layout.inverse(self.perm))

    @cached_property
    def element_strides(self) -> tuple[int, ...]:
        """Strides, in elements, of the logical tensor viewed over the dense payload."""
        return tuple(_layout.dense_strides(self.shape, self.perm))

    @cached_property
    def text(self) -> str:
        """The ``at.tensor`` value of this header."""
        return pack(self.framework, self.dtype.name, self.shape, self.perm)

    def to_metadata(self) -> dict[str, Any]:
        """The flat metadata entries for this header."""
        return {KEY_VERSION: VERSION, KEY_KIND: KIND_TENSOR, KEY_TENSOR: self.text}

    def describe(self) -> str:
        """Canonical one-line text of dtype, shape and permutation (also hashed by checksums)."""
        shape = ",".join(map(str, self.shape))
        perm = ",".join(map(str, self.perm))
        return f"arrow_tensor/{VERSION};{self.dtype.name};[{shape}];[{perm}]"


def span_bytes(shape: Any, itemsize: int) -> int:
    """Bytes a shape spans with its zero dimensions counted as 1 (at most ``MAX_ELEMENTS``:
    numpy and torch size every dimension even of an empty tensor)."""
    return math.prod(max(d, 1) for d in shape) * itemsize


def unencodable(shape: Any, itemsize: int) -> str | None:
    """Why a tensor of this shape has no header decoders accept (encoders refuse it), or None."""
    if len(shape) > MAX_NDIM:
        return f"{len(shape)} dimensions; at most {MAX_NDIM}"
    if span_bytes(shape, itemsize) > MAX_ELEMENTS:
        return (
            f"shape {list(shape)} spans more than 2**62 bytes with its zero dimensions counted "
            "as 1 (SPEC.md): no decoder accepts it; send a smaller empty tensor"
        )
    return None


def pack(framework: str, dtype: str, shape: Any, perm: Any) -> str:
    """The ``at.tensor`` text of a header's fields, unvalidated (tests build hostile ones)."""
    return f"{framework};{dtype};{','.join(map(str, shape))};{','.join(map(str, perm))}"


_HEADERS: Memo[str, TensorHeader] = Memo(256)
"""Headers already validated, by their exact ``at.tensor`` text (see ``header_of``)."""
_ENCODED: Memo[tuple[str, tuple[int, ...], tuple[int, ...], str], TensorHeader] = Memo(256)
"""Headers of tensors being encoded (trusted, so kept apart from ``_HEADERS``)."""


def encoder_header(
    dtype: _dtypes.DType, shape: tuple[int, ...], perm: tuple[int, ...], framework: str
) -> TensorHeader:
    """The header of a tensor being encoded; the same object while a stream repeats it."""
    key = (dtype.name, shape, perm, framework)
    header = _ENCODED.get(key)
    if header is None:
        header = _ENCODED.remember(key, TensorHeader(dtype, shape, perm, framework))
    return header


def parse_header(meta: Mapping[str, Any]) -> TensorHeader:
    """Read and validate the tensor header (``at.tensor``) of metadata passed by check_envelope."""
    text = meta.get(KEY_TENSOR)
    if type(text) is not str:  # absent, of another type, or a str subclass: never memoized
        return parse_text(require(meta, KEY_TENSOR, str))
    return header_of(text)


def header_of(text: str, where: str = repr(KEY_TENSOR)) -> TensorHeader:
    """``parse_text(text, where)``, memoized: a stream repeats the same few headers, so the
    same header object (and its derived values) comes back for a text validated before."""
    header = _HEADERS.get(text)
    if header is None:
        header = _HEADERS.remember(text, parse_text(text, where))
    return header


def parse_text(text: str, where: str = repr(KEY_TENSOR)) -> TensorHeader:
    """Validate an ``at.tensor`` text, every check in a fixed order (SPEC.md, Tensor header).

    ``where`` names the text's origin in error messages.
    """
    text = str.__str__(text)  # a plain str: a subclass's own len or split are not trusted
    if len(text) > MAX_HEADER_CHARS:
        raise MetadataError(
            f"{where} has {len(text)} characters; at most {MAX_HEADER_CHARS} are allowed"
        )
    fields = text.split(";")
    if len(fields) != 4:
        raise MetadataError(
            f"{where} must be '<framework>;<dtype>;<shape>;<perm>' (4 fields separated "
            f"by ';'), got {len(fields)} field(s) in {_describe(text)}"
        )
    framework, dtype, shape, perm = fields
    try:
        return _from_fields(framework, dtype, _dims(shape, "the shape"), _dims(perm, "the perm"))
    except MetadataError as exc:
        raise MetadataError(f"{where} {text[:160]!r}: {exc}") from None


def _dims(field: str, name: str) -> list[int]:
    if not field:
        return []
    if not _DIMS.fullmatch(field):
        raise MetadataError(
            f"{name} must be decimal integers separated by ',' (at most 19 digits each; no "
            f"signs, spaces or leading zeros), got {field[:80]!r}"
        )
    return [int(v) for v in field.split(",")]


def _from_fields(framework: str, dtype: str, shape: list[int], perm: list[int]) -> TensorHeader:
    if framework not in FRAMEWORKS:
        raise MetadataError(f"the framework must be one of {FRAMEWORKS}, got {framework[:40]!r}")
    entry = _dtypes.lookup(dtype)
    if framework == "numpy" and entry.numpy is None:
        raise MetadataError(f"dtype {dtype!r} has no numpy form: it needs framework 'torch'")
    if len(shape) > MAX_NDIM or len(perm) > MAX_NDIM:
        raise MetadataError(
            f"the shape has {len(shape)} and the perm {len(perm)} entries; at most {MAX_NDIM} "
            "dimensions are allowed"
        )
    if span_bytes(shape, entry.itemsize) > MAX_ELEMENTS:
        raise MetadataError(f"the shape {list(shape)} spans more than 2**62 bytes")
    if sorted(perm) != list(range(len(shape))):
        expected = f"a permutation of 0..{len(shape) - 1}" if shape else "empty"
        raise MetadataError(
            f"the perm must be {expected} for shape {list(shape)}, got {list(perm)}"
        )
    return TensorHeader(entry, tuple(shape), tuple(perm), framework)
