"""Structured payloads: nested dicts, lists and tuples of tensors and scalars in one message.

Note [One buffer, one table]
A structure travels as ONE Arrow array holding every tensor leaf's payload, each segment
starting at a multiple of 64 bytes (so typed views are aligned whenever the buffer is), and
flat metadata: a compact JSON *skeleton* (``at.tree``) for the containers and scalars, and a
column table of the tensor leaves (``at.leaf.*``), one entry per leaf in skeleton order. Each
leaf is planned by ``_tensor.plan`` and written by ``TensorPlan.write_into`` (one copy into its
segment), and rebuilt by ``_schema.header_of`` + ``_tensor.view_tensor`` over its slice of
the received buffer: the single-tensor rules (exact bits, same strides for dense layouts,
zero-copy read-only views, ``writable=True`` copies) hold leaf by leaf. The decoder trusts
nothing: offsets must be aligned, in order, non-overlapping and inside the buffer, and the
skeleton must reference leaves 0..n-1 exactly once, in order. See SPEC.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .._errors import MetadataError, UnsupportedTensorError
from . import _checksum, _schema
from . import _tensor as _codec
from ._schema import (
    KEY_LEAF_DTYPE,
    KEY_LEAF_FRAMEWORK,
    KEY_LEAF_NDIM,
    KEY_LEAF_OFFSET,
    KEY_LEAF_PERM,
    KEY_LEAF_SHAPE,
    KEY_TREE,
    KIND_TREE,
)
from ._schema import KEY_TREE_NBYTES as KEY_NBYTES

ALIGNMENT = 64
MAX_DEPTH = 64
# Skeleton tags: a JSON array is always a container or a tensor reference, never a scalar.
TAG_DICT, TAG_LIST, TAG_TUPLE, TAG_TENSOR = "d", "l", "u", "t"
_SCALARS = (bool, int, float, str)
_ROOT = "value"


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _key_path(path: str, key: str) -> str:
    return f"{path}[{json.dumps(key)}]"


@dataclass(frozen=True)
class TreePlan:
    """How a structure goes on the wire: its metadata and where each leaf's bytes go."""

    metadata: dict[str, Any]
    plans: tuple[_codec.TensorPlan, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    nbytes: int

    def write_into(self, dest: Any) -> None:
        """Write every leaf into its segment of the first ``nbytes`` bytes of ``dest``.

        Padding between segments is zeroed so no stale memory travels with the message.
        """
        raw = np.frombuffer(dest, dtype=np.uint8, count=self.nbytes)
        end = 0
        for p, off, size in zip(self.plans, self.offsets, self.sizes, strict=True):
            raw[end:off] = 0
            p.write_into(raw[off : off + size])
            end = off + size
        raw[end:] = 0

    def describe(self) -> str:
        """Canonical text of the skeleton and every leaf header (hashed by checksums)."""
        return _describe(self.metadata[KEY_TREE], [p.header for p in self.plans], self.offsets)


def _describe(skeleton: str, headers: list[_schema.TensorHeader], offsets: Any) -> str:
    leaves = ";".join(
        f"{off}:{h.framework}:{h.describe()}" for h, off in zip(headers, offsets, strict=True)
    )
    return f"arrow_tensor/{_schema.VERSION};{KIND_TREE};{skeleton};{leaves}"


class _Encoder:
    """Walks a structure once, planning tensor leaves and building the skeleton."""

    def __init__(self) -> None:
        self.plans: list[_codec.TensorPlan] = []

    def node(self, x: Any, path: str, depth: int) -> Any:
        if x is None or type(x) in _SCALARS:
            return x
        if depth >= MAX_DEPTH:
            raise UnsupportedTensorError(
                f"{path}: nesting deeper than {MAX_DEPTH} levels is not supported"
            )
        if isinstance(x, dict):
            out: list[Any] = [TAG_DICT]
            for key, value in x.items():
                if type(key) is not str:
                    raise UnsupportedTensorError(
                        f"{path}: dict keys must be str, got {type(key).__name__} {key!r:.60}; "
                        f"convert keys with str()"
                    )
                out.append(key)
                out.append(self.node(value, _key_path(path, key), depth + 1))
            return out
        if type(x) is list or type(x) is tuple:
            tag = TAG_LIST if type(x) is list else TAG_TUPLE
            return [tag, *(self.node(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(x))]
        if isinstance(x, (*_SCALARS, list, tuple)):
            hint = "x._asdict() or tuple(x)" if hasattr(x, "_fields") else "the plain base type"
            raise UnsupportedTensorError(
                f"{path}: {type(x).__qualname__} is a subclass of a supported type and would "
                f"not come back as itself; convert it with {hint}"
            )
        try:
            p = _codec.plan(x)
        except UnsupportedTensorError as exc:
            raise UnsupportedTensorError(
                f"{path}: {exc}; structured payloads hold tensors, dict, list, tuple, "
                f"int, float, bool, str and None"
            ) from exc
        self.plans.append(p)
        return [TAG_TENSOR, len(self.plans) - 1]


def plan_tree(x: Any) -> TreePlan:
    """Plan the encoding of a nested dict / list / tuple of tensors and scalars.

    Raises
    ------
    UnsupportedTensorError
        For non-str dict keys, unsupported leaves or subclasses, naming the path
        (``value["boxes"][2]``).
    """
    enc = _Encoder()
    skeleton = enc.node(x, _ROOT, 0)
    offsets: list[int] = []
    sizes: list[int] = []
    end = 0
    frameworks: list[str] = []
    dtypes: list[str] = []
    ndims: list[int] = []
    shapes: list[int] = []
    perms: list[int] = []
    for p in enc.plans:
        h = p.header
        size = h.numel * h.dtype.itemsize
        off = _align(end)
        offsets.append(off)
        sizes.append(size)
        end = off + size
        frameworks.append(h.framework)
        dtypes.append(h.dtype.name)
        ndims.append(len(h.shape))
        shapes.extend(h.shape)
        perms.extend(h.perm)
    nbytes = -(-end // 8) * 8  # whole uint64 words
    metadata = {
        _schema.KEY_VERSION: _schema.VERSION,
        _schema.KEY_KIND: KIND_TREE,
        KEY_TREE: json.dumps(skeleton, separators=(",", ":")),
        KEY_NBYTES: nbytes,
        KEY_LEAF_FRAMEWORK: frameworks,
        KEY_LEAF_DTYPE: dtypes,
        KEY_LEAF_NDIM: ndims,
        KEY_LEAF_SHAPE: shapes,
        KEY_LEAF_PERM: perms,
        KEY_LEAF_OFFSET: offsets,
    }
    return TreePlan(metadata, tuple(enc.plans), tuple(offsets), tuple(sizes), nbytes)


def encode_tree(x: Any, checksum: bool = False) -> tuple[pa.Array, dict[str, Any]]:
    """Encode a structure as one uint64 Arrow array plus flat metadata (see SPEC.md).

    Parameters
    ----------
    x:
        A dict (str keys, order kept), list or tuple, nested at most 64 levels, whose leaves
        are CPU torch tensors, numpy arrays, int, float, bool, str or None.
    checksum:
        Attach an xxh3-64 checksum of the skeleton, every leaf header and all payload bytes.

    Returns
    -------
    (array, metadata)
        ``array`` holds every tensor's bytes (one copy each, 64-byte aligned segments);
        ``metadata`` is flat and dora-safe; add your own keys beside it.

    Raises
    ------
    UnsupportedTensorError
        Naming the path of the offending key or leaf.
    """
    return encode_plan(plan_tree(x), checksum)


def encode_plan(tp: TreePlan, checksum: bool = False) -> tuple[pa.Array, dict[str, Any]]:
    """``encode_tree`` of an already made plan (the transport plans once, then decides)."""
    words = np.zeros(tp.nbytes // 8, dtype=np.uint64)
    tp.write_into(words)
    array = pa.Array.from_buffers(pa.uint64(), len(words), [None, pa.py_buffer(words)])
    metadata = dict(tp.metadata)
    if checksum:
        metadata[_schema.KEY_CHECKSUM] = _checksum.digest(tp.describe(), words)
    return array, metadata


def _str_list(meta: Mapping[str, Any], key: str, n: int) -> list[str]:
    value = _schema.require(meta, key, (list, tuple))
    if len(value) != n or not all(isinstance(v, str) for v in value):
        raise MetadataError(f"{key!r} must be a list of {n} str (one per tensor leaf)")
    return list(value)


def _int_list(meta: Mapping[str, Any], key: str, n: int | None = None) -> tuple[int, ...]:
    value = _schema.int_list(meta, key, max_len=1 << 40)
    if n is not None and len(value) != n:
        raise MetadataError(
            f"{key!r} has {len(value)} entries; the leaf table needs {n} (one per tensor leaf)"
        )
    return value


def decode_tree(
    array: Any, meta: Mapping[str, Any], writable: bool = False, verify: bool = False
) -> Any:
    """Rebuild the structure that ``encode_tree`` produced.

    Parameters
    ----------
    array, meta:
        What ``encode_tree`` returned, or what dora delivered, with ``meta`` already
        accepted by ``_schema.check_envelope``.
    writable:
        ``False``: tensor leaves are zero-copy views of the received buffer (read-only by
        contract). ``True``: private writable copies.
    verify:
        Check the ``at.checksum`` covering skeleton, leaf headers and all payload bytes.

    Returns
    -------
    The same dicts (key order kept), lists, tuples, scalars and tensors that were encoded.

    Raises
    ------
    MetadataError, PayloadError, ChecksumError
        For a malformed skeleton or leaf table, segments outside the buffer or overlapping,
        or a checksum mismatch.
    """
    skeleton_text = _schema.require(meta, KEY_TREE, str)
    nbytes = _schema.require(meta, KEY_NBYTES, int)
    buf = _codec.read_payload(array, nbytes, "the tree's payload", f"{KEY_NBYTES!r} says")
    ndims = _int_list(meta, KEY_LEAF_NDIM)
    n = len(ndims)
    frameworks = _str_list(meta, KEY_LEAF_FRAMEWORK, n)
    dtypes = _str_list(meta, KEY_LEAF_DTYPE, n)
    total_dims = sum(ndims)
    shapes = _int_list(meta, KEY_LEAF_SHAPE, total_dims)
    perms = _int_list(meta, KEY_LEAF_PERM, total_dims)
    offsets = _int_list(meta, KEY_LEAF_OFFSET, n)
    headers: list[_schema.TensorHeader] = []
    start = end = 0
    for i in range(n):
        ndim, off = ndims[i], offsets[i]
        if not 0 <= ndim <= _schema.MAX_NDIM:
            raise MetadataError(f"leaf {i}: ndim {ndim} outside 0..{_schema.MAX_NDIM}")
        shape, perm = shapes[start : start + ndim], perms[start : start + ndim]
        if any(not -(1 << 63) <= v < 1 << 63 for v in shape + perm):  # what dora carries
            raise MetadataError(f"leaf {i}: shape or perm entries outside int64")
        header = _schema.header_of(
            _schema.pack(frameworks[i], dtypes[i], shape, perm),
            where=f"leaf {i} (its at.leaf.* entries read as)",
        )
        start += ndim
        if off % ALIGNMENT or off < end or off + header.nbytes > nbytes:
            raise MetadataError(
                f"leaf {i}: segment [{off}, {off + header.nbytes}) must start at a multiple "
                f"of {ALIGNMENT}, at or after the previous segment's end {end}, and end "
                f"inside the {nbytes}-byte payload"
            )
        end = off + header.nbytes
        headers.append(header)
    if verify:
        _checksum.verify(
            meta.get(_schema.KEY_CHECKSUM), _describe(skeleton_text, headers, offsets), buf
        )
    try:
        skeleton = json.loads(skeleton_text)
    except (ValueError, RecursionError) as exc:
        raise MetadataError(f"{KEY_TREE!r} is not valid JSON: {str(exc)[:80]}") from exc
    builder = _Builder(headers, offsets, buf, writable)
    value = builder.node(skeleton, _ROOT, 0)
    if builder.next_leaf != n:
        raise MetadataError(
            f"{KEY_TREE!r} references {builder.next_leaf} tensor leaves; the table has {n}"
        )
    return value


class _Builder:
    """Rebuilds a structure from its skeleton; leaves are taken strictly in table order."""

    def __init__(
        self,
        headers: list[_schema.TensorHeader],
        offsets: tuple[int, ...],
        buf: pa.Buffer,
        writable: bool,
    ) -> None:
        self.headers, self.offsets, self.buf, self.writable = headers, offsets, buf, writable
        self.next_leaf = 0

    def node(self, s: Any, path: str, depth: int) -> Any:
        if s is None or type(s) in _SCALARS:
            return s
        if type(s) is not list or not s or depth >= MAX_DEPTH:
            raise MetadataError(
                f"{KEY_TREE!r} at {path}: expected a scalar or a tagged list nested at most "
                f"{MAX_DEPTH} deep, got {type(s).__name__} {json.dumps(s)[:60]}"
            )
        tag = s[0]
        if tag == TAG_TENSOR:
            if len(s) != 2 or s[1] != self.next_leaf or type(s[1]) is not int:
                raise MetadataError(
                    f"{KEY_TREE!r} at {path}: expected tensor reference "
                    f"[{TAG_TENSOR!r}, {self.next_leaf}], got {json.dumps(s)[:60]}"
                )
            if self.next_leaf >= len(self.headers):
                raise MetadataError(
                    f"{KEY_TREE!r} at {path}: tensor {self.next_leaf} is not in the leaf table "
                    f"of {len(self.headers)}"
                )
            i = self.next_leaf
            self.next_leaf += 1
            header = self.headers[i]
            piece = self.buf.slice(self.offsets[i], header.nbytes)
            return _codec.view_tensor(header, piece, self.writable)
        if tag == TAG_LIST or tag == TAG_TUPLE:
            items = [self.node(v, f"{path}[{k}]", depth + 1) for k, v in enumerate(s[1:])]
            return items if tag == TAG_LIST else tuple(items)
        if tag == TAG_DICT:
            if len(s) % 2 != 1:
                raise MetadataError(f"{KEY_TREE!r} at {path}: dict entry without a value")
            out: dict[str, Any] = {}
            for k in range(1, len(s), 2):
                key = s[k]
                if type(key) is not str or key in out:
                    raise MetadataError(
                        f"{KEY_TREE!r} at {path}: dict keys must be unique str, got {key!r:.60}"
                    )
                out[key] = self.node(s[k + 1], _key_path(path, key), depth + 1)
            return out
        raise MetadataError(
            f"{KEY_TREE!r} at {path}: unknown tag {json.dumps(tag)[:40]}; expected one of "
            f"{[TAG_DICT, TAG_LIST, TAG_TUPLE, TAG_TENSOR]}"
        )
