"""The single-tensor codec: plan, encode, the one payload reader, decode and its fast path.

Note [Zero copy in both directions]
Encoding builds a *plan*: the wire header and a numpy view of the tensor's bits in physical
order (see Note [Layouts on the wire] in _layout). A dense little-endian tensor's payload is
that view itself, wrapped by ``pa.py_buffer``: no byte moves. A non-dense or big-endian
tensor is compacted in exactly one copy, either into a fresh array (``encode``) or straight
into a buffer the caller owns (``TensorPlan.write_into``, used to fill dora's outgoing
shared-memory sample). Decoding validates the metadata against the buffer's size and builds
a view over the received buffer: numpy through ``np.frombuffer``, torch through DLPack (which,
unlike ``torch.from_numpy`` on read-only memory, raises no warning). Writable results are
private copies; see the read-only contract in the README.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .._errors import MetadataError, PayloadError, UnsupportedTensorError
from . import _checksum, _dtypes, _layout, _schema
from ._memo import Memo

_STORAGE_TYPES = {
    t: t.bit_width // 8
    for t in (
        *(pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()),
        *(pa.int8(), pa.int16(), pa.int32(), pa.int64()),
        *(pa.float16(), pa.float32(), pa.float64()),
    )
}
"""Arrow types a payload array may have, and their widths: only containers of bytes."""
# The same, by type id: hashing a pyarrow DataType is slower than hashing an int.
_STORAGE_WIDTHS = {arrow_type.id: width for arrow_type, width in _STORAGE_TYPES.items()}
_HOST_FRAMEWORKS = ("numpy", "torch")


@functools.cache
def storage_type(storage: np.dtype) -> pa.DataType:
    """The Arrow type of a payload whose elements are ``storage`` (``DType.storage``)."""
    return pa.from_numpy_dtype(storage.newbyteorder("="))


def _torch_module() -> Any | None:
    """The torch adapter, if torch is already imported by the user (we never import it first)."""
    if sys.modules.get("torch") is None:  # absent, or blocked with sys.modules["torch"] = None
        return None
    return _torch_adapter()


@functools.cache
def _torch_adapter() -> Any:
    """``_torch``, imported on first use (cached: an import statement costs on every call)."""
    from . import _torch

    return _torch


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor goes on the wire: its header and a physical-order view of its bits."""

    header: _schema.TensorHeader
    source: np.ndarray
    needs_copy: bool

    @property
    def nbytes(self) -> int:
        """Payload size in bytes."""
        return self.header.nbytes

    def payload(self) -> np.ndarray:
        """The payload as a 1-D little-endian unsigned array; a view unless ``needs_copy``."""
        if self.needs_copy:
            dense = np.empty(self.source.shape, dtype=self.source.dtype.newbyteorder("<"))
            compact(dense, self.source)
        else:
            dense = self.source
        return dense.reshape(-1).view(self.header.dtype.storage)

    def write_into(self, dest: Any) -> None:
        """Write the payload into the first ``nbytes`` bytes of the writable buffer ``dest``."""
        write_into(dest, self.source)


def write_into(dest: Any, source: np.ndarray) -> None:
    """Compact ``source`` (physical order) into the writable buffer ``dest``, little-endian.

    No view of ``dest`` outlives the call: dora refuses to send a sample that still has one.
    """
    if source.size == 0:
        return
    target = np.frombuffer(dest, dtype=source.dtype.newbyteorder("<"), count=source.size)
    compact(target.reshape(source.shape), source)


PARALLEL_COPY_BYTES = 4 << 20
"""From this size, ``compact`` lets torch's threaded copy kernel do the work when it can.

Smaller copies gain less than waking torch's worker threads costs on a loaded 2-core machine
(benchmarks/README.md has the figures)."""


def copies_in_parallel(nbytes: int) -> bool:
    """Whether ``compact`` can hand an ``nbytes`` copy to torch's threads (torch imported)."""
    return (
        nbytes >= PARALLEL_COPY_BYTES
        and _torch_module() is not None
        and (_torch_adapter().threads() > 1)
    )


def compact(dest: np.ndarray, source: np.ndarray) -> None:
    """``np.copyto(dest, source)``, bit for bit: the one copy of a payload into place.

    numpy copies on one thread, element by element for strided sources; torch's copy kernel
    splits the work over its intra-op threads. torch copies when it is already imported, the
    payload is large,
    both arrays are writable (torch takes no read-only numpy array without a warning), no
    byte swap is needed and elements are 1, 2, 4 or 8 bytes wide (``_torch.copy_bits``).
    """
    if (
        source.dtype != dest.dtype  # a byte swap: numpy's job
        or not (source.flags.writeable and dest.flags.writeable)
        or not copies_in_parallel(source.nbytes)
        or not _torch_adapter().copy_bits(dest, source)
    ):
        np.copyto(dest, source)


def plan(x: Any, c_order: bool = False) -> TensorPlan:
    """Plan the encoding of a numpy array or CPU torch tensor.

    ``c_order``: the payload in C order (identity permutation) whatever the layout, as
    consumers that know nothing of ``at.tensor`` read it (plain outputs); a tensor that is
    not C-contiguous is then compacted.
    """
    if isinstance(x, np.ndarray) and not _is_masked(x):
        entry = _dtypes.from_numpy(x.dtype)
        bits, framework = x, "numpy"
    else:
        adapter = _torch_module()
        if adapter is None or not adapter.is_tensor(x):
            raise UnsupportedTensorError(_unsupported_message(x))
        bits, entry = adapter.to_numpy_bits(x)
        framework = "torch"
    problem = _schema.unencodable(bits.shape, bits.itemsize)
    if problem is not None:
        raise UnsupportedTensorError(problem)
    order = bits.dtype.byteorder
    little = order in "<|" or (order == "=" and sys.byteorder == "little")
    if c_order:
        perm: tuple[int, ...] = tuple(range(bits.ndim))
        header = _schema.encoder_header(entry, bits.shape, perm, framework)
        return TensorPlan(header, bits, needs_copy=not (bits.flags.c_contiguous and little))
    perm, dense = _layout.analyse(bits.shape, bits.strides, bits.itemsize)
    header = _schema.encoder_header(entry, bits.shape, perm, framework)
    return TensorPlan(header, bits.transpose(perm), needs_copy=not (dense and little))


def _is_masked(x: np.ndarray) -> bool:
    ma = sys.modules.get("numpy.ma")  # not imported by numpy itself; no import, no masked arrays
    return ma is not None and isinstance(x, ma.MaskedArray)


def _unsupported_message(x: object) -> str:
    kind = f"{type(x).__module__}.{type(x).__qualname__}"
    if isinstance(x, np.ndarray):
        return f"got a masked array {kind}, whose mask would be lost; send x.filled() and x.mask"
    if isinstance(x, np.generic):
        return f"got a numpy scalar {kind}; wrap it as a 0-d array with np.asarray(x)"
    if hasattr(x, "__cuda_array_interface__"):
        return f"got a GPU array {kind}; copy it to the host first (.get() or .cpu())"
    if isinstance(x, (bytearray, memoryview)):
        return f"got {kind}; send bytes(x) (plain bytes) or np.frombuffer(x, np.uint8)"
    if hasattr(x, "__array__") or hasattr(x, "__dlpack__"):
        return f"got {kind}; convert it to numpy (np.asarray) or torch (torch.from_dlpack) first"
    return (
        f"expected a torch.Tensor or numpy.ndarray (or a dict / list / tuple of them, or a "
        f"pyarrow.Array, str or bytes), got {kind}"
    )


def encode_tensor(x: Any, checksum: bool = False) -> tuple[pa.Array, dict[str, Any]]:
    """Encode one CPU tensor as a 1-D Arrow array plus flat metadata.

    Parameters
    ----------
    x:
        A ``torch.Tensor`` on the CPU or a ``numpy.ndarray``, any supported dtype and layout.
    checksum:
        Attach an xxh3-64 checksum of dtype, shape, layout and content (``at.checksum``).

    Returns
    -------
    (array, metadata)
        ``array`` is a 1-D ``pyarrow`` array (SPEC.md, Arrow storage) over the tensor's own
        memory when its layout is dense (no copy), else over one compacted copy.
        ``metadata`` is a flat dict of ``at.``-prefixed keys that dora carries intact; add
        your own keys beside them.

    Raises
    ------
    UnsupportedTensorError
        For anything without an exact wire form, with the alternative in the message.
    """
    return encode_plan(plan(x), checksum)


def encode_plan(
    p: TensorPlan, checksum: bool = False, arrow_bool: bool = False
) -> tuple[pa.Array, dict[str, Any]]:
    """``encode_tensor`` of an already made plan (the transport plans once, then decides).

    ``arrow_bool``: a bool tensor as Arrow's own (bit-packed) bool type, which consumers
    that know nothing of ``at.tensor`` read as bools (plain outputs); one copy.
    """
    storage = p.header.dtype.storage
    bools = arrow_bool and p.header.dtype.name == "bool"
    if checksum or p.needs_copy or bools:
        payload = p.payload()
        data = pa.py_buffer(payload)
    else:  # a dense source is C-ordered in physical order: its own bytes, two numpy calls less
        data = pa.py_buffer(p.source)
    if bools:
        array = pa.array(payload.view(np.bool_), pa.bool_())
    else:
        length = p.nbytes // storage.itemsize
        array = pa.Array.from_buffers(storage_type(storage), length, [None, data])
    metadata = p.header.to_metadata()
    if checksum:
        metadata[_schema.KEY_CHECKSUM] = _checksum.digest(p.header.describe(), payload)
    return array, metadata


def read_payload(
    array: object,
    nbytes: int | None,
    what: str = "payload",
    described_by: str = "dtype and shape describe",
) -> pa.Buffer:
    """The exact payload bytes of a received array, after strict checks: the one reader.

    Every message kind's bytes come through here (a tensor's, a tree's, a chunk's, a CUDA
    descriptor's handles). ``array`` must be a ``pyarrow.Array`` of one of the fixed-width
    storage types (SPEC.md, Arrow storage) without nulls; its bytes must be exactly
    ``nbytes`` long (any length when ``nbytes`` is None). ``what`` names the bytes in errors,
    ``described_by`` what said how long they must be.
    """
    if isinstance(array, pa.ChunkedArray):
        raise PayloadError(
            f"{what}: expected a pyarrow.Array, got a ChunkedArray of {array.num_chunks} "
            f"chunks; pass chunked.combine_chunks()"
        )
    if not isinstance(array, pa.Array):
        raise PayloadError(f"{what}: expected a pyarrow.Array, got {type(array).__name__}")
    width = _STORAGE_WIDTHS.get(array.type.id)
    if width is None:
        raise PayloadError(
            f"{what}: expected an array of (u)int8/16/32/64 or float16/32/64, got type {array.type}"
        )
    if array.null_count:
        raise PayloadError(f"{what} array has {array.null_count} nulls; expected none")
    start, length = array.offset * width, len(array) * width
    if nbytes is not None and length != nbytes:
        raise PayloadError(f"{what} holds {length} bytes but {described_by} {nbytes} bytes")
    if length == 0:
        return pa.py_buffer(b"")
    data = array.buffers()[1]
    if data is None or data.size < start + length:
        raise PayloadError(
            f"{what}: the buffer is {0 if data is None else data.size} bytes; "
            f"the array claims {start + length}"
        )
    return data if start == 0 and data.size == length else data.slice(start, length)


def decode_tensor(
    array: Any,
    meta: Mapping[str, Any],
    writable: bool = False,
    verify: bool = False,
    header: _schema.TensorHeader | None = None,
) -> Any:
    """Rebuild the tensor that ``encode_tensor`` produced, bit for bit.

    Parameters
    ----------
    array, meta:
        What ``encode_tensor`` returned, or what dora delivered, with ``meta`` already
        accepted by ``_schema.check_envelope``. Keys arrow_tensor does not own are ignored.
    writable:
        ``False`` (default): a zero-copy view of the received buffer, which must not be
        written (numpy results are flagged read-only; torch has no such flag). ``True``: a
        private writable copy with the same layout.
    verify:
        Check the ``at.checksum`` written by ``encode(..., checksum=True)``.
    header:
        ``parse_header(meta)`` already made by the caller (a receiver caches it per stream).

    Returns
    -------
    A ``torch.Tensor`` if a torch tensor was encoded, else a ``numpy.ndarray``: same dtype,
    shape, bits and, for dense layouts, the same strides.

    Raises
    ------
    NotATensorMessageError, VersionError, MetadataError, PayloadError, ChecksumError
        All subclasses of ``ArrowTensorError``; the message says what was received.
    """
    if header is None:
        header = _schema.parse_header(meta)
    if type(array) is pa.BooleanArray and header.dtype.name == "bool" and not array.null_count:
        # A plain output's bools, bit-packed by Arrow: one byte per element again (a copy).
        array = pa.array(array.to_numpy(zero_copy_only=False).view(np.uint8), pa.uint8())
    buf = read_payload(array, header.nbytes)
    if verify:
        _checksum.verify(meta.get(_schema.KEY_CHECKSUM), header.describe(), buf)
    return view_tensor(header, buf, writable)


def check_host(header: _schema.TensorHeader) -> None:
    """Refuse a header whose framework is a CUDA descriptor's: host bytes decode to numpy/torch."""
    if header.framework not in _HOST_FRAMEWORKS:
        raise MetadataError(
            f"host memory decodes to one of {_HOST_FRAMEWORKS}, but the header names "
            f"{header.framework!r} (a CUDA descriptor's framework)"
        )


def view_tensor(header: _schema.TensorHeader, buf: pa.Buffer, writable: bool) -> Any:
    """The tensor ``header`` describes, over exactly ``header.nbytes`` bytes of ``buf``."""
    check_host(header)  # tensor, tree and shm messages alike
    if header.dtype.name == "bool" and header.nbytes:
        # A byte other than 0/1 is a bool neither numpy nor torch handles consistently
        # (torch compares such a "True" unequal to True): refuse it, one pass over the bytes.
        if np.frombuffer(buf, dtype=np.uint8, count=header.nbytes).max() > 1:
            raise PayloadError("bool payload holds bytes other than 0 and 1")
    if header.framework == "torch":
        try:
            adapter = _torch_adapter()
        except ImportError as exc:
            raise UnsupportedTensorError(
                "this message holds a torch tensor but torch is not installed here"
            ) from exc
        tensor = adapter.from_buffer(buf, header.dtype, header.shape, header.element_strides)
        return adapter.private_copy(tensor) if writable else tensor
    np_dtype = header.dtype.numpy_dtype
    if np_dtype is None:
        raise MetadataError(f"dtype {header.dtype.name!r} has no numpy form; it needs torch")
    if header.nbytes == 0:
        flat = np.empty(header.numel, dtype=np_dtype)
    else:
        flat = np.frombuffer(buf, dtype=np_dtype, count=header.numel)
    out = flat.reshape(header.physical_shape).transpose(header.inverse_perm)
    if writable:
        return np.array(out, order="K", copy=True)
    out.flags.writeable = False
    return out


# --- the fast path for repeated headers (Note [The fast path]) -----------------------------
#
# Note [The fast path]
# A stream repeats a few headers, and a node woken by a message runs with cold caches, where
# every Python frame and every torch or pyarrow call costs several times its warm price
# (benchmarks/README.md measures it). So the first message of a header goes the full
# way (``decode_tensor``: every check) and leaves a ``_FastDecode`` behind; the next ones with
# exactly that header (one dict lookup of the ``at.tensor`` text, an exact ``str``, after
# the version and kind) are checked against it (payload class, nulls and length, in one
# ``to_numpy`` call) and reshaped, as raw dora does, when the payload is of the dtype's own
# Arrow type (what encoders send), else viewed with one ``np.ndarray`` call; plus one DLPack
# import for torch. Headers the fast path does not take (bool, which needs a scan; empty
# tensors; dtypes without numpy form) are remembered as such. The sending side has the same
# shortcut in ``transport._send``: per output and (type, dtype, shape, strides), the
# memoized result of the transport decision and the header's metadata; torch tensors are
# read by their data pointer. The wire is shaped for this (SPEC.md): one header string,
# payloads in their dtype's own Arrow type.


@dataclass(frozen=True, slots=True)
class _FastDecode:
    """Everything needed to view one validated header's payload, derived once."""

    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    """Byte strides of the logical tensor over the dense payload."""
    to_torch: Callable[[np.ndarray], Any] | None
    """Torch in, torch out: ``_torch.from_readonly_numpy``; None for numpy."""
    native: type | None
    """The array class whose ``to_numpy`` gives ``dtype`` itself (None: the dtype has none)."""
    physical_shape: tuple[int, ...]
    inverse_perm: tuple[int, ...] | None
    """Transpose the physical array by this (None: the payload is C-ordered)."""


_FAST_DECODE: Memo[str, _FastDecode | None] = Memo(256)
_UNSEEN = object()
_STORAGE_CLASSES = frozenset(type(pa.array([], type=t)) for t in _STORAGE_TYPES)
"""The array classes of the storage types, by exact class (one set lookup)."""


def fast_decode(array: Any, meta: Any) -> Any | None:
    """The read-only view ``decode_tensor`` would give, or None: take the full path then.

    Only for plain tensor messages whose header was seen and validated before; returns
    None, having raised nothing, for anything else (the full path gives the error).
    """
    if type(meta) is not dict:
        return None
    text = meta.get(_schema.KEY_TENSOR)
    version = meta.get(_schema.KEY_VERSION)
    kind = meta.get(_schema.KEY_KIND)
    # Exact types: a str subclass could hash like a learned text, and True or 1.0 equal 1.
    if (
        type(text) is not str
        or len(text) > _schema.MAX_HEADER_CHARS  # never a cache key: refused unread
        or type(version) is not int
        or type(kind) is not str
        or version != _schema.VERSION
        or kind != _schema.KIND_TENSOR
    ):
        return None
    entry = _FAST_DECODE.get(text, _UNSEEN)
    if entry is _UNSEEN:
        entry = _learn(text)
    if entry is None:
        return None
    # What encoders send is checked first: in a node woken by a message, every step costs
    # microseconds (even a frozenset lookup of the class).
    native = type(array) is entry.native
    if not native and type(array) not in _STORAGE_CLASSES:
        return None
    # One pyarrow call: refuses nulls, honours the offset; pyarrow validated the buffer's
    # size when it built the array.
    try:
        flat = array.to_numpy(zero_copy_only=True)
    except pa.ArrowInvalid:  # nulls
        return None
    if flat.nbytes != entry.nbytes:
        return None
    # pyarrow's zero-copy arrays are read-only, and so is every view of one.
    if native:  # already of the dtype: a reshape, as raw dora does (cheaper than np.ndarray)
        out = flat.reshape(entry.physical_shape)
        if entry.inverse_perm is not None:
            out = out.transpose(entry.inverse_perm)
    else:  # another container (a raw sample's bytes): view it as the dtype
        out = np.ndarray(entry.shape, entry.dtype, flat, 0, entry.strides)
    if entry.to_torch is not None:
        return entry.to_torch(out)
    return out


def _learn(text: str) -> _FastDecode | None:
    """The fast-path entry of a header seen for the first time (None: not for the fast path)."""
    try:
        entry = _fast_entry(_schema.header_of(text))
    except (MetadataError, UnsupportedTensorError):
        entry = None  # the full path raises it, with its message
    return _FAST_DECODE.remember(text, entry)


def _fast_entry(header: _schema.TensorHeader) -> _FastDecode | None:
    np_dtype = header.dtype.numpy_dtype
    if (
        header.framework not in _HOST_FRAMEWORKS
        or header.nbytes == 0
        or np_dtype is None
        or header.dtype.name == "bool"
    ):
        return None
    to_torch = None
    if header.framework == "torch":
        try:
            adapter = _torch_adapter()  # imports torch, as the full path would
        except ImportError:
            return None
        if not adapter.takes_readonly_numpy(np_dtype):
            return None
        to_torch = adapter.from_readonly_numpy
    return _FastDecode(
        nbytes=header.nbytes,
        dtype=np_dtype,
        shape=header.shape,
        strides=tuple(s * header.dtype.itemsize for s in header.element_strides),
        to_torch=to_torch,
        # to_numpy gives host byte order: the wire's little-endian only on such hosts
        native=(
            _native_class(header.dtype.storage)
            if header.dtype.storage == np_dtype and np_dtype.isnative
            else None
        ),
        physical_shape=header.physical_shape,
        inverse_perm=None if _layout.is_identity(header.perm) else header.inverse_perm,
    )


@functools.cache
def _native_class(storage: np.dtype) -> type:
    return type(pa.array([], type=storage_type(storage)))
