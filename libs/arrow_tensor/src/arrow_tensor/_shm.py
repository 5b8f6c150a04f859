"""POSIX shared-memory pools: loaned CPU tensors sent as handles (see SPEC.md).

Note [Shared-memory pools]
Each output of a producer owns one *pool*: a file in /dev/shm, created 0600 under the name
``at-<dataflow id>-<producer pid>-<128 random bits>``, holding a control block (``_slots``)
followed by ``n_slots`` slots of ``capacity`` bytes (page aligned). The producer loans a slot,
the user fills it, and the message carries only the tensor header (``_schema.TensorHeader``,
the same keys as an inline tensor, with ``at.kind = "shm"``) plus the handle (pool name,
slot, generation, seq, byte offset in the slot). A receiver opens each pool once (control
block read-write, payload read-only), checks the handle against the pool's own header, and
builds its tensor over the mapping with ``_codec.view_tensor``; the tensor's base object
carries a finalizer that releases the slot (``_slots.ReceiverSlots``).

A tensor larger than the current capacity makes a new pool (next power of two); the old one
retires once its slots are free. Pages are reserved with ``posix_fallocate`` when a slot
first grows, so a full /dev/shm turns into ``PoolExhaustedError`` (and the message path),
never into SIGBUS.

Cleanup, in the order it usually happens: (1) once every receiver has mapped a pool its
name is unlinked (the mappings live on), so a crash leaves nothing behind; (2) a producer
that exits cleanly unlinks its pools (after waiting up to ``linger_s`` for receivers that
still have to map them); (3) a producer that dies: its extension-table entry (one per pool)
is dropped by the dora daemon and every receiver that loaded it is notified
(``drain_dropped_extension_keys``) and unlinks the name; (4) at exit a receiver unlinks the
pools of dead producers it knows; (5) when a process creates its first pool it sweeps
``at-<this dataflow>-<pid>-*`` files whose pid is dead. Receivers keep reading what they
have already mapped after a producer crash (nobody will overwrite it); a handle to a pool
that is gone raises ``StaleHandleError`` naming the producer. A receiver forgets a retired
pool once it holds no view of it, so its pages go back to the system.

Used by others: ``identity``, ``receivers_of``, ``poll_dropped`` and ``EXTENSION_NS`` are
shared with the CUDA transport (``_cuda_ipc``), whose in-flight buffers use the same
``_slots`` machinery; ``_transport.choose_transport`` asks ``pool_takes``, and
``_transport.send`` then calls ``send_pooled``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import hashlib
import logging
import math
import mmap
import os
import re
import secrets
import stat
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from . import _checksum, _config, _schema
from ._codec import plan as plan_tensor
from ._codec import view_tensor
from ._errors import (
    ArrowTensorError,
    PoolExhaustedError,
    ShmHandleError,
    StaleHandleError,
    UnsupportedTensorError,
)
from ._slots import (
    MAX_RECEIVERS,
    MAX_SLOTS,
    ControlBlock,
    Lease,
    ProducerSlots,
    ReceiverSlots,
    block_words,
    pid_alive,
)
from ._slots import receiver_key as _receiver_key

__all__ = [
    "EXTENSION_NS",
    "KIND_SHM",
    "Identity",
    "OutputPool",
    "attach",
    "available",
    "close_all",
    "decode_shm",
    "identity",
    "output_pool",
    "poll_dropped",
    "pool_takes",
    "receivers_of",
    "route",
    "route_cached",
    "send_pooled",
    "set_identity",
    "sweep_orphans",
    "try_send",
]

log = logging.getLogger("arrow_tensor.shm")

SHM_DIR = "/dev/shm"
KIND_SHM = "shm"
KEY_POOL = "at.shm.pool"
KEY_SLOT = "at.shm.slot"
KEY_GENERATION = "at.shm.gen"
KEY_SEQ = "at.shm.seq"
KEY_OFFSET = "at.shm.offset"
EXTENSION_NS = "arrow_tensor.shm"
PAGE = mmap.PAGESIZE
MIN_CAPACITY = 64 << 10
LINGER_S = 2.0
"""How long a closing producer waits for receivers that have not mapped its pools yet."""
MEMORY_KIND_HOST = 1
_EMPTY = pa.array([], pa.uint8())
_NAME = re.compile(r"^at-([0-9a-f]{32})-([0-9]{1,10})-([0-9a-f]{32})$")
# Owner words of the control block (see _slots): what the host pool adds to it.
_O_DATAFLOW_HI, _O_DATAFLOW_LO, _O_KIND, _O_CAPACITY, _O_HEADER_BYTES = range(5)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


# Identity ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """Who this process is in the dataflow: what handles are checked against."""

    dataflow_id: str
    node_id: str

    @property
    def dataflow_hex(self) -> str:
        """32 hex digits naming the dataflow (its uuid, or a hash of a non-uuid id)."""
        try:
            return uuid.UUID(self.dataflow_id).hex
        except ValueError:
            return hashlib.blake2b(self.dataflow_id.encode(), digest_size=16).hexdigest()


_identity: Identity | None = None


def identity() -> Identity:
    """This node's identity, read once from ``DORA_NODE_CONFIG`` (set by dora for each node)."""
    global _identity
    if _identity is None:
        config = os.environ.get("DORA_NODE_CONFIG", "")
        fields = dict(
            line.split(":", 1) for line in config.splitlines() if line[:1].isalpha() and ":" in line
        )
        dataflow = fields.get("dataflow_id", "").strip().strip("'\"")
        node = fields.get("node_id", "").strip().strip("'\"")
        if not dataflow or not node:
            raise ShmHandleError(
                "shared-memory handles can only be read inside a dora node "
                "(DORA_NODE_CONFIG lacks dataflow_id/node_id); use set_identity() in tests"
            )
        _identity = Identity(dataflow, node)
    return _identity


def set_identity(ident: Identity | None) -> None:
    """Override (or reset with None) the identity: for tests and tools outside dora."""
    global _identity
    _identity = ident


def _dataflow_words(ident: Identity) -> tuple[int, int]:
    raw = bytes.fromhex(ident.dataflow_hex)
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


# Dataflow routing -------------------------------------------------------------------------
def _input_source(spec: object) -> str | None:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        source = spec.get("source")
        return source if isinstance(source, str) else None
    return None


def _machine(node: Mapping[str, Any], default: str | None) -> str | None:
    deploy = node.get("deploy")
    if isinstance(deploy, Mapping) and deploy.get("machine"):
        return str(deploy["machine"])
    return default


def receivers_of(
    descriptor: Mapping[str, Any], node_id: str, output_id: str
) -> list[tuple[str, str | None]]:
    """(node id, machine or None) of every node with an input fed by ``node_id/output_id``."""
    wanted = f"{node_id}/{output_id}"
    dataflow_deploy = descriptor.get("deploy")
    default = None
    if isinstance(dataflow_deploy, Mapping) and dataflow_deploy.get("machine"):
        default = str(dataflow_deploy["machine"])
    found: dict[str, str | None] = {}
    for entry in descriptor.get("nodes") or []:
        inputs = entry.get("inputs") or {}
        if any(_input_source(spec) == wanted for spec in inputs.values()):
            found[str(entry.get("id"))] = _machine(entry, default)
    return sorted(found.items())


def _own_machine(descriptor: Mapping[str, Any], node_id: str) -> str | None:
    machine = os.environ.get("DORA_MACHINE_ID") or None
    if machine:
        return machine
    dataflow_deploy = descriptor.get("deploy")
    default = None
    if isinstance(dataflow_deploy, Mapping) and dataflow_deploy.get("machine"):
        default = str(dataflow_deploy["machine"])
    for entry in descriptor.get("nodes") or []:
        if str(entry.get("id")) == node_id:
            return _machine(entry, default)
    return default


def available() -> bool:
    """True where POSIX shared memory is a directory we can create files in (Linux)."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK)


# Segments ---------------------------------------------------------------------------------
def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, name))


def sweep_orphans(ident: Identity) -> list[str]:
    """Unlink this dataflow's pools whose producer process is gone; returns their names."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        match = _NAME.match(name)
        if match is None or match.group(1) != ident.dataflow_hex:
            continue
        pid = int(match.group(2))
        if pid != os.getpid() and not pid_alive(pid):
            _unlink(name)
            removed.append(name)
    return removed


class _ProducerSegment:
    """One pool file as its producer sees it: control block, slots, loans."""

    def __init__(
        self,
        ident: Identity,
        n_slots: int,
        capacity: int,
        receivers: Sequence[str],
        lease_s: float,
        attach_grace_s: float,
    ) -> None:
        self.name = f"at-{ident.dataflow_hex}-{os.getpid()}-{secrets.token_hex(16)}"
        self.capacity = capacity
        self.n_slots = n_slots
        self.header_bytes = _round_up(8 * block_words(n_slots, len(receivers)), PAGE)
        total = self.header_bytes + n_slots * capacity
        path = os.path.join(SHM_DIR, self.name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o600)
        try:
            os.fchmod(self._fd, 0o600)
            os.ftruncate(self._fd, total)
            self._mm = mmap.mmap(self._fd, total)
            self.block = ControlBlock.create(
                self._mm,
                n_slots,
                [_receiver_key(r) for r in receivers],
                owner_words=(
                    *_dataflow_words(ident),
                    MEMORY_KIND_HOST,
                    capacity,
                    self.header_bytes,
                ),
            )
        except BaseException:
            os.close(self._fd)
            _unlink(self.name)
            raise
        self.payload = np.frombuffer(self._mm, np.uint8, n_slots * capacity, self.header_bytes)
        self.address = self.payload.ctypes.data
        self.slots = ProducerSlots(self.block, lease_s=lease_s, attach_grace_s=attach_grace_s)
        self.loans: dict[int, Lease] = {}
        self._reserved = [0] * n_slots
        self.unlinked = False

    def reserve(self, slot: int, nbytes: int) -> None:
        """Make sure the first ``nbytes`` of ``slot`` are backed by pages (no SIGBUS later)."""
        if nbytes <= self._reserved[slot]:
            return
        try:
            os.posix_fallocate(self._fd, self.header_bytes + slot * self.capacity, nbytes)
        except OSError as exc:
            raise PoolExhaustedError(
                f"/dev/shm cannot back {nbytes} more bytes for pool {self.name}: {exc}"
            ) from None
        self._reserved[slot] = nbytes

    def slot_memory(self, slot: int, nbytes: int) -> np.ndarray:
        """A writable uint8 array over the first ``nbytes`` of ``slot``, owning its lifetime.

        It is built over a memoryview so that numpy views derived from it keep *it* (not the
        whole pool array) as their base: its finalizer then runs only after the last view.
        """
        start = self.header_bytes + slot * self.capacity
        return np.frombuffer(memoryview(self._mm)[start : start + nbytes], np.uint8)

    def locate(self, address: int, nbytes: int) -> Lease | None:
        """The loaned, unsent lease whose slot holds ``[address, address + nbytes)``."""
        offset = address - self.address
        if not 0 <= offset < self.n_slots * self.capacity:
            return None
        slot = offset // self.capacity
        if offset + nbytes > (slot + 1) * self.capacity:
            return None
        lease = self.loans.get(slot)
        if lease is None or not self.slots.is_loaned(lease):
            return None
        return lease

    def all_mapped(self) -> bool:
        block = self.block
        return all(block.receiver_mapped(r) for r in range(block.n_receivers))

    def unlink(self) -> None:
        if not self.unlinked:
            _unlink(self.name)
            self.unlinked = True

    def close(self) -> None:
        """Unlink and let go of the file descriptor; mappings die with their last view."""
        self.block.set_closed()
        self.unlink()
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _framework_of(dtype: Any, framework: str | None) -> str:
    if framework is not None:
        if framework not in ("numpy", "torch"):  # host memory: what receivers can view
            raise ArrowTensorError(f"framework must be 'numpy' or 'torch', got {framework!r}")
        return framework
    return "torch" if type(dtype).__module__ == "torch" else "numpy"


class OutputPool:
    """The loaned shared-memory pool of one output of this node.

    Parameters
    ----------
    node:
        The dora ``Node`` (or ``MockNode``) that sends on ``output_id``.
    output_id:
        The output this pool serves; its receivers come from the dataflow descriptor.
    receivers:
        Receiver node ids, when not taken from the descriptor (tests, tools).
    slots:
        Slots per pool (``ARROW_TENSOR_SHM_SLOTS``, default 8): how many tensors can be
        loaned or in flight at once.
    max_bytes:
        Upper bound of one pool file (``ARROW_TENSOR_SHM_MAX_BYTES``, default 4 GiB); large
        tensors get fewer slots, never fewer than two.
    lease_s:
        How long an unread message keeps its slot (``ARROW_TENSOR_SHM_LEASE``, default 5 s).
    wait_s:
        How long ``loan``/``send`` wait for a free slot before falling back
        (``ARROW_TENSOR_SHM_WAIT``, default 100 ms).
    linger_s:
        How long ``close`` waits for receivers that have not mapped a pool yet (2 s).

    A receiver that has not mapped the pool ``ARROW_TENSOR_SHM_ATTACH_GRACE`` (default 1 s)
    after the first send stops holding up slots until it does (see ``_slots``).
    """

    def __init__(
        self,
        node: Any,
        output_id: str,
        *,
        receivers: Sequence[str] | None = None,
        slots: int | None = None,
        max_bytes: int | None = None,
        lease_s: float | None = None,
        wait_s: float | None = None,
        linger_s: float | None = None,
    ) -> None:
        self.node = node
        self.output_id = output_id
        self.ident = identity()
        if receivers is None:
            descriptor = node.dataflow_descriptor() or {}
            receivers = [r for r, _ in receivers_of(descriptor, self.ident.node_id, output_id)]
        self.receivers = list(receivers)
        setting = _config.setting
        self.n_slots = slots or setting("ARROW_TENSOR_SHM_SLOTS", _config.integer(1, 1024), 8)
        self.max_bytes = max_bytes or setting("ARROW_TENSOR_SHM_MAX_BYTES", _config.size, 4 << 30)
        self.lease_s = (
            lease_s
            if lease_s is not None
            else setting("ARROW_TENSOR_SHM_LEASE", _config.duration, 5.0)
        )
        self.wait_s = (
            wait_s
            if wait_s is not None
            else setting("ARROW_TENSOR_SHM_WAIT", _config.duration, 0.1)
        )
        self.attach_grace_s = setting("ARROW_TENSOR_SHM_ATTACH_GRACE", _config.duration, 1.0)
        self.linger_s = LINGER_S if linger_s is None else linger_s
        self._current: _ProducerSegment | None = None
        self._loaned: dict[int, tuple[Any, _ProducerSegment, Lease, _schema.TensorHeader]] = {}
        self._retired: list[_ProducerSegment] = []
        self._lock = threading.RLock()
        self._warned = False
        self.sent_shm = 0
        self.sent_message = 0

    # Loans ---------------------------------------------------------------------------
    def _segment_for(self, nbytes: int) -> _ProducerSegment:
        current = self._current
        if current is not None and nbytes <= current.capacity:
            return current
        capacity = max(MIN_CAPACITY, 1 << max(nbytes - 1, 1).bit_length())
        capacity = _round_up(capacity, PAGE)
        n_slots = max(min(self.n_slots, 2), min(self.n_slots, self.max_bytes // capacity))
        if not _swept:
            _sweep_once(self.ident)
        segment = _ProducerSegment(
            self.ident, n_slots, capacity, self.receivers, self.lease_s, self.attach_grace_s
        )
        with contextlib.suppress(Exception):  # no extension table (MockNode): no notices
            self.node.extension_store(EXTENSION_NS, segment.name, str(os.getpid()).encode())
        if current is not None:
            self._retired.append(current)
        self._current = segment
        _producer_pools.add(self)
        return segment

    def _acquire(self, nbytes: int, wait_s: float) -> tuple[_ProducerSegment, Lease]:
        with self._lock:
            self._housekeeping()
            segment = self._segment_for(nbytes)
            lease = segment.slots.acquire(wait_s)
            try:
                segment.reserve(lease.slot, nbytes)
            except PoolExhaustedError:
                segment.slots.cancel(lease)
                raise
            segment.loans[lease.slot] = lease
            return segment, lease

    def loan(self, shape: Sequence[int], dtype: Any, framework: str | None = None) -> Any:
        """An uninitialised tensor in a free slot, to fill and then ``send``.

        Parameters
        ----------
        shape:
            Tensor shape (C order).
        dtype:
            A numpy dtype, a torch dtype, or a wire dtype name (``"bfloat16"``).
        framework:
            ``"numpy"`` or ``"torch"``; by default torch for a torch dtype, else numpy.

        Returns
        -------
        A writable ``numpy.ndarray`` or ``torch.Tensor``. If no slot frees up within
        ``wait_s`` (or /dev/shm is full) it is an ordinary private tensor instead, which
        ``send`` copies into a slot or sends as an ordinary message.
        """
        from . import _dtypes

        framework = _framework_of(dtype, framework)
        entry = _dtype_entry(dtype, _dtypes)
        shape = tuple(int(d) for d in shape)
        if len(shape) > _schema.MAX_NDIM or any(d < 0 for d in shape):
            raise ArrowTensorError(
                f"shape must have at most {_schema.MAX_NDIM} non-negative dimensions, "
                f"got {list(shape)[:80]}"
            )
        nbytes = entry.itemsize * math.prod(shape)
        if nbytes == 0:
            memory = np.empty(0, np.uint8)
        else:
            try:
                segment, lease = self._acquire(nbytes, self.wait_s)
            except PoolExhaustedError as exc:
                self._warn_fallback(exc)
                memory = np.empty(nbytes, np.uint8)
            else:
                memory = segment.slot_memory(lease.slot, nbytes)
                weakref.finalize(memory, segment.slots.cancel, lease)
                tensor = _as_tensor(memory, entry, shape, framework)
                header = _schema.TensorHeader(entry, shape, tuple(range(len(shape))), framework)
                key = id(tensor)
                self._loaned[key] = (
                    weakref.ref(tensor, lambda _, key=key: self._loaned.pop(key, None)),
                    segment,
                    lease,
                    header,
                )
                return tensor
        return _as_tensor(memory, entry, shape, framework)

    def _as_loaned(self, value: Any) -> tuple[_ProducerSegment, Lease, Any] | None:
        """The loan ``value`` is, untouched (same object, shape, memory), without planning."""
        found = self._loaned.get(id(value))
        if found is None or found[0]() is not value:
            return None
        _, segment, lease, header = found
        if not segment.slots.is_loaned(lease) or tuple(value.shape) != header.shape:
            return None
        start = segment.address + lease.slot * segment.capacity
        if isinstance(value, np.ndarray):
            dense = value.flags.c_contiguous and value.__array_interface__["data"][0] == start
        else:
            dense = value.is_contiguous() and value.data_ptr() == start
        return (segment, lease, header) if dense else None

    # Sending -------------------------------------------------------------------------
    def send(
        self,
        value: Any,
        metadata: Mapping[str, Any] | None = None,
        *,
        checksum: bool = False,
        fallback: bool = True,
        wait_s: float | None = None,
    ) -> str:
        """Send ``value`` on this output as a handle; returns ``"shm"`` or ``"message"``.

        A tensor from ``loan`` goes without a copy; any other tensor is copied once into a
        free slot. With no slot free within ``wait_s`` it goes as an ordinary message, or
        with ``fallback=False`` raises ``PoolExhaustedError`` having sent nothing. ``wait_s``
        overrides the pool's wait for this send.
        ``metadata`` must already be plain (see ``_transport.user_metadata``).

        After sending a loaned tensor, do not write to it again: receivers may be reading.
        """
        extra = dict(metadata or {})
        with self._lock:
            loaned = self._as_loaned(value)
            if loaned is not None:
                segment, lease, header = loaned
                return self._publish(segment, lease, header, 0, extra, checksum)
            p = plan_tensor(value)
            header, nbytes = p.header, p.nbytes
            if nbytes == 0:
                return self._send_message(value, extra, checksum)
            lease = segment = None
            if not p.needs_copy:
                address = p.source.__array_interface__["data"][0]
                for candidate in (self._current, *self._retired):
                    if candidate is not None:
                        lease = candidate.locate(address, nbytes)
                        if lease is not None:
                            segment = candidate
                            offset = address - candidate.address - lease.slot * candidate.capacity
                            break
            if lease is None:
                try:
                    segment, lease = self._acquire(
                        nbytes, self.wait_s if wait_s is None else wait_s
                    )
                except PoolExhaustedError as exc:
                    if not fallback:
                        raise
                    self._warn_fallback(exc)
                    return self._send_message(value, extra, checksum)
                p.write_into(segment.slot_memory(lease.slot, nbytes))
                offset = 0
            assert segment is not None
            return self._publish(segment, lease, header, offset, extra, checksum)

    def _publish(
        self,
        segment: _ProducerSegment,
        lease: Lease,
        header: _schema.TensorHeader,
        offset: int,
        extra: dict[str, Any],
        checksum: bool,
    ) -> str:
        """Send the handle of bytes already in ``lease``'s slot."""
        nbytes = header.nbytes
        meta = header.to_metadata()
        meta[_schema.KEY_KIND] = KIND_SHM
        if checksum:
            start = lease.slot * segment.capacity + offset
            meta[_schema.KEY_CHECKSUM] = _checksum.digest(
                header.describe(), segment.payload[start : start + nbytes]
            )
        seq = segment.slots.mark_sent(lease)
        meta.update(
            {
                KEY_POOL: segment.name,
                KEY_SLOT: lease.slot,
                KEY_GENERATION: lease.generation,
                KEY_SEQ: seq,
                KEY_OFFSET: offset,
            }
        )
        meta.update(extra)
        try:
            self.node.send_output(self.output_id, _EMPTY, meta)
        except BaseException:
            segment.slots.unsend(lease)
            raise
        self.sent_shm += 1
        if not segment.unlinked and segment.all_mapped():
            segment.unlink()
        return "shm"

    def _send_message(self, value: Any, extra: dict[str, Any], checksum: bool) -> str:
        from . import _transport

        # Forcing "inline" keeps this from coming back here; values past dora's message cap
        # are still chunked.
        _transport.send(
            self.node, self.output_id, value, extra, checksum=checksum, transport=_transport.INLINE
        )
        self.sent_message += 1
        return "message"

    def _warn_fallback(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "output %r: %s; falling back to ordinary messages while the pool is full "
                "(logged once)",
                self.output_id,
                exc,
            )

    def _housekeeping(self) -> None:
        for segment in list(self._retired):
            if segment.slots.busy() == 0:
                self._retired.remove(segment)
                segment.close()
                with contextlib.suppress(Exception):
                    self.node.extension_drop(EXTENSION_NS, segment.name)

    def owns(self, address: int) -> bool:
        """True if ``address`` lies in one of this output's pool files."""
        for segment in (self._current, *self._retired):
            if segment is not None and 0 <= address - segment.address < segment.payload.size:
                return True
        return False

    def busy(self) -> int:
        """Slots of this output that are loaned or in flight."""
        with self._lock:
            segments = [s for s in (self._current, *self._retired) if s is not None]
            return sum(s.slots.busy() for s in segments)

    def segment_names(self) -> list[str]:
        """Names of this output's pool files (current and retiring)."""
        return [s.name for s in (self._current, *self._retired) if s is not None]

    def close(self) -> None:
        """Unlink every pool file, first waiting up to ``linger_s`` for receivers to map."""
        with self._lock:
            segments = [s for s in (self._current, *self._retired) if s is not None]
            deadline = time.monotonic() + self.linger_s
            for segment in segments:
                while not segment.all_mapped() and segment.slots.busy():
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.01)
                segment.close()
            self._current = None
            self._retired = []
        _producer_pools.discard(self)


def _as_private(shape: Sequence[int], dtype: Any, framework: str | None) -> Any:
    """An ordinary tensor, for when the pool cannot be used."""
    from . import _dtypes

    entry = _dtype_entry(dtype, _dtypes)
    shape = tuple(int(d) for d in shape)
    memory = np.empty(entry.itemsize * math.prod(shape), np.uint8)
    return _as_tensor(memory, entry, shape, _framework_of(dtype, framework))


def _dtype_entry(dtype: Any, dtypes: Any) -> Any:
    try:
        return _cached_dtype_entry(dtype, dtypes)
    except ArrowTensorError:
        raise
    except TypeError:  # unhashable: not a dtype
        raise UnsupportedTensorError(
            f"dtype must be a numpy dtype, a torch dtype or a wire dtype name, got {dtype!r:.80}"
        ) from None


@functools.lru_cache(maxsize=256)
def _cached_dtype_entry(dtype: Any, dtypes: Any) -> Any:
    if isinstance(dtype, str):
        return dtypes.lookup(dtype)
    if type(dtype).__module__ == "torch":
        return dtypes.from_torch(dtype)
    return dtypes.from_numpy(np.dtype(dtype))


def _as_tensor(memory: np.ndarray, entry: Any, shape: tuple[int, ...], framework: str) -> Any:
    if framework == "torch":
        import torch

        from . import _dtypes

        flat = torch.from_numpy(memory)
        if memory.size == 0:
            return torch.empty(shape, dtype=_dtypes.torch_dtype(entry))
        return flat.view(_dtypes.torch_dtype(entry)).view(shape)
    np_dtype = entry.numpy_dtype
    if np_dtype is None:
        raise ArrowTensorError(f"dtype {entry.name!r} has no numpy form; loan it as torch")
    return memory.view(np_dtype).reshape(shape)


# Registries and exit ----------------------------------------------------------------------
_pools: dict[tuple[int, str], OutputPool] = {}
_producer_pools: weakref.WeakSet[OutputPool] = weakref.WeakSet()
_swept = False


def _sweep_once(ident: Identity) -> None:
    global _swept
    _swept = True
    removed = sweep_orphans(ident)
    if removed:
        log.info("removed %d orphaned pool file(s) of dead producers: %s", len(removed), removed)


def output_pool(node: Any, output_id: str, **options: Any) -> OutputPool:
    """The pool of ``output_id`` on ``node``, made on first use (``options``: OutputPool's)."""
    key = (id(node), output_id)
    pool = _pools.get(key)
    if pool is None or pool.node is not node:
        pool = _pools[key] = OutputPool(node, output_id, **options)
    return pool


def route(node: Any, output_id: str) -> tuple[str, str]:
    """(``"shm"`` or ``"message"``, reason): whether ``output_id`` can use a pool.

    The pool needs every receiver on this machine (``deploy.machine`` in the descriptor
    against ``DORA_MACHINE_ID``), a usable /dev/shm, and a dora identity. One dora output
    reaches all its receivers with the same message, so one remote receiver sends the
    whole output by the message path.
    """
    if not available():
        return "message", f"{SHM_DIR} is not available on this system"
    try:
        ident = identity()
    except ShmHandleError as exc:
        return "message", str(exc)
    descriptor = node.dataflow_descriptor() or {}
    receivers = receivers_of(descriptor, ident.node_id, output_id)
    if not receivers:
        return "message", f"output {output_id!r} has no receivers in the dataflow descriptor"
    mine = _own_machine(descriptor, ident.node_id)
    remote = [r for r, machine in receivers if machine != mine]
    if remote:
        return "message", f"receivers {remote} run on another machine than {mine!r}"
    return "shm", f"all {len(receivers)} receivers run on this machine"


def close_all() -> None:
    """Close this process's pools (producer side) and unlink known pools of dead producers."""
    for pool in list(_producer_pools):
        with contextlib.suppress(Exception):
            pool.close()
    _pools.clear()
    for mapped in list(_mapped.values()):
        if mapped.block.closed or not pid_alive(mapped.block.producer_pid):
            _unlink(mapped.name)


atexit.register(close_all)


# Receiving --------------------------------------------------------------------------------
class _MappedPool:
    """A pool as a receiver sees it: control block read-write, payload read-only."""

    def __init__(self, name: str, ident: Identity) -> None:
        match = _NAME.match(name)
        if match is None:
            raise ShmHandleError(
                f"{KEY_POOL!r} must name an arrow_tensor pool 'at-<32 hex>-<pid>-<32 hex>', "
                f"got {name[:100]!r}"
            )
        if match.group(1) != ident.dataflow_hex:
            raise ShmHandleError(
                f"pool {name!r} belongs to dataflow {match.group(1)}, "
                f"this node runs in {ident.dataflow_hex}"
            )
        self.name = name
        self.producer_pid = int(match.group(2))
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            state = "is alive" if pid_alive(self.producer_pid) else "has exited or crashed"
            raise StaleHandleError(
                f"pool {name} no longer exists (its producer, pid {self.producer_pid}, {state}); "
                f"this message cannot be read"
            ) from None
        except OSError as exc:
            raise ShmHandleError(f"cannot open pool {name}: {exc}") from None
        try:
            self._open(fd, ident)
        finally:
            os.close(fd)

    def _open(self, fd: int, ident: Identity) -> None:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise ShmHandleError(f"pool {self.name} is not a regular file owned by this user")
        if info.st_mode & 0o077:
            raise ShmHandleError(
                f"pool {self.name} has mode {info.st_mode & 0o777:o}; expected 600"
            )
        if info.st_size < PAGE:
            raise ShmHandleError(f"pool {self.name} is {info.st_size} bytes; too small")
        with mmap.mmap(fd, PAGE, access=mmap.ACCESS_READ) as first:
            n_slots, n_rx = struct.unpack_from("=2Q", first, 16)
        if not 1 <= n_slots <= MAX_SLOTS or n_rx > MAX_RECEIVERS:
            raise ShmHandleError(f"pool {self.name} claims {n_slots} slots, {n_rx} receivers")
        header_bytes = _round_up(8 * block_words(n_slots, n_rx), PAGE)
        if header_bytes > info.st_size:
            raise ShmHandleError(f"pool {self.name} is smaller than its own control block")
        self._control = mmap.mmap(fd, header_bytes)
        self.block = ControlBlock.attach(self._control)
        block = self.block
        capacity = block.owner_word(_O_CAPACITY)
        if (
            block.owner_word(_O_KIND) != MEMORY_KIND_HOST
            or block.owner_word(_O_HEADER_BYTES) != header_bytes
            or capacity <= 0
            or capacity % PAGE
            or header_bytes + block.n_slots * capacity != info.st_size
        ):
            raise ShmHandleError(
                f"pool {self.name}: header (capacity {capacity}, {block.n_slots} slots) does "
                f"not match its file size {info.st_size}"
            )
        hi, lo = _dataflow_words(ident)
        if (block.owner_word(_O_DATAFLOW_HI), block.owner_word(_O_DATAFLOW_LO)) != (hi, lo):
            raise ShmHandleError(f"pool {self.name} was made by another dataflow")
        index = block.receiver_index(_receiver_key(ident.node_id))
        if index is None:
            raise ShmHandleError(
                f"node {ident.node_id!r} is not a receiver of pool {self.name}: the producer's "
                f"dataflow descriptor does not route this output to it"
            )
        self.capacity = capacity
        self.payload = mmap.mmap(
            fd, block.n_slots * capacity, access=mmap.ACCESS_READ, offset=header_bytes
        )
        self.rx = ReceiverSlots(block, index)
        self.gone = False


_mapped: dict[str, _MappedPool] = {}
_mapped_lock = threading.Lock()
_attached_node: Any = None


def attach(node: Any) -> None:
    """Let this process learn of producer crashes through ``node``'s extension table."""
    global _attached_node
    _attached_node = node


def poll_dropped() -> list[str]:
    """Unlink the pools whose producers dora reported gone; returns their names."""
    node = _attached_node
    if node is None:
        return []
    try:
        names = list(node.drain_dropped_extension_keys(EXTENSION_NS))
    except Exception:  # MockNode / older dora: no notices, the exit sweep still runs
        return []
    for name in names:
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        if _NAME.match(name):
            _unlink(name)
            mapped = _mapped.get(name)
            if mapped is not None:
                mapped.gone = True
    return names


def _open_pool(name: str) -> _MappedPool:
    mapped = _mapped.get(name)
    if mapped is not None:
        return mapped
    with _mapped_lock:
        mapped = _mapped.get(name)
        if mapped is None:
            # A new pool usually means one retired: forget closed pools nothing here uses,
            # so their pages go back to the system once the last view dies.
            for old_name, old in list(_mapped.items()):
                if old.block.closed and old.rx.held() == 0:
                    del _mapped[old_name]
            mapped = _MappedPool(name, identity())
            _mapped[name] = mapped
            node = _attached_node
            if node is not None:
                with contextlib.suppress(Exception):  # entry already dropped: producer gone
                    node.extension_load(EXTENSION_NS, name)
        return mapped


def forget_pools() -> None:
    """Drop this process's cache of mapped pools (tests); live views keep their mappings."""
    with _mapped_lock:
        _mapped.clear()


def decode_shm(
    array: Any, meta: Mapping[str, Any], writable: bool = False, verify: bool = False
) -> Any:
    """Decode a shared-memory handle message into a zero-copy, read-only-by-contract tensor.

    Parameters
    ----------
    array, meta:
        What dora delivered; ``meta`` already passed ``_schema.check_envelope``. The array
        carries nothing.
    writable:
        ``True`` returns a private copy and releases the slot at once.
    verify:
        Check ``at.checksum`` over the slot's bytes.

    Returns
    -------
    A ``numpy.ndarray`` (flagged read-only) or ``torch.Tensor`` over the pool's mapping. The
    slot stays reserved for this process until that object and every view of it are freed.

    Raises
    ------
    ShmHandleError
        Malformed handle, a pool of another dataflow or user, bounds outside the pool.
    StaleHandleError
        The pool is gone (producer exited) or the slot was reused (lease expired).
    """
    header = _schema.parse_header(meta)
    name = _schema.require(meta, KEY_POOL, str)
    slot = _non_negative(meta, KEY_SLOT)
    generation = _non_negative(meta, KEY_GENERATION)
    seq = _non_negative(meta, KEY_SEQ)
    offset = _non_negative(meta, KEY_OFFSET)
    poll_dropped()
    pool = _open_pool(name)
    nbytes = header.nbytes
    if slot >= pool.block.n_slots:
        raise ShmHandleError(f"slot {slot} outside pool {name} of {pool.block.n_slots} slots")
    if offset % header.dtype.itemsize or offset + nbytes > pool.capacity:
        raise ShmHandleError(
            f"bytes [{offset}, {offset + nbytes}) are not an aligned range inside a slot of "
            f"{pool.capacity} bytes"
        )
    pool.rx.take(slot, generation, seq)
    try:
        start = slot * pool.capacity + offset
        base = np.frombuffer(pool.payload, np.uint8, nbytes, start)
        pool.rx.hold_until_freed(base, slot, generation)
    except BaseException:
        pool.rx.release(slot, generation)
        raise
    buf = pa.py_buffer(base)
    del base
    if verify:
        _checksum.verify(meta.get(_schema.KEY_CHECKSUM), header.describe(), buf)
    return view_tensor(header, buf, writable)


def _non_negative(meta: Mapping[str, Any], key: str) -> int:
    value = _schema.require(meta, key, int)
    if value < 0 or value >= 1 << 63:
        raise ShmHandleError(f"{key!r} must be in 0..2**63-1, got {value}")
    return value


def unlink_if_present(name: str) -> None:
    """Remove a pool file by name if it still exists (idempotent)."""
    try:
        _unlink(name)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


# Transport hook ---------------------------------------------------------------------------
_routes: dict[tuple[int, str], tuple[str, str]] = {}


def route_cached(node: Any, output_id: str) -> str:
    """``route`` computed once per (node, output) and logged once."""
    key = (id(node), output_id)
    decided = _routes.get(key)
    if decided is None:
        decided = _routes[key] = route(node, output_id)
        log.info("output %r: %s transport (%s)", output_id, *decided)
    return decided[0]


def _data_address(value: Any) -> int | None:
    if isinstance(value, np.ndarray):
        return value.__array_interface__["data"][0]
    torch = __import__("sys").modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor) and value.device.type == "cpu":
        return value.data_ptr()
    return None


@functools.cache
def _default_min_bytes() -> int:
    return _config.setting("ARROW_TENSOR_SHM_MIN_BYTES", _config.size, 256 << 20)


def loaned_outputs() -> Mapping[tuple[int, str], Any]:
    """``(id(node), output_id)`` of every output with a pool in this process (may loan)."""
    return _pools


def pool_takes(
    node: Any,
    output_id: str,
    value: Any,
    min_bytes: int | None = None,
    *,
    nbytes: int | None = None,
) -> bool:
    """Whether ``value`` should go through ``output_id``'s pool (asked by the transport choice).

    A tensor loaned from this output's pool always does; another CPU tensor does when it has
    at least ``min_bytes`` (``ARROW_TENSOR_SHM_MIN_BYTES``, default 256 MiB, dora's message cap:
    below it a copy into a slot measured no faster than dora's own message, which holds no
    slot; above it the pool beats chunking, 1 GiB in 224 ms against 318 ms)
    and ``route`` picks the pool. Cheap checks come first, so small messages pay almost
    nothing for it. ``nbytes``, the value's payload size when the caller knows it already,
    spares asking torch again.
    """
    pool = _pools.get((id(node), output_id))
    if pool is not None and pool.node is node:  # something was loaned from this output
        address = _data_address(value)
        if address is None:
            return False
        if pool.owns(address):
            return route_cached(node, output_id) == "shm"
    if nbytes is None:
        if isinstance(value, np.ndarray):
            nbytes = value.nbytes
        elif _data_address(value) is not None:  # a CPU torch tensor
            nbytes = value.numel() * value.element_size()
        else:
            return False
    if nbytes == 0 or nbytes < (_default_min_bytes() if min_bytes is None else min_bytes):
        return False
    return route_cached(node, output_id) == "shm"


def send_pooled(
    node: Any,
    output_id: str,
    value: Any,
    metadata: Mapping[str, Any] | None = None,
    *,
    checksum: bool = False,
) -> bool:
    """Send ``value`` through ``output_id``'s pool; False, having sent nothing, when it is full.

    An ordinary tensor never waits for a slot: if receivers hold every slot (a batching
    consumer), the message path is as fast as a copy into a slot would be.
    """
    pool = output_pool(node, output_id)
    try:
        pool.send(value, metadata, checksum=checksum, fallback=False, wait_s=0.0)
    except PoolExhaustedError as exc:
        pool._warn_fallback(exc)
        return False
    return True


def try_send(
    node: Any,
    output_id: str,
    value: Any,
    metadata: Mapping[str, Any] | None = None,
    *,
    checksum: bool = False,
    min_bytes: int | None = None,
) -> bool:
    """``send_pooled`` if ``pool_takes`` the value; False, having sent nothing, otherwise."""
    return pool_takes(node, output_id, value, min_bytes) and send_pooled(
        node, output_id, value, metadata, checksum=checksum
    )
