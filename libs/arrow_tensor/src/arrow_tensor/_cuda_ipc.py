"""CUDA tensors as IPC descriptors: the payload never leaves the GPU (see SPEC.md).

Note [CUDA IPC descriptors]
A CUDA IPC handle names a whole allocation, not a tensor: a caching allocator packs many
tensors into one ``cudaMalloc`` block, and opening the handle returns the block's base. So a
message carries (1) the tensor header (``_schema.TensorHeader``: dtype, shape, dimension
order; the bytes are the dense C-ordered array of the permuted shape, exactly as inline),
(2) the 64-byte ``cudaIpcMemHandle_t`` of the block and a 64-byte ``cudaIpcEventHandle_t``
as the Arrow array (128 bytes of uint8: no payload bytes), and (3) in the metadata the byte
offset of the tensor inside the block, the block's size, the device (UUID and PCI bus id,
because ``CUDA_VISIBLE_DEVICES`` may number devices differently per process), and where the
lifetime is tracked (control block name, slot, generation, seq). Forgetting the offset is
dora-rs/dora#978: ``torch.stack`` of two small tensors lands at a non-zero offset of a
shared block, and a receiver that reads from the base gets someone else's bytes.

Producer. A dense tensor (contiguous or a permutation of contiguous) is shared as it is; any
other layout is compacted once, on the device, into a tensor only the transport references.
The producer keeps a reference to what it shared in a bounded table of in-flight slots: the
slot/lifetime machinery of ``_slots`` (one design for host pools and CUDA buffers), over a
control block in an owner-only /dev/shm file named like the host pools'
(``at-<dataflow>-<pid>-<random>``), so the same orphan sweep removes it. A slot is reused
only when every receiver released it, is dead, or provably never got it (lease or overtake,
see Note [Lifetimes without atomic read-modify-write]); then the reference is dropped and
the allocator may reuse the memory. No free slot within ``wait_s``: ``PoolExhaustedError``,
which ``send`` turns into the host path for that message (logged once per output).

Receiver. Each handle is opened once per process (``HandleCache``) and closed after the last
tensor built on it is freed: tensors are built over an owner object that torch / cupy / numpy
keep referenced from every view, and a finalizer on that owner (1) synchronizes this
process's stream, so no kernel of ours still reads, (2) drops the handle's reference count,
closing it at zero, (3) releases the slot to the producer. Before a tensor is built the
current stream waits on the producer's interprocess event, so no kernel reads before the
producer's kernels are done. A descriptor whose producer process is gone raises
``StaleHandleError``. Tensors built before the crash must not be read any more: CUDA leaves
access to memory whose exporter freed it undefined (a crash frees everything). Receivers
that keep data longer than a message's life should take a private copy (``writable=True``);
a producer that exits cleanly first waits (``ARROW_TENSOR_CUDA_LINGER``) for receivers.

Received tensors are read-only by contract: the whole block is visible to the receiver and
the producer may hand the memory to its allocator again once every receiver released it.
Use ``decode(..., writable=True)`` for a private copy on the device.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import re
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from . import _checksum, _config, _layout, _schema
from . import _cuda_backend as backends
from ._errors import (
    CudaUnavailableError,
    MetadataError,
    PayloadError,
    PoolExhaustedError,
    ShmHandleError,
    StaleHandleError,
    UnsupportedTensorError,
)
from ._slots import ControlBlock, ProducerSlots, ReceiverSlots, block_words, pid_alive
from ._slots import receiver_key as _receiver_key

__all__ = [
    "CudaDescriptor",
    "HandleCache",
    "decode_cuda",
    "encode_cuda",
    "host_fallback_reason",
    "parse_descriptor",
]

log = logging.getLogger("arrow_tensor.cuda")

KIND_CUDA = "cuda"
KEY_BACKEND = "at.cuda.backend"
KEY_OFFSET = "at.cuda.offset"
KEY_ALLOC = "at.cuda.alloc_size"
KEY_UUID = "at.cuda.device_uuid"
KEY_PCI = "at.cuda.pci_bus_id"
KEY_EVENT = "at.cuda.event"
KEY_BLOCK = "at.cuda.block"
KEY_SLOT = "at.cuda.slot"
KEY_GENERATION = "at.cuda.gen"
KEY_SEQ = "at.cuda.seq"
BACKENDS = ("cuda", "standin")
HANDLE_BYTES = backends.IPC_HANDLE_SIZE
ARRAY_BYTES = 2 * HANDLE_BYTES
MEMORY_KIND_CUDA = 2
SHM_DIR = "/dev/shm"
_BLOCK_NAME = re.compile(r"^at-([0-9a-f]{32})-([0-9]{1,10})-([0-9a-f]{32})$")
_UUID = re.compile(r"^(GPU|MIG|STANDIN)-[0-9A-Za-z-]{1,80}$")
_PCI = re.compile(r"^[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_O_DATAFLOW_HI, _O_DATAFLOW_LO, _O_KIND = range(3)
ANONYMOUS = ""
"""Receiver name used outside dora (or by bare ``at.encode``): exactly one receiver."""


# ---------------------------------------------------------------------------------------------
# The descriptor


@dataclass(frozen=True)
class CudaDescriptor:
    """Everything a receiver needs to open one CUDA tensor (see Note [CUDA IPC descriptors])."""

    header: _schema.TensorHeader
    backend: str
    handle: bytes
    event: bytes | None
    offset: int
    alloc_size: int
    device_uuid: str
    pci_bus_id: str
    block: str
    slot: int
    generation: int
    seq: int

    def to_message(self) -> tuple[pa.Array, dict[str, Any]]:
        """The Arrow array (handle bytes, event bytes) and the flat metadata."""
        raw = b"" if self.header.nbytes == 0 else self.handle + (self.event or backends.NO_EVENT)
        array = pa.array(np.frombuffer(raw, dtype=np.uint8), type=pa.uint8())
        meta = self.header.to_metadata()
        meta.update(
            {
                _schema.KEY_KIND: KIND_CUDA,
                KEY_BACKEND: self.backend,
                KEY_OFFSET: self.offset,
                KEY_ALLOC: self.alloc_size,
                KEY_UUID: self.device_uuid,
                KEY_PCI: self.pci_bus_id,
                KEY_EVENT: self.event is not None,
                KEY_BLOCK: self.block,
                KEY_SLOT: self.slot,
                KEY_GENERATION: self.generation,
                KEY_SEQ: self.seq,
            }
        )
        return array, meta


def _int(meta: Mapping[str, Any], key: str, minimum: int = 0) -> int:
    value = _schema.require(meta, key, int)
    if not minimum <= value < 1 << 63:
        raise MetadataError(f"{key!r} must be in {minimum}..2**63-1, got {value}")
    return value


def _handle_bytes(array: object, expected: int) -> bytes:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if not isinstance(array, pa.Array) or array.type != pa.uint8() or array.null_count:
        kind = getattr(array, "type", type(array).__name__)
        raise PayloadError(f"a CUDA descriptor's array must be uint8 without nulls, got {kind}")
    if len(array) != expected:
        raise PayloadError(
            f"a CUDA descriptor's array must hold {expected} bytes (memory handle + event "
            f"handle), got {len(array)}"
        )
    if expected == 0:
        return b""
    return array.buffers()[1].to_pybytes()[array.offset : array.offset + expected]


def parse_descriptor(array: Any, meta: Mapping[str, Any]) -> CudaDescriptor:
    """Validate a CUDA descriptor message (metadata already passed ``check_envelope``).

    Every size is checked before anything is opened: the handle is exactly 64 bytes, the
    tensor's bytes (from dtype, shape and its dense dimension order) lie inside the block,
    the device is named by a well-formed UUID, the control block name is one of ours.

    Raises
    ------
    MetadataError, PayloadError
        With what was received and what was expected.
    """
    header = _schema.parse_header(meta)
    backend = _schema.require(meta, KEY_BACKEND, str)
    if backend not in BACKENDS:
        raise MetadataError(f"{KEY_BACKEND!r} must be one of {BACKENDS}, got {backend[:40]!r}")
    nbytes = header.nbytes
    raw = _handle_bytes(array, 0 if nbytes == 0 else ARRAY_BYTES)
    has_event = _schema.require(meta, KEY_EVENT, bool)
    offset = _int(meta, KEY_OFFSET)
    alloc = _int(meta, KEY_ALLOC)
    if offset + nbytes > alloc:
        raise MetadataError(
            f"the tensor's {nbytes} bytes at offset {offset} end at {offset + nbytes}, past "
            f"the end of its {alloc}-byte allocation ({KEY_OFFSET!r}, {KEY_ALLOC!r} "
            f"and {_schema.KEY_TENSOR!r} disagree)"
        )
    if nbytes and offset % min(header.dtype.itemsize, 16):
        raise MetadataError(
            f"{KEY_OFFSET!r} {offset} is not aligned to the {header.dtype.itemsize}-byte "
            f"elements of {header.dtype.name}"
        )
    uuid = _schema.require(meta, KEY_UUID, str)
    pci = _schema.require(meta, KEY_PCI, str)
    if not _UUID.match(uuid):
        raise MetadataError(f"{KEY_UUID!r} must look like 'GPU-<uuid>', got {uuid[:90]!r}")
    if pci and not _PCI.match(pci):
        raise MetadataError(f"{KEY_PCI!r} must look like '0000:65:00.0', got {pci[:40]!r}")
    block = _schema.require(meta, KEY_BLOCK, str)
    if block and not _BLOCK_NAME.match(block):
        raise MetadataError(
            f"{KEY_BLOCK!r} must name a control block 'at-<32 hex>-<pid>-<32 hex>', "
            f"got {block[:100]!r}"
        )
    if nbytes and not block:
        raise MetadataError(f"{KEY_BLOCK!r} is empty but the tensor has {nbytes} bytes")
    slot = _int(meta, KEY_SLOT)
    generation = _int(meta, KEY_GENERATION)
    seq = _int(meta, KEY_SEQ)
    if nbytes and generation == 0:
        raise MetadataError(f"{KEY_GENERATION!r} must be positive for a non-empty tensor")
    handle = raw[:HANDLE_BYTES]
    event = raw[HANDLE_BYTES:] if has_event and raw else None
    return CudaDescriptor(
        header, backend, handle, event, offset, alloc, uuid, pci, block, slot, generation, seq
    )


# ---------------------------------------------------------------------------------------------
# Producer side


def _identity() -> tuple[str, str]:
    """(32-hex dataflow id, node id) inside dora; a per-user standalone id outside it."""
    from . import _shm

    try:
        ident = _shm.identity()
        return ident.dataflow_hex, ident.node_id
    except ShmHandleError:
        return f"{os.getuid():032x}", ANONYMOUS


def _dataflow_words(hex32: str) -> tuple[int, int]:
    raw = bytes.fromhex(hex32)
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


class _InFlight:
    """The bounded table of what one producer shared with one set of receivers."""

    def __init__(self, receivers: Sequence[str], n_slots: int, lease_s: float) -> None:
        dataflow, _ = _identity()
        self.receivers = tuple(receivers)
        self.name = f"at-{dataflow}-{os.getpid()}-{secrets.token_hex(16)}"
        size = 8 * block_words(n_slots, len(self.receivers))
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        path = os.path.join(SHM_DIR, self.name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.block = ControlBlock.create(
            self._mm,
            n_slots,
            [_receiver_key(r) for r in self.receivers],
            owner_words=(*_dataflow_words(dataflow), MEMORY_KIND_CUDA),
        )
        self.slots = ProducerSlots(self.block, lease_s=lease_s)
        self.exports: dict[int, backends.Export] = {}
        self.unlinked = False
        self._lock = threading.Lock()

    def collect(self) -> None:
        """Drop the references of slots every receiver is done with."""
        self.slots.busy()  # advances slot states (releases, deaths, leases)
        with self._lock:
            for slot in [s for s in self.exports if self.slots.state_of(s)[0] == "free"]:
                _finish(self.exports.pop(slot))
        if not self.unlinked and all(
            self.block.receiver_mapped(r) for r in range(self.block.n_receivers)
        ):
            self.unlink()  # every receiver holds a mapping: nothing can leak on a crash

    def share(self, export: backends.Export, wait_s: float) -> tuple[int, int, int]:
        """Park ``export`` in a slot; returns (slot, generation, seq) for the message."""
        self.collect()
        lease = self.slots.try_acquire()
        if lease is None:
            deadline = time.monotonic() + wait_s
            while lease is None and time.monotonic() < deadline:
                time.sleep(0.0005)
                self.collect()
                lease = self.slots.try_acquire()
        if lease is None:
            raise PoolExhaustedError(
                f"all {self.block.n_slots} in-flight CUDA slots are still held by receivers "
                f"after {wait_s:g} s ({self.slots.describe()}); raise ARROW_TENSOR_CUDA_SLOTS "
                f"or release received tensors sooner"
            )
        with self._lock:
            old = self.exports.pop(lease.slot, None)
            if old is not None:
                _finish(old)
            self.exports[lease.slot] = export
        seq = self.slots.mark_sent(lease)
        return lease.slot, lease.generation, seq

    def held(self) -> int:
        """Slots whose memory is still referenced for receivers."""
        self.collect()
        return len(self.exports)

    def unlink(self) -> None:
        if not self.unlinked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, self.name))
            self.unlinked = True

    def close(self, linger_s: float) -> None:
        """Wait up to ``linger_s`` for receivers, then drop every reference and unlink."""
        deadline = time.monotonic() + linger_s
        while self.held() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.exports:
            log.warning(
                "exiting with %d CUDA tensors still held by receivers of %s; their memory "
                "is freed with this process",
                len(self.exports),
                self.receivers,
            )
        self.block.set_closed()
        with self._lock:
            for export in self.exports.values():
                _finish(export)
            self.exports.clear()
        self.unlink()


def _finish(export: backends.Export) -> None:
    if export.on_release is not None:
        with contextlib.suppress(Exception):  # best effort: the process may be exiting
            export.on_release()
    export.keepalive = None


_tables: dict[tuple[str, ...], _InFlight] = {}
_tables_lock = threading.Lock()


def _table(receivers: Sequence[str]) -> _InFlight:
    key = tuple(receivers)
    with _tables_lock:
        table = _tables.get(key)
        if table is None:
            slots = _config.setting("ARROW_TENSOR_CUDA_SLOTS", _config.integer(1, 1024), 32)
            lease = _config.setting("ARROW_TENSOR_CUDA_LEASE", _config.duration, 5.0)
            table = _tables[key] = _InFlight(key, slots, lease)
        return table


def in_flight() -> int:
    """CUDA tensors this process still keeps alive for receivers (all outputs)."""
    return sum(t.held() for t in list(_tables.values()))


def close_all(linger_s: float | None = None) -> None:
    """Release every in-flight reference (at exit, after waiting for receivers)."""
    if linger_s is None:
        linger_s = _config.setting("ARROW_TENSOR_CUDA_LINGER", _config.duration, 2.0)
    with _tables_lock:
        tables = list(_tables.values())
        _tables.clear()
    for table in tables:
        table.close(linger_s)


atexit.register(close_all)


def _dense_source(
    backend: backends.CudaBackend, x: Any
) -> tuple[Any, backends.ArrayInfo, list[int]]:
    """``x`` itself when dense (any dimension order), else one device copy; plus its order."""
    info = backend.info(x)
    perm = _layout.memory_order(info.shape, info.strides)
    foreign = _receiving_cache.contains(x)
    if info.pending_math or foreign or not _layout.is_dense(info.shape, info.strides, perm):
        # Memory received from another process cannot be re-exported: copy it too.
        x = backend.compact(x, perm)
        info = backend.info(x)
    return x, info, perm


def encode_cuda(
    x: Any,
    *,
    receivers: Sequence[str] = (ANONYMOUS,),
    checksum: bool = False,
    wait_s: float | None = None,
) -> tuple[pa.Array, dict[str, Any]]:
    """Encode a device array as a CUDA IPC descriptor: no payload bytes leave the device.

    Parameters
    ----------
    x:
        A torch CUDA tensor, a CuPy array, a ``pyarrow.cuda.CudaBuffer`` or (tests) a
        ``_cuda_backend.StandInArray``.
    receivers:
        Node ids of every receiver of the message (``send`` reads them from the dataflow
        descriptor). The default is one receiver outside dora (or one that does not know
        its id): a bare ``at.encode`` of a CUDA tensor is for exactly one reader.
    checksum:
        Attach ``at.checksum`` computed over a host copy of the bytes (a device-to-host
        copy: for debugging, not for speed).
    wait_s:
        How long to wait for a free in-flight slot (``ARROW_TENSOR_CUDA_WAIT``, default 1 s).

    Returns
    -------
    (array, metadata)
        ``array``: 128 uint8 bytes, the memory handle then the event handle (empty for a
        zero-size tensor). ``metadata``: the tensor header plus the ``at.cuda.*`` keys.

    Raises
    ------
    CudaUnavailableError
        The memory cannot be shared with legacy CUDA IPC (expandable segments, VMM).
    PoolExhaustedError
        Every in-flight slot is still held by receivers after ``wait_s``.
    UnsupportedTensorError
        Dtypes or layouts without a wire form.
    """
    backend = backends.backend_for_array(x)
    if wait_s is None:
        wait_s = _config.setting("ARROW_TENSOR_CUDA_WAIT", _config.duration, 1.0)
    source, info, perm = _dense_source(backend, x)
    problem = _schema.unencodable(info.shape, info.entry.itemsize)
    if problem is not None:
        raise UnsupportedTensorError(problem)
    header = _schema.TensorHeader(info.entry, info.shape, tuple(perm), info.framework)
    if header.nbytes == 0:
        desc = CudaDescriptor(
            header, backend.name, b"", None, 0, 0, _empty_uuid(backend), "", "", 0, 0, 0
        )
        return desc.to_message()
    export = backend.export(source)
    table = _table(receivers)
    try:
        slot, generation, seq = table.share(export, wait_s)
    except BaseException:
        _finish(export)
        raise
    event = None if export.event == backends.NO_EVENT else export.event
    desc = CudaDescriptor(
        header,
        backend.name,
        export.handle,
        event,
        export.offset,
        export.alloc_size,
        export.device.uuid,
        export.device.pci_bus_id,
        table.name,
        slot,
        generation,
        seq,
    )
    array, meta = desc.to_message()
    if checksum:
        host = _host_bytes(backend, source, header)
        meta[_schema.KEY_CHECKSUM] = _checksum.digest(header.describe(), host)
    return array, meta


def _empty_uuid(backend: backends.CudaBackend) -> str:
    return backends.STANDIN_UUID if backend.name == "standin" else "GPU-00000000"


def _host_bytes(backend: backends.CudaBackend, x: Any, header: _schema.TensorHeader) -> Any:
    """The wire bytes of a dense device array, copied to the host (checksums, host path)."""
    if isinstance(x, backends.StandInArray):
        return np.ascontiguousarray(x.view.transpose(list(header.perm))).view(np.uint8)
    host = to_host(x)
    if isinstance(host, np.ndarray):
        return np.ascontiguousarray(host.transpose(list(header.perm))).reshape(-1).view(np.uint8)
    import torch

    dense = host.permute(list(header.perm)).contiguous().reshape(-1)
    return dense.view(torch.uint8).numpy()


def to_host(x: Any) -> Any:
    """The host copy of a device array, same framework family (torch -> CPU torch, else numpy).

    This is the host path's one device-to-host copy.
    """
    if isinstance(x, backends.StandInArray):
        return x.numpy()
    if sys.modules.get("torch") is not None and isinstance(x, sys.modules["torch"].Tensor):
        return x.detach().cpu()
    if sys.modules.get("cupy") is not None and isinstance(x, sys.modules["cupy"].ndarray):
        return x.get()
    pacuda = backends.pyarrow_cuda()
    if pacuda is not None and isinstance(x, pacuda.CudaBuffer):
        return np.frombuffer(x.copy_to_host(), dtype=np.uint8)
    raise UnsupportedTensorError(f"not a device array: {type(x).__name__}")


# ---------------------------------------------------------------------------------------------
# Receiver side


@dataclass
class _Opened:
    base: int
    size: int
    refs: int
    ordinal: int
    backend: backends.CudaBackend


class HandleCache:
    """Opened allocations of this process: each handle opened once, closed on last release.

    Opening the same handle twice in one process fails (CUDA allows one mapping per
    process), and closing it while a tensor still views it turns reads into faults, so
    every tensor built on a handle holds one reference and the last one closes it.
    """

    def __init__(self) -> None:
        self._open: dict[tuple[str, str, bytes], _Opened] = {}
        self._lock = threading.RLock()

    def acquire(
        self, backend: backends.CudaBackend, uuid: str, handle: bytes, ordinal: int
    ) -> _Opened:
        """The mapping of ``handle``, opening it on first use; one more reference."""
        key = (backend.name, uuid, handle)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                base, size = backend.open_handle(handle, ordinal)
                entry = self._open[key] = _Opened(base, size, 0, ordinal, backend)
            entry.refs += 1
            return entry

    def release(self, backend_name: str, uuid: str, handle: bytes) -> None:
        """One reference less; the last one closes the mapping."""
        key = (backend_name, uuid, handle)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs <= 0:
                del self._open[key]
                entry.backend.close_handle(entry.base, entry.ordinal)

    def contains(self, x: Any) -> bool:
        """True when ``x``'s memory lies in an allocation opened here (not ours to share)."""
        ptr = _data_ptr(x)
        if ptr is None:
            return False
        with self._lock:
            return any(e.base <= ptr < e.base + e.size for e in self._open.values())

    def __len__(self) -> int:
        return len(self._open)

    def refs(self) -> int:
        """Total references held (tensors alive on opened handles)."""
        with self._lock:
            return sum(e.refs for e in self._open.values())


def _data_ptr(x: Any) -> int | None:
    if isinstance(x, backends.StandInArray):
        return None  # stand-in receivers build numpy arrays, never StandInArrays
    ptr = getattr(x, "data_ptr", None)
    if callable(ptr):
        return int(ptr())
    data = getattr(x, "data", None)
    return int(getattr(data, "ptr", 0)) or None


_receiving_cache = HandleCache()


class _Mapped:
    """A control block as a receiver sees it."""

    def __init__(self, name: str, node_id: str, dataflow: str) -> None:
        match = _BLOCK_NAME.match(name)
        if match is None:
            raise ShmHandleError(f"{name[:100]!r} is not a control block name")
        if match.group(1) != dataflow:
            raise ShmHandleError(
                f"control block {name!r} belongs to dataflow {match.group(1)}, this process "
                f"runs in {dataflow}"
            )
        self.name = name
        self.producer_pid = int(match.group(2))
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StaleHandleError(_gone(name, self.producer_pid)) from None
        try:
            info = os.fstat(fd)
            if info.st_uid != os.geteuid() or info.st_mode & 0o077:
                raise ShmHandleError(f"control block {name} is not owner-only (mode 600)")
            self._mm = mmap.mmap(fd, info.st_size)
        finally:
            os.close(fd)
        self.block = ControlBlock.attach(self._mm)
        if self.block.owner_word(_O_KIND) != MEMORY_KIND_CUDA:
            raise ShmHandleError(f"{name} is not a CUDA control block")
        if (
            self.block.owner_word(_O_DATAFLOW_HI),
            self.block.owner_word(_O_DATAFLOW_LO),
        ) != _dataflow_words(dataflow):
            raise ShmHandleError(f"control block {name} was made by another dataflow")
        index = self.block.receiver_index(_receiver_key(node_id))
        if index is None:
            index = self.block.receiver_index(_receiver_key(ANONYMOUS))
        if index is None:
            raise ShmHandleError(
                f"node {node_id!r} is not a receiver of {name}: the producer's dataflow "
                f"descriptor does not route this output to it"
            )
        self.rx = ReceiverSlots(self.block, index)
        self.gone = False


def _gone(name: str, pid: int) -> str:
    state = "is alive" if pid_alive(pid) else "has exited or crashed"
    return (
        f"CUDA control block {name} no longer exists (producer pid {pid} {state}); the "
        f"memory of this message is gone"
    )


_mapped: dict[str, _Mapped] = {}
_mapped_lock = threading.Lock()


def _mapped_block(name: str) -> _Mapped:
    from . import _shm

    for dropped in _shm.poll_dropped():  # dora reports producers that died (extension table)
        if dropped in _mapped:
            _mapped[dropped].gone = True
    with _mapped_lock:
        mapped = _mapped.get(name)
        if mapped is None:
            dataflow, node_id = _identity()
            mapped = _mapped[name] = _Mapped(name, node_id, dataflow)
            node = _shm._attached_node
            if node is not None:
                with contextlib.suppress(Exception):  # already dropped: producer gone
                    node.extension_load(_shm.EXTENSION_NS, name)
        return mapped


def forget_blocks() -> None:
    """Drop this process's cache of mapped control blocks (tests)."""
    with _mapped_lock:
        _mapped.clear()


class _Hold:
    """Owner object of received device memory: its death releases handle and slot."""

    __slots__ = ("__weakref__",)


def _release(
    backend: backends.CudaBackend,
    ordinal: int,
    uuid: str,
    handle: bytes,
    rx: ReceiverSlots | None,
    slot: int,
    generation: int,
) -> None:
    with contextlib.suppress(Exception):  # finalizers must not raise (interpreter exit)
        backend.synchronize(ordinal)
    with contextlib.suppress(Exception):
        _receiving_cache.release(backend.name, uuid, handle)
    if rx is not None:
        rx.release(slot, generation)


def decode_cuda(
    array: Any,
    meta: Mapping[str, Any],
    writable: bool = False,
    verify: bool = False,
    device: str | None = None,
) -> Any:
    """Open a CUDA descriptor as a zero-copy device tensor (or a copy where asked).

    Parameters
    ----------
    array, meta:
        What dora delivered; ``meta`` already passed ``_schema.check_envelope``.
    writable:
        ``True``: a private copy on the device (same layout); the producer's memory is
        released at once.
    verify:
        Check ``at.checksum`` (over a host copy).
    device:
        ``None``: where it is, zero-copy. ``"cpu"``: a host copy (numpy, or CPU torch for
        torch messages). ``"cuda"`` / ``"cuda:N"``: on that device of this process, zero
        copy when it is the producer's device, else one device-to-device copy.

    Raises
    ------
    MetadataError, PayloadError
        Malformed descriptors (handle length, bounds, device name, control block name).
    CudaUnavailableError
        No CUDA framework here, or the producer's device is not visible to this process.
    StaleHandleError
        The producer is gone or the slot was reclaimed (the message was read too late).
    """
    desc = parse_descriptor(array, meta)
    header = desc.header
    backend = backends.backend_for_receiver(desc.backend, header.framework)
    target = _parse_device(device)
    ordinal = backend.local_device(desc.device_uuid, desc.pci_bus_id)
    if header.nbytes == 0:
        return _empty(header, target, 0 if ordinal is None else ordinal, backend)
    if ordinal is None:
        raise CudaUnavailableError(
            f"the producer's device {desc.device_uuid} (PCI {desc.pci_bus_id or '?'}) is not "
            f"visible to this process (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); send through the host "
            f"path (ARROW_TENSOR_TRANSPORT=host)"
        )
    if desc.backend == "cuda" and desc.block.split("-")[2] == str(os.getpid()):
        raise CudaUnavailableError(
            "this process exported the CUDA memory of this message, and CUDA does not let "
            "a process open its own IPC handles: decode it in the receiving process"
        )
    mapped = _mapped_block(desc.block)
    if mapped.gone or mapped.block.closed or not pid_alive(mapped.producer_pid):
        raise StaleHandleError(_gone(desc.block, mapped.producer_pid))
    if desc.slot >= mapped.block.n_slots:
        raise MetadataError(
            f"{KEY_SLOT!r} {desc.slot} outside the {mapped.block.n_slots} slots of {desc.block}"
        )
    mapped.rx.take(desc.slot, desc.generation, desc.seq)
    try:
        opened = _receiving_cache.acquire(backend, desc.device_uuid, desc.handle, ordinal)
    except BaseException:
        mapped.rx.release(desc.slot, desc.generation)
        raise
    hold = _Hold()
    weakref.finalize(
        hold,
        _release,
        backend,
        ordinal,
        desc.device_uuid,
        desc.handle,
        mapped.rx,
        desc.slot,
        desc.generation,
    )
    if desc.offset + header.nbytes > opened.size:
        raise PayloadError(
            f"the tensor's bytes [{desc.offset}, {desc.offset + header.nbytes}) lie outside "
            f"the {opened.size}-byte allocation the handle opened (the message claims "
            f"{desc.alloc_size})"
        )
    if desc.event is not None:
        backend.wait_event(desc.event, ordinal)
    ptr = opened.base + desc.offset
    host = None
    if verify or target == "cpu":
        host = backend.to_host(ptr, header.nbytes, ordinal)
    if verify:
        _checksum.verify(meta.get(_schema.KEY_CHECKSUM), header.describe(), host)
    if target == "cpu":
        del hold  # the copy is private: the producer's memory is released now
        return _host_tensor(header, host)
    tensor = backend.build(
        header.framework,
        ptr,
        header.nbytes,
        hold,
        header.dtype,
        header.physical_shape,
        _layout.inverse(header.perm),
        ordinal,
    )
    del hold  # from here on, only the tensor (and its views) keep the memory
    if target is not None and target != ordinal:
        return _to_device(tensor, target)
    if writable:
        return _private_copy(tensor)
    return tensor


def decode_on_device(
    decoder: Any, array: Any, meta: Mapping[str, Any], writable: bool, verify: bool, device: str
) -> Any:
    """``decode(..., device=...)`` for any message kind.

    CUDA descriptors are mapped (or copied) by ``decode_cuda``; host messages are decoded
    as usual and, for a CUDA ``device``, their tensor leaves are copied onto it.
    """
    target = _parse_device(device)
    if decoder is decode_cuda:
        return decode_cuda(array, meta, writable=writable, verify=verify, device=device)
    value = decoder(array, meta, writable=writable, verify=verify)
    return value if target == "cpu" else _map_tensors(value, target)


def _map_tensors(value: Any, ordinal: Any) -> Any:
    if isinstance(value, dict):
        return {k: _map_tensors(v, ordinal) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, ordinal) for v in value)
    if isinstance(value, np.ndarray) or hasattr(value, "is_cuda"):
        return move_to_device(value, ordinal)
    return value


def _parse_device(device: str | None) -> str | int | None:
    """None, "cpu" or a device ordinal."""
    if device is None or device == "cpu":
        return device
    if isinstance(device, str):
        match = re.fullmatch(r"cuda(?::(\d{1,3}))?", device)
        if match:
            return int(match.group(1) or 0)
    raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _host_tensor(header: _schema.TensorHeader, host: np.ndarray) -> Any:
    from ._codec import view_tensor

    framework = "torch" if header.framework == "torch" else "numpy"
    host_header = _schema.TensorHeader(header.dtype, header.shape, header.perm, framework)
    return view_tensor(host_header, pa.py_buffer(host), writable=True)


def move_to_device(value: Any, ordinal: int) -> Any:
    """A host tensor (or a device tensor elsewhere) as a tensor on CUDA device ``ordinal``."""
    if sys.modules.get("torch") is not None and isinstance(value, sys.modules["torch"].Tensor):
        if not sys.modules["torch"].cuda.is_available():
            raise CudaUnavailableError(
                f"device='cuda:{ordinal}' was asked for but torch sees no CUDA device here"
            )
        return value.to(f"cuda:{ordinal}")
    try:
        import cupy
    except ImportError as exc:
        raise CudaUnavailableError(
            "a numpy result was asked for on a CUDA device but cupy is not installed"
        ) from exc
    with cupy.cuda.Device(ordinal):
        return cupy.asarray(value)


def _to_device(tensor: Any, ordinal: int) -> Any:
    if isinstance(tensor, np.ndarray):
        return move_to_device(tensor, ordinal)
    if hasattr(tensor, "to"):
        return tensor.to(f"cuda:{ordinal}")
    import cupy

    with cupy.cuda.Device(ordinal):
        return cupy.array(tensor, copy=True)


def _private_copy(tensor: Any) -> Any:
    if isinstance(tensor, np.ndarray):
        return np.array(tensor, order="K", copy=True)
    if hasattr(tensor, "clone"):
        import torch

        return tensor.clone(memory_format=torch.preserve_format)
    return tensor.copy(order="K")


def _empty(header: _schema.TensorHeader, target: Any, ordinal: int, backend: Any) -> Any:
    """A zero-size tensor has no memory and no handle: make one where it is wanted."""
    value = _host_tensor(header, np.empty(0, dtype=np.uint8))
    if target == "cpu" or backend.name == "standin":
        return value
    return move_to_device(value, ordinal if target is None else target)


# ---------------------------------------------------------------------------------------------
# The host-path decision inputs

_NO_CUDA = ("", "-1", "none", "void", "nodevfiles")


def host_fallback_reason(
    descriptor: Mapping[str, Any],
    node_id: str,
    output_id: str,
    environ: Mapping[str, str],
    device_problem: str | None = None,
) -> str | None:
    """Why ``output_id`` of ``node_id`` must send CUDA tensors by the host path, or None.

    A pure function of the dataflow descriptor (as ``node.dataflow_descriptor()`` returns
    it, or the YAML parsed), this process's environment and what the device reported; the
    transport decision (``_transport.choose_transport``) calls it once per output.

    Parameters
    ----------
    descriptor:
        The dataflow: ``nodes`` with ``id``, ``inputs``, ``env``, ``deploy``.
    node_id, output_id:
        The producer and its output.
    environ:
        This process's environment (``ARROW_TENSOR_TRANSPORT``, ``DORA_MACHINE_ID``).
    device_problem:
        What the backend found wrong with legacy IPC here (expandable segments, an
        integrated / unified-memory GPU), if anything.

    Returns
    -------
    str or None
        A sentence naming the reason, or None when every receiver can open the handles.
    """
    from . import _shm

    forced = environ.get("ARROW_TENSOR_TRANSPORT", "auto").strip().lower()
    if forced == "host":
        return "ARROW_TENSOR_TRANSPORT=host"
    if device_problem:
        return device_problem
    receivers = _shm.receivers_of(descriptor, node_id, output_id)
    mine = environ.get("DORA_MACHINE_ID") or _shm._own_machine(descriptor, node_id)
    remote = [r for r, machine in receivers if machine != mine]
    if remote:
        return f"receivers {remote} run on another machine than {mine!r} (deploy.machine)"
    nodes = {str(n.get("id")): n for n in descriptor.get("nodes") or []}
    for rid, _machine in receivers:
        env = nodes.get(rid, {}).get("env") or {}
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and str(visible).strip().lower() in _NO_CUDA:
            return f"receiver {rid!r} has no CUDA device (CUDA_VISIBLE_DEVICES={visible!r})"
        if str(env.get("ARROW_TENSOR_TRANSPORT", "")).strip().lower() == "host":
            return f"receiver {rid!r} asks for the host path (ARROW_TENSOR_TRANSPORT=host)"
    return None


def legacy_ipc_problem(x: Any, environ: Mapping[str, str]) -> str | None:
    """Why legacy CUDA IPC cannot share ``x`` from this process, or None."""
    if isinstance(x, backends.StandInArray):
        return backends.standin().ipc_problem
    conf = ",".join(
        environ.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
    ).replace(" ", "")
    if sys.modules.get("torch") is not None and isinstance(x, sys.modules["torch"].Tensor):
        if "expandable_segments:true" in conf.lower():
            return "PyTorch expandable segments are enabled (no legacy CUDA IPC handles)"
        if not x.is_cuda:
            return None
        props = sys.modules["torch"].cuda.get_device_properties(x.device)
        if getattr(props, "is_integrated", False):
            return f"{props.name} is an integrated (unified-memory) GPU without legacy IPC"
    return None


# ---------------------------------------------------------------------------------------------
# What ``_transport`` calls


@dataclass
class _OutputState:
    node: Any  # kept so that a recycled id() never inherits another node's answer
    reason: str | None
    logged: set[str]


_outputs: dict[tuple[int, str], _OutputState] = {}


def _output_state(node: Any, output_id: str, value: Any) -> _OutputState:
    state = _outputs.get((id(node), output_id))
    if state is None or state.node is not node:
        _, node_id = _identity()
        try:
            descriptor = node.dataflow_descriptor() or {}
        except Exception:  # a node without a daemon behind it: no placement information
            descriptor = {}
        problem = legacy_ipc_problem(value, os.environ)
        reason = host_fallback_reason(descriptor, node_id, output_id, os.environ, problem)
        state = _outputs[(id(node), output_id)] = _OutputState(node, reason, set())
    return state


def ipc_reason(node: Any, output_id: str, value: Any) -> str | None:
    """Why ``value`` on ``output_id`` must take the host path, or None; logged once per output.

    Decided once per output: the dataflow descriptor does not change during a run, and the
    device facts (expandable segments, integrated GPU) are those of the first value.
    """
    reason = _output_state(node, output_id, value).reason
    if reason is not None:
        log_host_path_once(node, output_id, reason)
    return reason


def log_host_path_once(node: Any, output_id: str, reason: str) -> None:
    """Say once per output and reason that CUDA tensors go through a host copy."""
    state = _output_state(node, output_id, None)
    topic = reason.split(" (")[0][:60]
    if topic in state.logged:
        return
    state.logged.add(topic)
    text = (
        f"arrow_tensor: output {output_id!r} sends CUDA tensors by the host path "
        f"(one device-to-host copy per message) because {reason}"
    )
    warn = getattr(node, "log_warn", None)
    try:
        if callable(warn):
            warn(text)
            return
    except Exception:  # logging must never break a send
        pass
    log.warning(text)


def send_ipc(
    node: Any, output_id: str, value: Any, extra: Mapping[str, Any], checksum: bool
) -> None:
    """Send a device array as a CUDA IPC descriptor to every receiver of ``output_id``.

    Raises ``PoolExhaustedError`` (nothing sent) when no in-flight slot frees up in time.
    """
    from . import _shm

    _, node_id = _identity()
    try:
        descriptor = node.dataflow_descriptor() or {}
    except Exception:
        descriptor = {}
    receivers = [r for r, _machine in _shm.receivers_of(descriptor, node_id, output_id)]
    array, meta = encode_cuda(value, receivers=receivers or (ANONYMOUS,), checksum=checksum)
    block = meta[KEY_BLOCK]
    if block and block not in _registered:
        # The daemon drops this entry when this process dies and tells every receiver that
        # loaded it (see _shm): the same crash notice and cleanup as the host pools.
        _registered.add(block)
        with contextlib.suppress(Exception):  # MockNode, or a dora without the table
            node.extension_store(_shm.EXTENSION_NS, block, str(os.getpid()).encode())
    meta.update(extra)
    node.send_output(output_id, array, meta)


_registered: set[str] = set()
