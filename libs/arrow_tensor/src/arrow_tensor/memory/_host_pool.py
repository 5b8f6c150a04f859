"""The host pool: CPU tensors in shared-memory slots, loaned to the producer, sent as handles.

Note [Shared-memory pools]
Each output of a producer owns one *pool*: a block file (Note [Block files] in
``_blocks``) holding a control block followed by ``n_slots`` slots of ``capacity`` bytes
(page aligned). The producer loans a slot and fills it, or hands a tensor to ``place``,
which copies it into a free slot; either way the pool answers with a ``Handle`` (or
``None`` when every slot is held: a full pool says "no" and never sends anything). The
transport publishes the handle in a message that carries only the tensor header
(``_schema.TensorHeader``, ``at.kind = "shm"``) plus pool name, slot, generation, seq and
byte offset. A receiver opens each pool once (``_host_mapped``), checks the handle against
the pool's own header and views the slot with ``_tensor.view_tensor``; the view's base
object carries a finalizer that releases the slot (``_slots.ReceiverSlots``).

Note [Relay-safe handles]
A handle is only good for a receiver that can open the pool: a relay (dora-echo), a
recorder or a node written without arrow_tensor forwards or stores the message, and what
reaches the far end is a name it cannot open. So, unless told to trust the dataflow
descriptor, the transport sends handles only once *every* receiver of the output has
shown it can: each has opened one of the pool's files (``receivers_proven``; the control
block records it, ``_slots``). Until then the value travels in the message itself
(ordinary or chunked) and carries ``at.shm.probe``, the name of a pool file
(``probe_name``): an arrow_tensor receiver opens it while decoding the message as usual,
and the producer's next send finds it proven. No message is lost or wrong while this is
learned, and one that never proves itself (a relay) keeps getting whole messages.

A tensor larger than the current capacity makes a new pool file (next power of two); the
old one retires once its slots are free. Pages are reserved with ``posix_fallocate`` when a
slot first grows, so a full /dev/shm turns into "no" (and the message path), never SIGBUS.

Cleanup, in the order it usually happens: (1) once every receiver has mapped a pool its
name is unlinked (the mappings live on), so a crash leaves nothing behind; (2) a producer
that exits cleanly unlinks its pools, after waiting up to ``linger_s`` for receivers that
still have to map them; (3) a producer that dies: its crash notice reaches every receiver
that watched the pool, which unlinks the name; (4) at exit a receiver unlinks the pools of
dead producers it knows; (5) when a process creates its first pool it sweeps this
dataflow's block files whose pid is dead.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import config
from .._errors import ArrowTensorError, PoolExhaustedError, UnsupportedTensorError
from ..codec import _checksum, _dtypes, _schema
from ..codec._memo import Memo
from ..codec._tensor import TensorPlan
from ._blocks import (
    KIND_HOST,
    PAGE,
    Identity,
    ProducerBlock,
    header_bytes,
    notices,
    round_up,
    sweep_orphans,
)
from ._slots import Lease

log = logging.getLogger("arrow_tensor.shm")

MIN_CAPACITY = 64 << 10
LINGER_S = 2.0
"""How long a closing producer waits for receivers that have not mapped its pools yet."""
# The host pool's own owner words of the control block (after the shared ones).
W_CAPACITY, W_HEADER_BYTES = range(2)


class _Segment(ProducerBlock):
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
        control = header_bytes(n_slots, len(receivers))
        super().__init__(
            ident,
            kind=KIND_HOST,
            n_slots=n_slots,
            receivers=receivers,
            payload_bytes=n_slots * capacity,
            kind_words=(capacity, control),
            lease_s=lease_s,
            attach_grace_s=attach_grace_s,
        )
        self.capacity = capacity
        self.n_slots = n_slots
        self.payload = np.frombuffer(self.mm, np.uint8, n_slots * capacity, self.header_bytes)
        self.address = self.payload.ctypes.data
        self.loans: dict[int, Lease] = {}
        self._reserved = [0] * n_slots

    def reserve(self, slot: int, nbytes: int) -> None:
        """Make sure the first ``nbytes`` of ``slot`` are backed by pages (no SIGBUS later)."""
        if nbytes <= self._reserved[slot]:
            return
        try:
            os.posix_fallocate(self.fd, self.header_bytes + slot * self.capacity, nbytes)
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
        return np.frombuffer(memoryview(self.mm)[start : start + nbytes], np.uint8)

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


@dataclass
class Handle:
    """A tensor in a slot, ready to travel as a handle (see Note [Shared-memory pools]).

    The transport calls ``publish`` right before sending the message it returns, then
    ``sent`` once dora took it, or ``unsend`` when the send failed.
    """

    pool: OutputPool
    segment: _Segment
    lease: Lease
    header: _schema.TensorHeader
    offset: int

    def publish(self, checksum: bool = False) -> dict[str, Any]:
        """Mark the slot in flight; the message's metadata (tensor header plus handle)."""
        header, segment, lease = self.header, self.segment, self.lease
        meta = header.to_metadata()
        meta[_schema.KEY_KIND] = _schema.KIND_SHM
        if checksum:
            start = lease.slot * segment.capacity + self.offset
            meta[_schema.KEY_CHECKSUM] = _checksum.digest(
                header.describe(), segment.payload[start : start + header.nbytes]
            )
        seq = segment.slots.mark_sent(lease)
        meta[_schema.KEY_SHM_POOL] = segment.name
        meta[_schema.KEY_SHM_SLOT] = lease.slot
        meta[_schema.KEY_SHM_GENERATION] = lease.generation
        meta[_schema.KEY_SHM_SEQ] = seq
        meta[_schema.KEY_SHM_OFFSET] = self.offset
        return meta

    def sent(self) -> None:
        """dora took the message: count it; once every receiver mapped the pool, unlink it."""
        self.pool.sent += 1
        if not self.segment.unlinked and self.segment.all_mapped():
            self.segment.unlink()

    def unsend(self) -> None:
        """The send failed after ``publish``: nobody can hold the slot, reclaim it."""
        self.segment.slots.unsend(self.lease)


class OutputPool:
    """The shared-memory pool of one output of this node.

    Parameters
    ----------
    ident:
        This node's identity (``_blocks.identity()``).
    output_id:
        The output this pool serves (logs only).
    receivers:
        Node ids of the output's receivers (the transport reads them from the dataflow).
    slots:
        Slots per pool (``ARROW_TENSOR_SHM_SLOTS``, default 8): how many tensors can be
        loaned or in flight at once.
    max_bytes:
        Upper bound of one pool file (``ARROW_TENSOR_SHM_MAX_BYTES``, default 4 GiB); large
        tensors get fewer slots, never fewer than two.
    lease_s:
        How long an unread message keeps its slot (``ARROW_TENSOR_SHM_LEASE``, default 5 s).
    wait_s:
        How long ``loan`` waits for a free slot before handing out a private tensor
        (``ARROW_TENSOR_SHM_WAIT``, default 100 ms).
    linger_s:
        How long ``close`` waits for receivers that have not mapped a pool yet (2 s).

    A receiver that has not mapped the pool ``ARROW_TENSOR_SHM_ATTACH_GRACE`` (default 1 s)
    after the first send stops holding up slots until it does (see ``_slots``).
    """

    def __init__(
        self,
        ident: Identity,
        output_id: str,
        receivers: Sequence[str],
        *,
        slots: int | None = None,
        max_bytes: int | None = None,
        lease_s: float | None = None,
        wait_s: float | None = None,
        linger_s: float | None = None,
    ) -> None:
        self.ident = ident
        self.output_id = output_id
        self.receivers = list(receivers)
        get = config.setting
        self.n_slots = slots or get("ARROW_TENSOR_SHM_SLOTS", config.integer(1, 1024), 8)
        self.max_bytes = max_bytes or get("ARROW_TENSOR_SHM_MAX_BYTES", config.size, 4 << 30)
        self.lease_s = (
            lease_s if lease_s is not None else get("ARROW_TENSOR_SHM_LEASE", config.duration, 5.0)
        )
        self.wait_s = (
            wait_s if wait_s is not None else get("ARROW_TENSOR_SHM_WAIT", config.duration, 0.1)
        )
        self.attach_grace_s = get("ARROW_TENSOR_SHM_ATTACH_GRACE", config.duration, 1.0)
        self.linger_s = LINGER_S if linger_s is None else linger_s
        self._current: _Segment | None = None
        self._loaned: dict[int, tuple[Any, _Segment, Lease, _schema.TensorHeader]] = {}
        self._retired: list[_Segment] = []
        self._lock = threading.RLock()
        self._proven: set[int] = set()
        """Receivers (by index) that opened one of this pool's files."""
        self._all_proven = not self.receivers
        self._warned = False
        self.sent = 0
        """Handles sent through this pool."""
        self.declined = 0
        """Values this pool said "no" to (every slot held, /dev/shm full)."""

    # Loans ---------------------------------------------------------------------------
    def _segment_for(self, nbytes: int) -> _Segment:
        current = self._current
        if current is not None and nbytes <= current.capacity:
            return current
        capacity = max(MIN_CAPACITY, 1 << max(nbytes - 1, 1).bit_length())
        capacity = round_up(capacity, PAGE)
        n_slots = max(min(self.n_slots, 2), min(self.n_slots, self.max_bytes // capacity))
        _sweep_once(self.ident)
        segment = _Segment(
            self.ident, n_slots, capacity, self.receivers, self.lease_s, self.attach_grace_s
        )
        notices().announce(segment.name)
        if current is not None:
            self._retired.append(current)
        self._current = segment
        _producer_pools.add(self)
        return segment

    def _acquire(self, nbytes: int, wait_s: float) -> tuple[_Segment, Lease]:
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
        """An uninitialised tensor in a free slot, to fill and then send.

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
        then travels as an ordinary message.

        Raises
        ------
        UnsupportedTensorError
            For a dtype, framework or shape no receiver could view.
        """
        framework = framework_of(dtype, framework)
        entry = dtype_entry(dtype)
        shape = checked_shape(shape)
        nbytes = entry.itemsize * math.prod(shape)
        if nbytes == 0:
            return private_tensor(shape, dtype, framework)
        try:
            segment, lease = self._acquire(nbytes, self.wait_s)
        except PoolExhaustedError as exc:
            self._warn_full(exc)
            return private_tensor(shape, dtype, framework)
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

    def _as_loaned(self, value: Any) -> tuple[_Segment, Lease, _schema.TensorHeader] | None:
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

    def owns(self, address: int) -> bool:
        """True if ``address`` lies in one of this output's pool files."""
        for segment in (self._current, *self._retired):
            if segment is not None and 0 <= address - segment.address < segment.payload.size:
                return True
        return False

    # Who can open the pool (Note [Relay-safe handles]) -------------------------------
    def receivers_proven(self) -> bool:
        """True once every receiver has opened one of this pool's files."""
        if self._all_proven:
            return True
        with self._lock:
            for segment in (self._current, *self._retired):
                if segment is not None:
                    block = segment.block
                    self._proven.update(
                        r for r in range(block.n_receivers) if block.receiver_mapped(r)
                    )
            self._all_proven = len(self._proven) >= len(self.receivers)
        return self._all_proven

    def unproven_receivers(self) -> list[str]:
        """The receivers that have not opened any of this pool's files yet."""
        self.receivers_proven()
        return [r for i, r in enumerate(self.receivers) if i not in self._proven]

    def probe_name(self, nbytes: int) -> str:
        """The name of a pool file for receivers to open (one is made for ``nbytes``)."""
        with self._lock:
            return self._segment_for(max(nbytes, 1)).name

    # Placing values ------------------------------------------------------------------
    def loaned_header(self, value: Any) -> _schema.TensorHeader | None:
        """The header of ``value`` if it is a loan of this pool, as loaned (no planning)."""
        found = self._as_loaned(value)
        return None if found is None else found[2]

    def place_loan(self, value: Any) -> Handle | None:
        """A loan of this pool, ready to send as it lies; None if ``value`` is no loan."""
        with self._lock:
            found = self._as_loaned(value)
            return None if found is None else Handle(self, *found, 0)

    def place(self, value: Any, plan: TensorPlan, wait_s: float = 0.0) -> Handle | None:
        """``value`` in a slot, ready to send as a handle; None ("no") when the pool is full.

        A tensor from ``loan`` is already in its slot (no copy); a view into a loaned slot
        is found there too; any other tensor is compacted once into a free slot, waiting at
        most ``wait_s`` for one (an ordinary tensor should not wait: the message path is
        as fast as a copy into a slot would be).
        """
        with self._lock:
            loaned = self._as_loaned(value)
            if loaned is not None:
                segment, lease, header = loaned
                return Handle(self, segment, lease, header, 0)
            header, nbytes = plan.header, plan.nbytes
            if nbytes == 0:
                return None
            if not plan.needs_copy:
                address = plan.source.__array_interface__["data"][0]
                for segment in (self._current, *self._retired):
                    lease = None if segment is None else segment.locate(address, nbytes)
                    if segment is not None and lease is not None:
                        offset = address - segment.address - lease.slot * segment.capacity
                        return Handle(self, segment, lease, header, offset)
            try:
                segment, lease = self._acquire(nbytes, wait_s)
            except PoolExhaustedError as exc:
                self._warn_full(exc)
                return None
            plan.write_into(segment.slot_memory(lease.slot, nbytes))
            return Handle(self, segment, lease, header, 0)

    def _warn_full(self, exc: Exception) -> None:
        self.declined += 1
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
                notices().retire(segment.name)

    def busy(self) -> int:
        """Slots of this output that are loaned or in flight."""
        with self._lock:
            segments = [s for s in (self._current, *self._retired) if s is not None]
            return sum(s.slots.busy() for s in segments)

    def segment_names(self) -> list[str]:
        """Names of this output's pool files (current and retiring)."""
        return [s.name for s in (self._current, *self._retired) if s is not None]

    def close(self) -> None:
        """Unlink every pool file, first waiting up to ``linger_s`` for receivers to map.

        Only handles in flight are waited for: a loan never sent, or a pool only probed
        (Note [Relay-safe handles]), needs nobody to map it.
        """
        with self._lock:
            segments = [s for s in (self._current, *self._retired) if s is not None]
            deadline = time.monotonic() + self.linger_s
            for segment in segments:
                while not segment.all_mapped() and segment.slots.in_flight():
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.01)
                segment.close()
            self._current = None
            self._retired = []
        _producer_pools.discard(self)


# Tensors over slots, and their private stand-ins ------------------------------------------
def framework_of(dtype: Any, framework: str | None) -> str:
    """The framework a loan is made in: ``framework`` if given, else torch for a torch dtype."""
    if framework is not None:
        if framework not in ("numpy", "torch"):  # host memory: what receivers can view
            raise UnsupportedTensorError(
                f"framework must be 'numpy' or 'torch' (host memory), got {framework!r}"
            )
        return framework
    return "torch" if type(dtype).__module__ == "torch" else "numpy"


def checked_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` as plain ints, refused unless at most 64 non-negative dimensions."""
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise UnsupportedTensorError(
            f"shape must be a sequence of ints, got {shape!r:.80}"
        ) from None
    if len(dims) > _schema.MAX_NDIM or any(d < 0 for d in dims):
        raise UnsupportedTensorError(
            f"shape must have at most {_schema.MAX_NDIM} non-negative dimensions, "
            f"got {list(dims)[:80]}"
        )
    return dims


def private_tensor(shape: Sequence[int], dtype: Any, framework: str | None = None) -> Any:
    """An ordinary writable tensor, for when the pool cannot be used."""
    entry = dtype_entry(dtype)
    dims = checked_shape(shape)
    memory = np.empty(entry.itemsize * math.prod(dims), np.uint8)
    return _as_tensor(memory, entry, dims, framework_of(dtype, framework))


def dtype_entry(dtype: Any) -> _dtypes.DType:
    """The wire dtype of a numpy dtype, a torch dtype or a wire dtype name."""
    try:
        entry = _DTYPE_ENTRIES.get(dtype)
        if entry is None:
            entry = _DTYPE_ENTRIES.remember(dtype, _dtype_entry(dtype))
        return entry
    except ArrowTensorError:  # a dtype without a wire form: its own message
        raise
    except TypeError:  # unhashable, or numpy cannot read it: not a dtype
        raise UnsupportedTensorError(
            f"dtype must be a numpy dtype, a torch dtype or a wire dtype name, got {dtype!r:.80}"
        ) from None


_DTYPE_ENTRIES: Memo[Any, _dtypes.DType] = Memo(256)


def _dtype_entry(dtype: Any) -> _dtypes.DType:
    if isinstance(dtype, str) and dtype in _dtypes.BY_NAME:
        return _dtypes.BY_NAME[dtype]
    if type(dtype).__module__ == "torch":
        return _dtypes.from_torch(dtype)
    return _dtypes.from_numpy(np.dtype(dtype))


def _as_tensor(
    memory: np.ndarray, entry: _dtypes.DType, shape: tuple[int, ...], framework: str
) -> Any:
    if framework == "torch":
        import torch

        if memory.size == 0:
            return torch.empty(shape, dtype=_dtypes.torch_dtype(entry))
        return torch.from_numpy(memory).view(_dtypes.torch_dtype(entry)).view(shape)
    np_dtype = entry.numpy_dtype
    if np_dtype is None:
        raise UnsupportedTensorError(
            f"dtype {entry.name!r} has no numpy form; loan it with framework='torch'"
        )
    return memory.view(np_dtype).reshape(shape)


# Exit -------------------------------------------------------------------------------------
_producer_pools: weakref.WeakSet[OutputPool] = weakref.WeakSet()
_swept: set[str] = set()


def _sweep_once(ident: Identity) -> None:
    if ident.dataflow_hex in _swept:
        return
    _swept.add(ident.dataflow_hex)
    removed = sweep_orphans(ident)
    if removed:
        log.info("removed %d orphaned block file(s) of dead producers: %s", len(removed), removed)


def close_pools() -> None:
    """Close this process's pools (producer side): their files are unlinked."""
    for pool in list(_producer_pools):
        with contextlib.suppress(Exception):
            pool.close()


atexit.register(close_pools)
