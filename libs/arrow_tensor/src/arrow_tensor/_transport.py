"""The one place that decides how an encoded value travels through dora.

Note [Choosing a transport]
``choose_transport`` is the single decision; ``send`` carries it out and ``Receiver``
undoes it. In order:

- ``cuda`` / ``host``: CUDA arrays go as IPC descriptors, or are copied to the host when a
  receiver cannot open them (``_cuda_ipc.ipc_reason``).
- ``shm``: CPU tensors that arrow_tensor's own shared-memory pool takes
  (``_shm.pool_takes``: loaned tensors, and tensors of 256 MiB or more when every receiver is
  on this machine) travel as a handle; if every slot is held they fall to the next choice.

The rest are dora messages. Measured through dora on a 2-core VM
(benchmarks/results/reference, one-way p50):

- ``inline``: ``send_output`` of the encoded array. For a dense tensor the array is a view
  of the tensor's own memory, so the only copy is dora's own into its shared-memory sample
  (64 MiB: 16.1 ms, raw dora 15.3 ms; compacting into a raw sample was no faster).
- ``raw``: for payloads that need a copy anyway (non-dense or big-endian tensors), the
  payload is compacted straight into dora's outgoing sample (``send_output_raw``): one copy
  into warm, pooled pages instead of a fresh allocation plus dora's copy (non-dense 64 MiB:
  28 ms against 52 ms inline and 52 ms for ``.contiguous()`` + ``pa.array``). Below 4 KiB
  dora puts samples on the heap, unaligned, so small payloads stay inline. Dense payloads of
  4 MiB or more go raw too when torch can do the copy on several threads
  (``_codec.copies_in_parallel``): dora's own copy is one memcpy on one thread (64 MiB:
  11.0 ms against raw dora's 13.7 ms on 2 cores).
- ``chunked``: values whose message would exceed dora's 256 MiB cap; see
  Note [Chunks past dora's message cap] in _chunks.

A node whose dora shared-memory pool cannot hold its messages is told once per output,
with the YAML line that fixes it (``pool_advice``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from . import _chunks, _codec, _cuda_ipc, _layout, _schema, _shm
from ._api import decode, encode
from ._codec import TensorPlan
from ._cuda_backend import is_device_array
from ._errors import ArrowTensorError, MetadataError, PoolExhaustedError, UnsupportedTensorError

RESERVED_KEYS = ("timestamp", "_framing", "_schema_hash", "request_id", "goal_id", "goal_status")

INLINE = "inline"
RAW = "raw"
CHUNKED = "chunked"
SHM = "shm"
TRANSPORTS = (INLINE, RAW, CHUNKED)
CUDA_IPC = "cuda"
"""CUDA arrays: an IPC descriptor, no payload bytes (Note [CUDA IPC descriptors])."""
HOST_COPY = "host"
"""CUDA arrays that must be copied to the host, then sent like any CPU tensor."""

RAW_MIN_BYTES = 4096
"""dora puts smaller samples on the heap, unaligned for typed views: keep those inline."""

DORA_DEFAULT_POOL_BYTES = 8 << 20
"""A node's shared-memory pool when neither the YAML nor ``DORA_NODE_SHM_POOL_SIZE`` sets it."""

_log = logging.getLogger("arrow_tensor")


def user_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate user metadata for dora: no reserved or ``at.`` keys, plain Python values only."""
    out: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        if key not in _KEYS_OK:
            _check_key(key)
        out[key] = value if type(value) in _PLAIN_TYPES else _plain(key, value)
    return out


def _check_key(key: Any) -> None:
    if not isinstance(key, str):
        raise MetadataError(f"metadata keys must be str, got {type(key).__name__} {key!r}")
    if key.startswith(_schema.PREFIX) or key in RESERVED_KEYS or key.startswith("__dora"):
        raise MetadataError(f"metadata key {key!r} is reserved (by arrow_tensor or dora)")
    if type(key) is str:  # a str subclass could change its mind; only plain str is remembered
        if len(_KEYS_OK) >= 4096:  # keys made per message (ids in names) must not pile up
            _KEYS_OK.clear()
        _KEYS_OK.add(key)


_PLAIN_TYPES = frozenset((bool, int, float, str))
_KEYS_OK: set[str] = set()
"""User metadata keys checked before (a node sends the same few over and over)."""


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


@dataclass(frozen=True)
class Outgoing:
    """What the transport decision needs to know about one value."""

    nbytes: int
    """Payload bytes."""
    width: int
    """Element width of the inline storage array (its validity bitmap has one bit each)."""
    needs_copy: bool
    """The payload must be compacted (non-dense or big-endian) before it can travel."""
    device: Any = None
    """A CUDA array (torch / cupy / pyarrow.cuda) being sent, else None."""
    pooled: bool = False
    """arrow_tensor's shared-memory pool of the output takes it (``_shm.pool_takes``)."""


def choose_transport(node: Any, output_id: str, out: Outgoing) -> str:
    """The transport for one value (see Note [Choosing a transport]).

    ``"cuda"`` (an IPC descriptor) or ``"host"`` (copied to the host, then sent as a CPU
    tensor) for a CUDA array; ``"shm"`` for what the output's pool takes; else a dora
    message: ``"chunked"`` past dora's cap, ``"raw"`` for payloads compacted into the
    sample, ``"inline"``.
    """
    if out.device is not None:  # CUDA IPC handle, or the host path (see _cuda_ipc)
        return HOST_COPY if _cuda_ipc.ipc_reason(node, output_id, out.device) else CUDA_IPC
    if out.pooled:
        return SHM
    if not _chunks.fits_one_message(out.nbytes, 1 if out.needs_copy else out.width):
        return CHUNKED
    if out.needs_copy and out.nbytes >= RAW_MIN_BYTES and _has_raw(node):
        return RAW
    if (
        _codec.copies_in_parallel(out.nbytes)  # 4 MiB or more, and torch with threads
        and _chunks.fits_one_message(out.nbytes, 1)  # a raw sample is bytes
        and _has_raw(node)
    ):
        return RAW  # our threaded copy into the sample beats dora's one-thread memcpy
    return INLINE


def _has_raw(node: Any) -> bool:
    return callable(getattr(node, "send_output_raw", None))


def _is_host_tensor(value: Any) -> bool:
    """A numpy array or CPU torch tensor: spares ``is_device_array``'s slower torch checks."""
    if isinstance(value, np.ndarray):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor) and value.is_cpu


def _tensor_plan(value: Any) -> TensorPlan | None:
    """The codec plan of a CPU tensor, or None for values another codec encodes."""
    if isinstance(value, np.ndarray) or (
        sys.modules.get("torch") is not None and isinstance(value, sys.modules["torch"].Tensor)
    ):
        return _codec.plan(value)
    return None


def send(
    node: Any,
    output_id: str,
    value: Any,
    metadata: Mapping[str, Any] | None = None,
    *,
    checksum: bool = False,
    transport: str | None = None,
) -> str:
    """Encode ``value`` and send it on ``output_id`` of the dora ``node``.

    Parameters
    ----------
    node:
        A ``dora.Node`` (or ``dora.testing.MockNode``).
    output_id:
        One of the node's outputs.
    value:
        What ``encode`` accepts.
    metadata:
        Your own flat keys (not ``at.``-prefixed, not dora's reserved ones).
    checksum:
        Attach an xxh3-64 checksum of the exact bytes sent. A payload that needs compacting
        is then compacted into a private buffer and hashed before it is sent (two copies).
    transport:
        Force ``"inline"``, ``"raw"`` or ``"chunked"`` (benchmarks, tests); ``None`` lets
        ``choose_transport`` decide. A value over dora's message cap is always chunked.

    Returns
    -------
    str
        The transport used.

    Raises
    ------
    UnsupportedTensorError, MetadataError
        For values or metadata arrow_tensor cannot send.
    """
    # The fast path (Note [The fast path] in _codec), inline: a frame costs microseconds in a
    # node woken by a message. A CPU tensor whose (dtype, shape, strides) this output sent
    # before as one dora message goes the same way with the decision and header remembered:
    # its own bytes (inline), or compacted into dora's sample (raw).
    kind = type(value)
    key = None
    if transport is None and not checksum and (id(node), output_id) not in _LOANED:
        if kind is np.ndarray:
            key = (id(node), output_id, kind, value.dtype, value.shape, value.strides)
        elif kind is _torch_tensor():
            # torch's own attributes: t.numpy() costs about 100 µs in a node idle for 20 ms
            # (about 50 µs for these three). Sparse and nested tensors have no strides.
            try:
                key = (id(node), output_id, kind, value.dtype, value.shape, value.stride())
            except RuntimeError:
                key = None
    if key is not None:
        entry = _FAST_SEND.get(key, _UNSEEN)
        if entry is _UNSEEN:
            entry = _learn_send(node, output_id, value, key)
        if entry is not None and (
            not metadata
            or (  # user_metadata would return an equal copy: take it as it is
                type(metadata) is dict
                and _KEYS_OK.issuperset(metadata)
                and _PLAIN_TYPES.issuperset(map(type, metadata.values()))
            )
        ):
            meta = {**entry.metadata, **metadata} if metadata else entry.metadata.copy()
            bits = value
            if kind is not np.ndarray:
                # Per tensor, not per layout: the device, a negative view's pending math, and
                # memory at all (a ZeroTensor view's data_ptr is an offset from 0).
                if not value.is_cpu or value.is_neg() or value._is_zerotensor():
                    bits = None  # the full path
                elif not entry.raw:  # dense: its bytes start at its first element
                    try:
                        bits = pa.foreign_buffer(value.data_ptr(), entry.nbytes, value)
                    except RuntimeError:  # no storage (functorch wrappers): the full path says so
                        bits = None
                else:
                    bits = _numpy_or_none(value)
            if bits is not None and not entry.raw:
                if kind is np.ndarray:
                    if entry.perm is not None:
                        bits = bits.transpose(entry.perm)
                    bits = pa.py_buffer(bits)
                node.send_output(
                    output_id,
                    pa.Array.from_buffers(entry.arrow_type, entry.length, [None, bits]),
                    meta,
                )
                return INLINE
            if bits is not None:
                if entry.perm is not None:
                    bits = bits.transpose(entry.perm)
                try:
                    with node.send_output_raw(output_id, entry.nbytes, meta) as sample:
                        _codec.write_into(sample, bits)
                    return RAW
                except NotImplementedError:  # dora.testing.MockNode: nothing was sent
                    _FAST_SEND[key] = None
    extra = user_metadata(metadata)
    if transport is not None and transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS} or None, got {transport!r}")
    if not _is_host_tensor(value) and is_device_array(value):
        if choose_transport(node, output_id, Outgoing(0, 1, False, value)) == CUDA_IPC:
            try:
                _cuda_ipc.send_ipc(node, output_id, value, extra, checksum)
                return CUDA_IPC
            except PoolExhaustedError as exc:  # receivers hold every slot: this one by host
                _cuda_ipc.log_host_path_once(node, output_id, str(exc))
        value = _cuda_ipc.to_host(value)  # the host path's one device-to-host copy
    p = _tensor_plan(value)
    if p is None:
        return _send_encoded(node, output_id, value, extra, checksum)
    width = p.header.dtype.storage.itemsize
    out = Outgoing(p.nbytes, width, p.needs_copy)
    if transport is None and _shm.pool_takes(node, output_id, value, nbytes=p.nbytes):
        if choose_transport(node, output_id, replace(out, pooled=True)) == SHM:
            if _shm.send_pooled(node, output_id, value, extra, checksum=checksum):
                return SHM
    auto = choose_transport(node, output_id, out)
    choice = CHUNKED if auto == CHUNKED else (transport or auto)
    if choice == RAW and (checksum or not _has_raw(node)):
        choice = INLINE  # dora fixes a raw sample's metadata before the bytes are written
    if choice == RAW:
        _warn_if_pool_too_small(node, output_id, _chunks.ipc_message_bytes(p.nbytes, 1))
        meta = p.header.to_metadata()
        meta.update(extra)
        try:
            with node.send_output_raw(output_id, p.nbytes, meta) as sample:
                p.write_into(sample)
            return RAW
        except NotImplementedError:  # dora.testing.MockNode has no shared memory
            choice = INLINE
    if choice == CHUNKED:
        return _send_plan_chunked(node, output_id, p, extra, checksum)
    array, meta = _codec.encode_plan(p, checksum=checksum)
    meta.update(extra)
    if p.nbytes >= RAW_MIN_BYTES:  # smaller messages live on dora's heap, not in its pool
        _warn_if_pool_too_small(node, output_id, _chunks.ipc_message_bytes(p.nbytes, width))
    node.send_output(output_id, array, meta)
    return INLINE


# --- the fast path for repeated layouts (Note [The fast path] in _codec) -------------------


@dataclass(frozen=True, slots=True)
class _FastSend:
    """A layout ``send`` has planned on one output and found to be one dora message."""

    node: Any
    """Held so that ``id(node)`` in the key cannot be reused while the entry lives."""
    raw: bool
    """Compacted into a ``send_output_raw`` sample, else the tensor's own bytes inline."""
    arrow_type: pa.DataType
    length: int
    """Elements of ``arrow_type`` (inline), or of the tensor (raw)."""
    nbytes: int
    perm: tuple[int, ...] | None
    """Transpose into physical order first (None: already C-ordered)."""
    metadata: dict[str, Any]


_FAST_SEND: dict[tuple[Any, ...], _FastSend | None] = {}
_FAST_SEND_MAX = 256
_UNSEEN = object()
_LOANED = _shm.loaned_outputs()
"""Outputs that may loan slots: their sends take the full path, which knows a loaned tensor."""


def _torch_tensor() -> type | None:
    """``torch.Tensor`` if torch is imported (we never import it here)."""
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def _numpy_or_none(t: Any) -> np.ndarray | None:
    """``t.numpy()``: its bits with its strides, or None when torch refuses (autograd, other
    devices, conjugate or negative views, dtypes numpy lacks): the full path says why."""
    try:
        return t.numpy()
    except (RuntimeError, TypeError, ValueError):
        return None


def _learn_send(node: Any, output_id: str, value: Any, key: tuple[Any, ...]) -> _FastSend | None:
    """Plan ``value`` as the full path would; an entry when that path is one plain message.

    Inline: a dense tensor. Raw: compaction of a native-order payload (a byte swap, rare,
    keeps the full path). A torch tensor that is not a plain CPU view (a device, conjugate or
    negative bits, whose resolved copy has a layout of its own) teaches nothing; complex
    torch tensors, whose conjugate bit would need a check per message, keep the full path.
    """
    if type(value) is not np.ndarray and (
        not value.is_cpu or value.is_neg() or value.is_conj() or value._is_zerotensor()
    ):
        return None  # not remembered: the next plain tensor of this layout learns it
    entry = None
    try:
        p = _codec.plan(value)
        out = Outgoing(p.nbytes, p.header.dtype.storage.itemsize, p.needs_copy)
        choice = None
        if p.nbytes and not _shm.pool_takes(node, output_id, value, nbytes=p.nbytes):
            choice = choose_transport(node, output_id, out)
        raw = choice == RAW and p.source.dtype.isnative
        if p.header.framework == "torch" and p.header.dtype.name.startswith("complex"):
            choice = raw = None
        if (choice == INLINE and not p.needs_copy) or raw:
            width = 1 if raw else out.width
            if p.nbytes >= RAW_MIN_BYTES:  # the one pool check of this layout on this output
                _warn_if_pool_too_small(node, output_id, _chunks.ipc_message_bytes(p.nbytes, width))
            perm = p.header.perm
            entry = _FastSend(
                node=node,
                raw=raw,
                arrow_type=_codec.storage_type(p.header.dtype.storage),
                length=p.header.numel if raw else p.nbytes // out.width,
                nbytes=p.nbytes,
                perm=None if _layout.is_identity(perm) else perm,
                metadata=p.header.to_metadata(),
            )
    except ArrowTensorError:  # the full path raises it; the next tensor may be fine
        return None
    if len(_FAST_SEND) >= _FAST_SEND_MAX:
        _FAST_SEND.clear()
    _FAST_SEND[key] = entry
    return entry


def _send_plan_chunked(
    node: Any, output_id: str, p: TensorPlan, extra: dict[str, Any], checksum: bool
) -> str:
    max_chunk = _chunks.max_chunk_payload(1)
    pieces, flat = _chunks.plan_pieces(p, max_chunk)
    header_meta = p.header.to_metadata()
    if checksum:
        if flat is None:
            flat = p.payload().view(np.uint8)
            pieces = _chunks.byte_pieces(flat, max_chunk)
        header_meta[_schema.KEY_CHECKSUM] = _chunks.checksum_of(p.header.describe(), flat)
    return _send_pieces(node, output_id, pieces, p.nbytes, header_meta, extra)


def _send_pieces(
    node: Any,
    output_id: str,
    pieces: list[Any],
    total: int,
    header_meta: dict[str, Any],
    extra: dict[str, Any],
) -> str:
    largest = _chunks.ipc_message_bytes(max(x.nbytes for x in pieces), 1)
    _warn_if_pool_too_small(node, output_id, largest, in_flight=len(pieces) + 1)
    raw = _has_raw(node)
    try:
        _chunks.send_chunks(node, output_id, pieces, total, header_meta, extra, raw=raw)
    except NotImplementedError:  # MockNode: raised by the first chunk, before anything left
        _chunks.send_chunks(node, output_id, pieces, total, header_meta, extra, raw=False)
    return CHUNKED


def _send_encoded(
    node: Any, output_id: str, value: Any, extra: dict[str, Any], checksum: bool
) -> str:
    """Values encoded by a codec other than the tensor plan: inline, or chunks of their bytes."""
    array, meta = encode(value, checksum=checksum)
    meta.update(extra)
    width = array.type.bit_width // 8 if pa.types.is_unsigned_integer(array.type) else 1
    nbytes = len(array) * width
    if _chunks.fits_one_message(nbytes, width):
        _warn_if_pool_too_small(node, output_id, _chunks.ipc_message_bytes(nbytes, width))
        node.send_output(output_id, array, meta)
        return INLINE
    if not pa.types.is_unsigned_integer(array.type) or array.null_count:
        raise UnsupportedTensorError(
            f"a {nbytes}-byte {array.type} message exceeds dora's 256 MiB cap and cannot be "
            f"chunked; send it in parts"
        )
    flat = _chunks.chunk_bytes(array)
    header = {k: v for k, v in meta.items() if k.startswith(_schema.PREFIX)}
    user = {k: v for k, v in meta.items() if not k.startswith(_schema.PREFIX)}
    pieces = _chunks.byte_pieces(flat, _chunks.max_chunk_payload(1))
    return _send_pieces(node, output_id, pieces, nbytes, header, user)


# --- pools that are too small ----------------------------------------------------------

# Keyed by id(node); the node itself is kept in the value so that its id is never reused.
_warned: dict[tuple[int, str], Any] = {}
_checked: dict[tuple[int, str], tuple[Any, int]] = {}
_pool_sizes: dict[int, tuple[Any, int]] = {}


def pool_size(node: Any) -> int:
    """The bytes of shared memory dora gives ``node``'s outgoing samples.

    The YAML's ``shared_memory_pool_size`` (visible in ``node.node_config()``) wins over
    ``DORA_NODE_SHM_POOL_SIZE`` in the node's environment; neither means dora's 8 MB.
    """
    key = id(node)
    if key not in _pool_sizes:
        size: int | None = None
        config = getattr(node, "node_config", None)
        try:
            size = (config() if callable(config) else {}).get("shared_memory_pool_size")
        except Exception:  # a node without a daemon behind it: fall through to the env
            size = None
        if not isinstance(size, int):
            try:
                size = int(os.environ.get("DORA_NODE_SHM_POOL_SIZE", ""))
            except ValueError:
                size = DORA_DEFAULT_POOL_BYTES
        _pool_sizes[key] = (node, size)
    return _pool_sizes[key][1]


def node_id() -> str | None:
    """This node's id, read from the ``node_id:`` line dora puts in ``DORA_NODE_CONFIG``."""
    for line in os.environ.get("DORA_NODE_CONFIG", "").splitlines():
        if line.startswith("node_id:"):
            return line.partition(":")[2].strip().strip("'\"") or None
    return None


def pool_advice(message_bytes: int, pool_bytes: int, in_flight: int = 2) -> str | None:
    """The YAML line a node needs, or None when its pool holds its messages.

    dora keeps a sample in the pool until every receiver drops it, so a pool must hold the
    messages in flight at once, at least two, or sends take the slow path (measured: 16 MiB
    messages in a 24 MB pool alternate between 5 ms and 110 ms; 40 MB is enough). Chunks of
    one value are all in flight. dora reads "MB" as MiB; the advice is a power of two with
    a quarter to spare.
    """
    need = max(in_flight, 2) * message_bytes
    if message_bytes < RAW_MIN_BYTES or need <= pool_bytes:
        return None
    megabytes = 1 << max(0, (-(-need * 5 // 4) - 1).bit_length() - 20)
    text = f"{megabytes // 1024}GB" if megabytes >= 1024 else f"{megabytes}MB"
    return f"shared_memory_pool_size: {text}"


def _warn_if_pool_too_small(
    node: Any, output_id: str, message_bytes: int, in_flight: int = 2
) -> None:
    key = (id(node), output_id)
    need = max(in_flight, 2) * message_bytes
    if key in _warned or need <= _checked.get(key, (None, 0))[1]:
        return  # said already, or this much was found to fit before
    pool = pool_size(node)
    advice = pool_advice(message_bytes, pool, in_flight)
    if advice is None:
        _checked[key] = (node, need)
        return
    _warned[key] = node
    who = node_id()
    name = who or "<this node>"
    text = (
        f"arrow_tensor: output {output_id!r} sends {message_bytes / 2**20:.1f} MiB messages; "
        f"node {name}'s dora shared-memory pool ({pool / 2**20:.1f} MiB) cannot hold "
        f"{max(in_flight, 2)} of them at once, so dora silently falls back to its daemon path "
        f"(~30x slower, fails over 64 MiB). Fix: add `{advice}` to node {name} in the "
        f"dataflow YAML. (Said once per output.)"
    )
    log = getattr(node, "log_warn", None)
    if callable(log):
        try:
            log(text)
            return
        except Exception:  # logging must never break a send
            pass
    _log.warning(text)


class Receiver:
    """Turns received (array, metadata) pairs into decoded values.

    Stateful so that values sent in several chunks can be reassembled: ``receive`` returns
    ``None`` while a value is incomplete.

    Parameters
    ----------
    writable:
        Return private writable values instead of read-only-by-contract views.
    verify:
        Check the ``at.checksum`` of every value.
    max_transfer_bytes:
        Largest chunked value accepted (default: min(64 GiB, physical memory)).
    max_transfers:
        Chunked values reassembled at once (one per sending output, normally).
    """

    def __init__(
        self,
        writable: bool = False,
        verify: bool = False,
        *,
        max_transfer_bytes: int | None = None,
        max_transfers: int = _chunks.DEFAULT_MAX_TRANSFERS,
    ) -> None:
        self.writable = writable
        self.verify = verify
        self._chunks = _chunks.Reassembler(max_transfer_bytes, max_transfers)

    @property
    def pending(self) -> int:
        """Chunked values started and not yet complete."""
        return self._chunks.pending

    def receive(self, array: Any, metadata: Mapping[str, Any]) -> Any | None:
        """Decode one message, or take one chunk; ``None`` until a chunked value is complete.

        Raises
        ------
        ArrowTensorError
            A subclass saying what was wrong: ``IncompleteTransferError`` for a chunked value
            that lost a chunk (only that value is dropped), ``MetadataError``,
            ``PayloadError``, ``ChecksumError`` for bad messages.
        """
        if not (self.writable or self.verify):
            value = _codec.fast_decode(array, metadata)
            if value is not None:
                return value
        meta = _schema.check_envelope(metadata)
        kind = meta.get(_schema.KEY_KIND)
        if type(kind) is str and kind == _schema.KIND_TENSOR:
            return _codec.decode_tensor(array, meta, self.writable, self.verify)
        if type(kind) is not str or kind != _schema.KIND_CHUNK:  # decode says what is wrong
            return decode(array, meta, writable=self.writable, verify=self.verify)
        done = self._chunks.add(array, meta)
        if done is None:
            return None
        if done[1].get(_schema.KEY_KIND) == _schema.KIND_TENSOR:
            # The reassembly buffer is already private: a lone tensor over it needs no second
            # copy, only numpy's flag, so it is viewed by the full decoder (the fast path's
            # views come from pyarrow, read-only for good).
            meta = _schema.check_envelope(done[1])
            value = _codec.decode_tensor(done[0], meta, False, self.verify)
        else:  # a structure is copied leaf by leaf, as decode does
            value = decode(done[0], done[1], self.writable, self.verify)
        if self.writable and isinstance(value, np.ndarray) and not value.flags.writeable:
            try:
                value.flags.writeable = True
            except ValueError:
                value = np.array(value, order="K", copy=True)
        return value

    def close(self) -> None:
        """End of stream: drop incomplete chunked values, raising if there were any."""
        self._chunks.close()
