"""The memory-agnostic slot machinery: reference counts, reuse, reclamation, exhaustion."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
from arrow_tensor import PoolExhaustedError, ShmHandleError, StaleHandleError
from arrow_tensor.memory._slots import (
    ControlBlock,
    ProducerSlots,
    ReceiverSlots,
    block_words,
    receiver_key,
)
from hypothesis import given, settings
from hypothesis import strategies as st

LEASE, OVERTAKE, FENCE = 5.0, 0.05, 0.002


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(n_slots: int = 2, n_rx: int = 2) -> tuple[ProducerSlots, list[ReceiverSlots], FakeClock]:
    buf = bytearray(8 * block_words(n_slots, n_rx))
    keys = [receiver_key(f"rx{r}") for r in range(n_rx)]
    block = ControlBlock.create(buf, n_slots, keys)
    clock = FakeClock()
    producer = ProducerSlots(block, lease_s=LEASE, overtake_s=OVERTAKE, fence_s=FENCE, clock=clock)
    attached = ControlBlock.attach(buf)
    receivers = [ReceiverSlots(attached, attached.receiver_index(k)) for k in keys]
    return producer, receivers, clock


def send(producer: ProducerSlots) -> tuple[int, int, int]:
    lease = producer.acquire()
    seq = producer.mark_sent(lease)
    return lease.slot, lease.generation, seq


def test_slot_is_reused_only_after_every_receiver_released() -> None:
    producer, (rx0, rx1), _ = make(n_slots=1)
    slot, gen, seq = send(producer)
    rx0.take(slot, gen, seq)
    rx1.take(slot, gen, seq)
    rx0.release(slot, gen)
    assert producer.try_acquire() is None
    rx1.release(slot, gen)
    lease = producer.try_acquire()
    assert lease is not None
    assert (lease.slot, lease.generation) == (slot, gen + 1)


def test_views_in_one_process_are_counted() -> None:
    producer, (rx0, rx1), _ = make(n_slots=1)
    slot, gen, seq = send(producer)
    rx1.take(slot, gen, seq)
    rx1.release(slot, gen)
    rx0.take(slot, gen, seq)
    rx0.take(slot, gen, seq)
    rx0.release(slot, gen)
    assert producer.try_acquire() is None
    assert rx0.held() == 1
    rx0.release(slot, gen)
    assert rx0.held() == 0
    assert producer.try_acquire() is not None


def test_release_when_the_view_owner_is_garbage_collected() -> None:
    producer, [rx], _ = make(n_slots=1, n_rx=1)
    slot, gen, seq = send(producer)

    class Owner:
        pass

    owner = Owner()
    rx.take(slot, gen, seq)
    rx.hold_until_freed(owner, slot, gen)
    assert producer.try_acquire() is None
    del owner
    gc.collect()
    assert producer.try_acquire() is not None


def test_dropped_message_is_reclaimed_after_the_lease() -> None:
    producer, _, clock = make(n_slots=1)
    send(producer)
    clock.advance(LEASE - 0.01)
    assert producer.try_acquire() is None
    clock.advance(0.02)
    assert producer.try_acquire() is None  # first invalidated...
    assert producer.state_of(0)[0] == "reclaiming"
    clock.advance(1.5 * FENCE)
    assert producer.try_acquire() is not None  # ...then reused after the fence


def test_message_overtaken_by_a_later_one_is_reclaimed_quickly() -> None:
    producer, (rx0, rx1), clock = make(n_slots=2)
    dropped = send(producer)
    slot, gen, seq = send(producer)
    for rx in (rx0, rx1):
        rx.take(slot, gen, seq)
        rx.release(slot, gen)
    assert producer.try_acquire() is not None  # the released slot
    assert producer.try_acquire() is None  # the dropped one: overtaken, grace running
    clock.advance(1.5 * OVERTAKE)
    assert producer.try_acquire() is None
    clock.advance(1.5 * FENCE)
    lease = producer.try_acquire()
    assert lease is not None
    assert lease.slot == dropped[0]


def test_late_take_after_reclamation_is_a_clear_error_and_holds_nothing() -> None:
    producer, (rx0, _), clock = make(n_slots=1)
    slot, gen, seq = send(producer)
    clock.advance(LEASE)
    assert producer.try_acquire() is None  # invalidated
    with pytest.raises(StaleHandleError, match=f"no longer holds generation {gen}"):
        rx0.take(slot, gen, seq)
    assert rx0.held() == 0
    clock.advance(1.5 * FENCE)
    assert producer.try_acquire() is not None


def test_take_racing_the_invalidation_keeps_the_slot() -> None:
    # A receiver took the slot just before the producer invalidated it (it read the old
    # generation): the producer's second look sees the take and waits for the release.
    producer, (rx0, rx1), clock = make(n_slots=1)
    slot, gen, seq = send(producer)
    rx1.take(slot, gen, seq)
    rx1.release(slot, gen)
    clock.advance(LEASE)
    assert producer.try_acquire() is None  # rx0 untaken: invalidate
    rx0.block._w[rx0.block._cell(slot, 0)] = gen  # the take that raced the invalidation
    clock.advance(1.5 * FENCE)
    assert producer.try_acquire() is None
    rx0.block._w[rx0.block._cell(slot, 0) + 1] = gen
    assert producer.try_acquire() is not None


def test_dead_receiver_holds_nothing() -> None:
    buf = bytearray(8 * block_words(1, 2))
    block = ControlBlock.create(buf, 1, [receiver_key("a"), receiver_key("b")])
    producer = ProducerSlots(block)
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(done.stdout)
    alive = ReceiverSlots(block, 0)
    dead = ReceiverSlots(block, 1, pid=dead_pid)
    slot, gen, seq = send(producer)
    alive.take(slot, gen, seq)
    dead.take(slot, gen, seq)
    alive.release(slot, gen)
    assert producer.try_acquire() is not None


def test_receiver_that_never_attaches_stops_holding_slots_after_the_grace() -> None:
    buf = bytearray(8 * block_words(1, 2))
    block = ControlBlock.create(buf, 1, [receiver_key("a"), receiver_key("ignores-us")])
    clock = FakeClock()
    producer = ProducerSlots(block, lease_s=LEASE, fence_s=FENCE, attach_grace_s=1.0, clock=clock)
    rx = ReceiverSlots(block, 0)
    slot, gen, seq = send(producer)
    rx.take(slot, gen, seq)
    rx.release(slot, gen)
    assert producer.try_acquire() is None
    clock.advance(1.0)
    assert producer.try_acquire() is None  # invalidated...
    clock.advance(1.5 * FENCE)
    lease = producer.try_acquire()  # ...and reused without waiting for the lease
    assert lease is not None
    producer.mark_sent(lease)
    late = ReceiverSlots(block, 1)  # it attaches after all: from now on it counts
    late.take(lease.slot, lease.generation, block.slot_seq(lease.slot))
    rx.take(lease.slot, lease.generation, block.slot_seq(lease.slot))
    rx.release(lease.slot, lease.generation)
    clock.advance(2 * LEASE)
    assert producer.try_acquire() is None
    late.release(lease.slot, lease.generation)
    assert producer.try_acquire() is not None


def test_exhaustion_waits_then_raises_with_the_slot_states() -> None:
    producer, _, _ = make(n_slots=2)
    producer.acquire()
    send(producer)
    with pytest.raises(PoolExhaustedError, match=r"all 2 slots .* \(1 loaned, 1 in flight\)"):
        producer.acquire(timeout_s=0.0)


def test_cancelled_loan_is_free_again_and_cannot_be_sent() -> None:
    producer, _, _ = make(n_slots=1)
    lease = producer.acquire()
    producer.cancel(lease)
    assert producer.busy() == 0
    with pytest.raises(StaleHandleError, match="a loan can be sent once"):
        producer.mark_sent(lease)


def test_a_loan_is_sent_once() -> None:
    producer, _, _ = make(n_slots=1)
    lease = producer.acquire()
    producer.mark_sent(lease)
    with pytest.raises(StaleHandleError):
        producer.mark_sent(lease)


def test_failed_send_frees_the_slot_after_the_fence() -> None:
    producer, _, clock = make(n_slots=1)
    lease = producer.acquire()
    producer.mark_sent(lease)
    producer.unsend(lease)
    assert producer.try_acquire() is None
    clock.advance(1.5 * FENCE)
    assert producer.try_acquire() is not None


def test_generation_is_invisible_until_sent() -> None:
    producer, (rx0, _), _ = make(n_slots=1)
    lease = producer.acquire()
    with pytest.raises(StaleHandleError):
        rx0.take(lease.slot, lease.generation, 1)


@pytest.mark.parametrize(
    ("slot", "generation", "error"),
    [
        (2, 1, ShmHandleError),
        (-1, 1, ShmHandleError),
        (0, 0, ShmHandleError),
        (0, 99, StaleHandleError),
    ],
)
def test_hostile_take(slot: int, generation: int, error: type[Exception]) -> None:
    producer, (rx0, _), _ = make(n_slots=2)
    send(producer)
    with pytest.raises(error):
        rx0.take(slot, generation, 1)


def test_forged_handles_cannot_release_a_real_hold() -> None:
    producer, (rx0, rx1), _ = make(n_slots=1)
    slot, gen, seq = send(producer)
    rx0.take(slot, gen, seq)
    rx1.take(slot, gen, seq)
    rx1.release(slot, gen)
    with pytest.raises(StaleHandleError):
        rx0.take(slot, gen + 5, seq)  # another generation of the held slot
    with pytest.raises(ShmHandleError, match="forged"):
        rx1.take(slot, gen, seq + 1000)  # a replayed handle with a poisoned seq
    assert rx1.block.receiver_max_seq(1) == seq
    assert producer.try_acquire() is None  # rx0's real hold still counts
    rx0.release(slot, gen)
    assert producer.try_acquire() is not None


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda w: w.__setitem__(0, 0),  # magic
        lambda w: w.__setitem__(1, 7),  # layout version
        lambda w: w.__setitem__(2, 0),  # no slots
        lambda w: w.__setitem__(2, 1 << 40),  # absurd slot count
        lambda w: w.__setitem__(3, 10_000),  # too many receivers
    ],
)
def test_attach_rejects_corrupt_blocks(corrupt: object) -> None:
    buf = bytearray(8 * block_words(2, 2))
    ControlBlock.create(buf, 2, [1, 2])
    corrupt(memoryview(buf).cast("Q"))  # type: ignore[operator]
    with pytest.raises(ShmHandleError):
        ControlBlock.attach(buf)


def test_attach_rejects_a_truncated_block() -> None:
    buf = bytearray(8 * block_words(4, 2))
    ControlBlock.create(buf, 4, [1, 2])
    with pytest.raises(ShmHandleError, match="needs"):
        ControlBlock.attach(buf[:200])


def test_receiver_keys_identify_nodes() -> None:
    buf = bytearray(8 * block_words(1, 2))
    block = ControlBlock.create(buf, 1, [receiver_key("left"), receiver_key("right")])
    assert block.receiver_index(receiver_key("right")) == 1
    assert block.receiver_index(receiver_key("intruder")) is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["send", "take", "release", "tick"]),
            st.integers(0, 2),
            st.integers(0, 7),
        ),
        max_size=60,
    )
)
def test_no_slot_is_reused_while_held(ops: list[tuple[str, int, int]]) -> None:
    """Random sends, takes, releases and time: a held generation is never overwritten."""
    producer, receivers, clock = make(n_slots=3, n_rx=3)
    sent: list[tuple[int, int, int]] = []
    held: list[tuple[int, int, int]] = []  # (receiver, slot, generation)
    for op, r, pick in ops:
        if op == "send":
            lease = producer.try_acquire()
            if lease is not None:
                assert not any(s == lease.slot for _, s, _ in held), "reused while held"
                sent.append((lease.slot, lease.generation, producer.mark_sent(lease)))
        elif op == "take" and sent:
            slot, gen, seq = sent[pick % len(sent)]
            try:
                receivers[r].take(slot, gen, seq)
            except StaleHandleError:
                continue
            held.append((r, slot, gen))
        elif op == "release" and held:
            rr, slot, gen = held.pop(pick % len(held))
            receivers[rr].release(slot, gen)
        elif op == "tick":
            clock.advance((0.001, 0.05, 6.0)[pick % 3])
