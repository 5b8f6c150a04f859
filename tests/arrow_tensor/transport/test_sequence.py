"""Sequence numbers on the receiving side: gaps, late arrivals, duplicates, restarts."""

from __future__ import annotations

import random

from arrow_tensor.transport._sequence import (
    DUPLICATE,
    GAP,
    LATE,
    RESTART,
    Event,
    Sequence,
)
from hypothesis import given
from hypothesis import strategies as st


def test_in_order_says_nothing() -> None:
    seqs = Sequence()
    assert [seqs.see(i) for i in range(5)] == [None] * 5
    assert (seqs.lost, seqs.reordered, seqs.duplicates) == (0, 0, 0)
    assert seqs.summary() is None


def test_a_gap_names_its_range_and_a_late_arrival_is_no_longer_lost() -> None:
    seqs = Sequence()
    for i in range(5):
        seqs.see(i)
    assert seqs.see(8) == Event(GAP, 5, 7)
    assert seqs.lost == 3
    assert seqs.see(6) == Event(LATE, 6, 6)
    assert (seqs.lost, seqs.reordered) == (2, 1)
    assert seqs.see(6) == Event(DUPLICATE, 6, 6)
    assert seqs.summary() == "8 messages received, 2 lost (5, 7), 1 out of order, 1 duplicated"


def test_the_first_messages_missing_is_a_gap_from_zero() -> None:
    seqs = Sequence()
    assert seqs.see(3) == Event(GAP, 0, 2)
    assert Event(GAP, 0, 2).span == "0-2"


def test_zero_again_is_a_restart_of_the_sender() -> None:
    seqs = Sequence()
    for i in range(4):
        seqs.see(i)
    assert seqs.see(0) == Event(RESTART, 0, 0)
    assert seqs.see(1) is None
    assert seqs.restarts == 1


@given(
    st.integers(min_value=1, max_value=300),
    st.sets(st.integers(min_value=0, max_value=299)),
    st.integers(min_value=0, max_value=2**32),
)
def test_counts_match_what_was_dropped_and_shuffled(n: int, dropped: set[int], seed: int) -> None:
    """Drop any messages, swap some neighbours: lost counts exactly the dropped ones."""
    sent = [i for i in range(n) if i not in dropped or i == 0]
    rng = random.Random(seed)
    for _ in range(len(sent) // 5):
        k = rng.randrange(1, max(len(sent), 2)) if len(sent) > 1 else 0
        if 1 <= k < len(sent):
            sent[k - 1], sent[k] = sent[k], sent[k - 1]
    seqs = Sequence()
    for seq in sent:
        seqs.see(seq)
    top = max(sent)
    expected_lost = len(set(range(top + 1)) - set(sent))
    assert seqs.lost == expected_lost
    assert seqs.duplicates == 0
    assert seqs.received == len(sent)
