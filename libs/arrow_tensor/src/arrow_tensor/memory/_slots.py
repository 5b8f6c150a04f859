"""Slot and lifetime machinery shared by every kind of loaned memory (host pools, CUDA buffers).

Interface (for the host pools in ``_host_pool`` and the CUDA in-flight tables alike)
-----------------------------------------------------------------------------------
A *control block* is a small array of 64-bit words in memory that every process of the
dataflow on this machine maps (a block file, see Note [Block files] in ``_blocks``). It
describes a bounded set of ``n_slots`` slots and the ``n_receivers`` receivers (dora nodes,
identified by ``receiver_key(node_id)``) that may hold views of them. What a slot *is* (bytes
of the same segment, a CUDA allocation whose IPC handle the owner keeps beside the table) is
not this module's business: the owner maps slot index -> memory.

Producer (the one process that writes the payload memory)::

    block = ControlBlock.create(buf, n_slots, receiver_keys, owner_words=(...))
    slots = ProducerSlots(block, lease_s=5.0)
    lease = slots.acquire(timeout_s)   # -> Lease(slot, generation) or PoolExhaustedError
    ...fill the memory of lease.slot...
    seq = slots.mark_sent(lease)       # put slot, generation and seq in the message
    slots.cancel(lease)                # a loan dropped without being sent
    slots.busy()                       # slots loaned or in flight

Receiver (any number of processes, one ``receiver`` index each)::

    block = ControlBlock.attach(buf)   # validates the layout; raises ShmHandleError
    rx = ReceiverSlots(block, block.receiver_index(receiver_key(my_node_id)))
    rx.take(slot, generation, seq)     # StaleHandleError if the slot was reclaimed
    rx.hold_until_freed(obj, slot, generation)  # release when ``obj`` is garbage collected
    # (or rx.release(slot, generation) explicitly, once per take)

Note [Lifetimes without atomic read-modify-write]
Python has no portable atomic add on shared memory, so no cell is ever written by two
processes: the producer writes each slot's ``generation`` and ``seq``; receiver ``r`` alone
writes its row (``pid``, ``max_seq``) and, per slot, ``taken[slot][r]`` and
``released[slot][r]``, each set to the generation it refers to. Aligned 8-byte loads and
stores are single instructions on x86-64 and aarch64, so a reader never sees half a word.
Counting the views one process holds is process-local (``ReceiverSlots``); only the
transition "first view taken" / "last view freed" reaches shared memory.

A slot in flight with generation ``g`` may be reused once, for every receiver ``r``:
``released[r] == g`` (it read and freed its views); or ``r`` is dead (pid gone); or ``r``
never took it and either the lease ran out (``lease_s`` after sending: the message was
dropped, or sits unread in a queue longer than the lease) or ``r`` already took a later
message ``overtake_s`` ago (dora delivers in order, so the earlier one was dropped), or ``r`` has
not attached at all ``attach_grace_s`` after the first send (it ignores this output).
Reclaiming an untaken slot is two-phase because a receiver may be taking it right now: the
producer first invalidates the slot (``generation := 0``), and reuses it only if, after
``fence_s``, no receiver has taken ``g``. A receiver writes ``taken := g`` *before* reading
the generation; if it reads 0 it releases and raises ``StaleHandleError``. The grace between
the producer's two reads is many orders of magnitude longer than a store buffer takes to
drain, which stands in for the memory fence Python cannot issue.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._errors import PoolExhaustedError, ShmHandleError, StaleHandleError

__all__ = [
    "ControlBlock",
    "Lease",
    "ProducerSlots",
    "ReceiverSlots",
    "pid_alive",
    "receiver_key",
]

MAGIC = 0x314B4C4253544140  # b"@ATSBLK1" little-endian
LAYOUT_VERSION = 1
MAX_SLOTS = 1024
MAX_RECEIVERS = 256
N_OWNER_WORDS = 16

# Header words.
_W_MAGIC, _W_VERSION, _W_SLOTS, _W_RECEIVERS, _W_PRODUCER_PID, _W_CLOSED = range(6)
_HEADER_WORDS = 16
_RX_WORDS = 4  # key, pid, mapped, max_seq
_SLOT_WORDS = 2  # generation, seq
_CELL_WORDS = 2  # taken, released

_FREE, _LOANED, _IN_FLIGHT, _RECLAIMING = range(4)


def receiver_key(node_id: str) -> int:
    """A non-zero 63-bit key naming a receiver node in a control block."""
    digest = hashlib.blake2b(node_id.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 1) or 1


def pid_alive(pid: int) -> bool:
    """True unless no process ``pid`` exists (same-machine liveness of a peer; cheap: one
    syscall, for the slot bookkeeping that asks often). A zombie counts as alive here."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_running(pid: int) -> bool:
    """True while process ``pid`` exists and has not exited.

    A zombie (exited, not yet reaped by its parent) still answers ``kill(pid, 0)``; on
    Linux its state in ``/proc/<pid>/stat`` says so. Asked where a wrong answer would
    mislabel an error (a producer that is gone), not on the bookkeeping's hot paths.
    """
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # no /proc (not Linux), or it just went away
        return os.path.exists(f"/proc/{pid}") or not os.path.isdir("/proc")
    # The state follows the parenthesized command name, which may itself hold ")".
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def block_words(n_slots: int, n_receivers: int) -> int:
    """Size of a control block in 64-bit words."""
    return (
        _HEADER_WORDS
        + N_OWNER_WORDS
        + n_receivers * _RX_WORDS
        + n_slots * _SLOT_WORDS
        + n_slots * n_receivers * _CELL_WORDS
    )


class ControlBlock:
    """Typed access to the words of one control block (see the module docstring).

    Use ``create`` (producer) or ``attach`` (receiver); ``buf`` is any writable buffer of at
    least ``8 * block_words(...)`` bytes, 8-byte aligned (an mmap is page aligned).
    """

    def __init__(self, words: memoryview) -> None:
        self._w = words
        self.n_slots = words[_W_SLOTS]
        self.n_receivers = words[_W_RECEIVERS]
        self._rx0 = _HEADER_WORDS + N_OWNER_WORDS
        self._slot0 = self._rx0 + self.n_receivers * _RX_WORDS
        self._cell0 = self._slot0 + self.n_slots * _SLOT_WORDS

    @classmethod
    def create(
        cls,
        buf: Any,
        n_slots: int,
        receiver_keys: Sequence[int],
        owner_words: Sequence[int] = (),
        producer_pid: int | None = None,
    ) -> ControlBlock:
        """Initialise a fresh block in ``buf`` for ``n_slots`` slots and the given receivers."""
        if not 1 <= n_slots <= MAX_SLOTS:
            raise ValueError(f"n_slots must be in 1..{MAX_SLOTS}, got {n_slots}")
        if len(receiver_keys) > MAX_RECEIVERS:
            raise ValueError(f"at most {MAX_RECEIVERS} receivers, got {len(receiver_keys)}")
        if len(owner_words) > N_OWNER_WORDS:
            raise ValueError(f"at most {N_OWNER_WORDS} owner words, got {len(owner_words)}")
        n = block_words(n_slots, len(receiver_keys))
        words = memoryview(buf).cast("B")[: 8 * n].cast("Q")
        if len(words) < n:
            raise ValueError(f"control block needs {8 * n} bytes, buffer has {8 * len(words)}")
        for i in range(n):
            words[i] = 0
        words[_W_VERSION] = LAYOUT_VERSION
        words[_W_SLOTS] = n_slots
        words[_W_RECEIVERS] = len(receiver_keys)
        words[_W_PRODUCER_PID] = os.getpid() if producer_pid is None else producer_pid
        for i, value in enumerate(owner_words):
            words[_HEADER_WORDS + i] = value
        block = cls(words)
        for r, key in enumerate(receiver_keys):
            words[block._rx0 + r * _RX_WORDS] = key
        words[_W_MAGIC] = MAGIC  # last: a half-initialised block never validates
        return block

    @classmethod
    def attach(cls, buf: Any) -> ControlBlock:
        """Validate and wrap an existing block; ``ShmHandleError`` if it is not one."""
        raw = memoryview(buf).cast("B")
        if len(raw) < 8 * _HEADER_WORDS:
            raise ShmHandleError(f"control block of {len(raw)} bytes is too small")
        head = raw[: 8 * _HEADER_WORDS].cast("Q")
        if head[_W_MAGIC] != MAGIC or head[_W_VERSION] != LAYOUT_VERSION:
            raise ShmHandleError(
                f"not an arrow_tensor control block of layout {LAYOUT_VERSION} "
                f"(magic {head[_W_MAGIC]:#x}, layout {head[_W_VERSION]})"
            )
        n_slots, n_rx = head[_W_SLOTS], head[_W_RECEIVERS]
        if not 1 <= n_slots <= MAX_SLOTS or n_rx > MAX_RECEIVERS:
            raise ShmHandleError(f"control block claims {n_slots} slots and {n_rx} receivers")
        n = block_words(n_slots, n_rx)
        if len(raw) < 8 * n:
            raise ShmHandleError(f"control block needs {8 * n} bytes, segment has {len(raw)}")
        return cls(raw[: 8 * n].cast("Q"))

    # Header ---------------------------------------------------------------------------
    @property
    def producer_pid(self) -> int:
        """Pid of the process that created the block."""
        return self._w[_W_PRODUCER_PID]

    @property
    def closed(self) -> bool:
        """Set by the producer when it shuts down cleanly."""
        return bool(self._w[_W_CLOSED])

    def set_closed(self) -> None:
        """Producer only: announce a clean shutdown."""
        self._w[_W_CLOSED] = 1

    def owner_word(self, i: int) -> int:
        """Word ``i`` of the owner area (what the memory kind stores: capacity, ids...)."""
        return self._w[_HEADER_WORDS + i]

    # Receivers ------------------------------------------------------------------------
    def receiver_index(self, key: int) -> int | None:
        """Index of the receiver with ``key``, or None if it is not a receiver of this block."""
        for r in range(self.n_receivers):
            if self._w[self._rx0 + r * _RX_WORDS] == key:
                return r
        return None

    def _rx(self, r: int, field: int) -> int:
        return self._w[self._rx0 + r * _RX_WORDS + field]

    def _set_rx(self, r: int, field: int, value: int) -> None:
        self._w[self._rx0 + r * _RX_WORDS + field] = value

    def receiver_pid(self, r: int) -> int:
        """Pid receiver ``r`` registered (0 until it attaches)."""
        return self._rx(r, 1)

    def receiver_mapped(self, r: int) -> bool:
        """True once receiver ``r`` has attached (mapped) this block."""
        return bool(self._rx(r, 2))

    def receiver_max_seq(self, r: int) -> int:
        """Highest message ``seq`` receiver ``r`` has taken."""
        return self._rx(r, 3)

    # Slots and cells ------------------------------------------------------------------
    def generation(self, slot: int) -> int:
        """Current generation of ``slot`` (0: invalid, being reclaimed or never used)."""
        return self._w[self._slot0 + slot * _SLOT_WORDS]

    def _set_slot(self, slot: int, generation: int, seq: int) -> None:
        base = self._slot0 + slot * _SLOT_WORDS
        self._w[base + 1] = seq
        self._w[base] = generation

    def slot_seq(self, slot: int) -> int:
        """``seq`` of the message that last published ``slot`` (0 while not published)."""
        return self._w[self._slot0 + slot * _SLOT_WORDS + 1]

    def _cell(self, slot: int, r: int) -> int:
        return self._cell0 + (slot * self.n_receivers + r) * _CELL_WORDS

    def taken(self, slot: int, r: int) -> int:
        """Generation of ``slot`` receiver ``r`` last took."""
        return self._w[self._cell(slot, r)]

    def released(self, slot: int, r: int) -> int:
        """Generation of ``slot`` receiver ``r`` last released."""
        return self._w[self._cell(slot, r) + 1]


@dataclass(frozen=True)
class Lease:
    """A slot handed to the producer: its index and the generation messages will name."""

    slot: int
    generation: int


@dataclass
class _SlotState:
    state: int = _FREE
    generation: int = 0
    seq: int = 0
    sent_at: float = 0.0
    reclaim_at: float = 0.0


class ProducerSlots:
    """The producer's view of a control block: allocation, leases and reclamation.

    Parameters
    ----------
    block:
        A block this process created with ``ControlBlock.create``.
    lease_s:
        How long a sent slot waits for a receiver that has not taken it before it is
        presumed dropped (see Note [Lifetimes without atomic read-modify-write]).
    overtake_s:
        How long after a receiver took a *later* message an untaken slot is presumed
        dropped for that receiver.
    fence_s:
        Grace between invalidating an untaken slot and reusing it.
    attach_grace_s:
        A receiver that has not attached to the block this long after the first send
        (a node that subscribes but never decodes, or is still starting) stops holding
        up untaken slots; once it attaches it counts like the others.
    clock:
        Monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        block: ControlBlock,
        lease_s: float = 5.0,
        overtake_s: float = 0.05,
        fence_s: float = 0.002,
        attach_grace_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.block = block
        self.attach_grace_s = attach_grace_s
        self._first_sent_at = math.inf
        self.lease_s = lease_s
        self.overtake_s = overtake_s
        self.fence_s = fence_s
        self._clock = clock
        self._slots = [_SlotState() for _ in range(block.n_slots)]
        self._next_generation = 1
        self._next_seq = 1
        self._lock = threading.RLock()
        self._overtaken_at: dict[tuple[int, int], float] = {}

    def acquire(self, timeout_s: float = 0.0) -> Lease:
        """A free slot, waiting up to ``timeout_s`` for one; else ``PoolExhaustedError``."""
        deadline = self._clock() + timeout_s
        pause = 0.0002
        while True:
            lease = self.try_acquire()
            if lease is not None:
                return lease
            if self._clock() >= deadline:
                raise PoolExhaustedError(
                    f"all {self.block.n_slots} slots are loaned or held by receivers after "
                    f"waiting {timeout_s:g} s ({self.describe()})"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def try_acquire(self) -> Lease | None:
        """A free slot now, or None."""
        with self._lock:
            # Lowest free slot first: the pages of a recently used slot are warm and the
            # pool's resident memory stays as small as the traffic allows.
            for slot in range(len(self._slots)):
                if self._is_free(slot):
                    state = self._slots[slot]
                    state.state = _LOANED
                    state.generation = self._next_generation
                    self._next_generation += 1
                    # The generation becomes visible only when the slot is sent.
                    self.block._set_slot(slot, 0, 0)
                    return Lease(slot, state.generation)
            return None

    def mark_sent(self, lease: Lease) -> int:
        """Publish ``lease`` as in flight; returns the ``seq`` the message must carry."""
        with self._lock:
            state = self._check(lease, _LOANED)
            state.state = _IN_FLIGHT
            state.seq = self._next_seq
            self._next_seq += 1
            state.sent_at = self._clock()
            self._first_sent_at = min(self._first_sent_at, state.sent_at)
            self.block._set_slot(lease.slot, lease.generation, state.seq)
            return state.seq

    def cancel(self, lease: Lease) -> None:
        """Return a loaned, never-sent slot (e.g. the loaned tensor was garbage collected)."""
        with self._lock:
            state = self._slots[lease.slot]
            if state.state == _LOANED and state.generation == lease.generation:
                state.state = _FREE

    def unsend(self, lease: Lease) -> None:
        """Undo ``mark_sent`` when the send itself failed: nobody can hold the slot."""
        with self._lock:
            state = self._check(lease, _IN_FLIGHT)
            self.block._set_slot(lease.slot, 0, 0)
            state.state = _RECLAIMING
            state.reclaim_at = self._clock()

    def state_of(self, slot: int) -> tuple[str, int]:
        """(state name, generation) of ``slot``, for diagnostics and tests."""
        state = self._slots[slot]
        return ("free", "loaned", "in_flight", "reclaiming")[state.state], state.generation

    def is_loaned(self, lease: Lease) -> bool:
        """True while ``lease`` is loaned and not yet sent."""
        state = self._slots[lease.slot]
        return state.state == _LOANED and state.generation == lease.generation

    def busy(self) -> int:
        """Number of slots that cannot be handed out right now."""
        with self._lock:
            return sum(not self._is_free(s) for s in range(len(self._slots)))

    def in_flight(self) -> int:
        """Number of slots sent as handles and not yet free again (loans not counted)."""
        with self._lock:
            return sum(
                state.state != _LOANED and not self._is_free(s)
                for s, state in enumerate(self._slots)
            )

    def describe(self) -> str:
        """One line: how many slots are in which state."""
        names = ("free", "loaned", "in flight", "reclaiming")
        counts = [0, 0, 0, 0]
        for state in self._slots:
            counts[state.state] += 1
        return ", ".join(f"{c} {name}" for c, name in zip(counts, names, strict=True) if c)

    def _check(self, lease: Lease, expected: int) -> _SlotState:
        state = self._slots[lease.slot]
        if state.state != expected or state.generation != lease.generation:
            raise StaleHandleError(
                f"slot {lease.slot} generation {lease.generation} is not "
                f"{('free', 'loaned', 'in flight', 'reclaiming')[expected]} "
                f"(it is {self.state_of(lease.slot)}); a loan can be sent once"
            )
        return state

    def _is_free(self, slot: int) -> bool:
        state = self._slots[slot]
        if state.state == _FREE:
            return True
        if state.state == _LOANED:
            return False
        now = self._clock()
        block, g = self.block, state.generation
        pending = untaken = False
        for r in range(block.n_receivers):
            if block.released(slot, r) == g:
                continue
            pid = block.receiver_pid(r)
            if pid and not pid_alive(pid):
                continue  # a dead receiver holds nothing
            if block.taken(slot, r) == g:
                pending = True  # held: only its release frees it
                continue
            if state.state == _RECLAIMING:
                continue  # generation already invalidated: a late take fails
            if (
                now - state.sent_at >= self.lease_s
                or self._overtaken(slot, r, state, now)
                or (not pid and now - self._first_sent_at >= self.attach_grace_s)
            ):
                untaken = True
                continue
            pending = True
        if pending:
            return False
        if state.state == _IN_FLIGHT and untaken:
            block._set_slot(slot, 0, 0)
            state.state = _RECLAIMING
            state.reclaim_at = now
            return False
        if state.state == _RECLAIMING and now - state.reclaim_at < self.fence_s:
            return False
        state.state = _FREE
        for r in range(block.n_receivers):
            self._overtaken_at.pop((slot, r), None)
        return True

    def _overtaken(self, slot: int, r: int, state: _SlotState, now: float) -> bool:
        if self.block.receiver_max_seq(r) <= state.seq:
            return False
        first_seen = self._overtaken_at.setdefault((slot, r), now)
        return now - first_seen >= self.overtake_s


class ReceiverSlots:
    """One receiver process's takes and releases on a control block.

    Views are counted per (slot, generation) inside this process; the shared cells change
    only on the first take and the last release, so any number of tensors (and threads)
    can share a slot.
    """

    def __init__(self, block: ControlBlock, receiver: int, pid: int | None = None) -> None:
        if not 0 <= receiver < block.n_receivers:
            raise ShmHandleError(f"receiver index {receiver} outside 0..{block.n_receivers - 1}")
        self.block = block
        self.receiver = receiver
        self._counts: dict[tuple[int, int], int] = {}
        self._lock = threading.RLock()
        block._set_rx(receiver, 1, os.getpid() if pid is None else pid)
        block._set_rx(receiver, 2, 1)

    def take(self, slot: int, generation: int, seq: int) -> None:
        """Count one more view of ``slot`` at ``generation``; StaleHandleError if reclaimed."""
        block, r = self.block, self.receiver
        if not 0 <= slot < block.n_slots:
            raise ShmHandleError(f"slot {slot} outside 0..{block.n_slots - 1}")
        if generation <= 0:
            raise ShmHandleError(f"generation must be positive, got {generation}")
        with self._lock:
            key = (slot, generation)
            count = self._counts.get(key, 0)
            if count == 0:
                # Check before writing anything: a forged handle must not touch the cells
                # of a generation this receiver really holds.
                self._check_current(slot, generation)
                if block.slot_seq(slot) != seq:
                    self._check_current(slot, generation)
                    raise ShmHandleError(
                        f"seq {seq} does not match slot {slot} generation {generation} "
                        f"(expected {block.slot_seq(slot)}): a forged or corrupted handle"
                    )
                cell = block._cell(slot, r)
                block._w[cell] = generation  # taken: before reading the generation again
                if block.generation(slot) != generation:
                    block._w[cell + 1] = generation
                    self._check_current(slot, generation)
                if seq > block.receiver_max_seq(r):
                    block._set_rx(r, 3, seq)
            self._counts[key] = count + 1

    def _check_current(self, slot: int, generation: int) -> None:
        current = self.block.generation(slot)
        if current != generation:
            raise StaleHandleError(
                f"slot {slot} no longer holds generation {generation} (it holds {current}): "
                f"the message was read after its lease expired or after a later message, "
                f"and the slot was reused"
            )

    def release(self, slot: int, generation: int) -> None:
        """Forget one view; the last one tells the producer the slot is free for us."""
        with self._lock:
            key = (slot, generation)
            count = self._counts.get(key, 0)
            if count <= 0:
                return
            if count == 1:
                del self._counts[key]
                self.block._w[self.block._cell(slot, self.receiver) + 1] = generation
            else:
                self._counts[key] = count - 1

    def hold_until_freed(self, obj: object, slot: int, generation: int) -> None:
        """Release one take of ``slot`` when ``obj`` (the base of the views) is collected."""
        weakref.finalize(obj, self.release, slot, generation)

    def held(self) -> int:
        """Number of (slot, generation) pairs this process still holds."""
        with self._lock:
            return len(self._counts)
