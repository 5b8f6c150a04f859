"""Per-input bookkeeping of the senders' sequence numbers: gaps, late arrivals, duplicates.

Note [Sequence numbers]
Every arrow_tensor message carries ``at.seq``: its number on its output, from 0, one per
dora message (each chunk of a chunked value has its own). dora may drop messages (a full
input queue drops the oldest, a congested route drops the newest) and reorder them (a
sender whose shared-memory pool is full sends by the daemon, which overtakes nothing but is
overtaken), and says nothing to the receiver. ``Sequence`` reads the numbers of one input
in arrival order and tells what happened:

- the expected number: nothing to say;
- a larger one: the numbers in between are missing (``Gap``), counted as lost;
- a smaller one that was missing: it arrived late (reordered), no longer lost;
- 0 again after others: the sender started over (a restarted node);
- any other smaller one: a duplicate.

It remembers the last ``REMEMBERED`` missing numbers (a late arrival older than that counts
as a duplicate); nothing here grows with the stream.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

REMEMBERED = 4096
"""Missing numbers remembered, to recognise late arrivals."""
RANGES_KEPT = 8
"""Missing ranges kept for the summary (the count is always exact)."""

GAP, LATE, DUPLICATE, RESTART = "gap", "late", "duplicate", "restart"


@dataclass(frozen=True)
class Event:
    """What one number told: ``kind`` (gap, late, duplicate, restart) and the range."""

    kind: str
    first: int
    last: int

    @property
    def span(self) -> str:
        """``5`` or ``5-9``."""
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass
class Sequence:
    """The sequence numbers seen on one input (Note [Sequence numbers])."""

    expected: int | None = None
    """The next number in order (None before the first message)."""
    lost: int = 0
    reordered: int = 0
    duplicates: int = 0
    restarts: int = 0
    received: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)
    """The first ``RANGES_KEPT`` missing ranges, for the summary."""
    _missing: OrderedDict[int, None] = field(default_factory=OrderedDict)

    def see(self, seq: int) -> Event | None:
        """Account for a message numbered ``seq``; what it told, or None when in order."""
        self.received += 1
        expected = 0 if self.expected is None else self.expected
        if seq == expected:
            self.expected = seq + 1
            return None
        if seq > expected:
            self._lose(expected, seq - 1)
            self.expected = seq + 1
            return Event(GAP, expected, seq - 1)
        if seq in self._missing:
            del self._missing[seq]
            self.lost -= 1
            self.reordered += 1
            self._found(seq)
            return Event(LATE, seq, seq)
        if seq == 0:
            self.restarts += 1
            self.expected = 1
            self._missing.clear()
            return Event(RESTART, 0, 0)
        self.duplicates += 1
        return Event(DUPLICATE, seq, seq)

    def _lose(self, first: int, last: int) -> None:
        self.lost += last - first + 1
        if len(self.ranges) < RANGES_KEPT:
            self.ranges.append((first, last))
        for n in range(max(first, last - REMEMBERED + 1), last + 1):
            self._missing[n] = None
        while len(self._missing) > REMEMBERED:
            self._missing.popitem(last=False)

    def _found(self, seq: int) -> None:
        for i, (a, b) in enumerate(self.ranges):
            if a <= seq <= b:
                self.ranges[i : i + 1] = [r for r in ((a, seq - 1), (seq + 1, b)) if r[0] <= r[1]]
                return

    def summary(self) -> str | None:
        """One line of what went wrong on this input, or None when nothing did."""
        parts = []
        if self.lost:
            spans = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ranges)
            more = ", ..." if self.lost > sum(b - a + 1 for a, b in self.ranges) else ""
            parts.append(f"{self.lost} lost ({spans}{more})")
        if self.reordered:
            parts.append(f"{self.reordered} out of order")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicated")
        if self.restarts:
            parts.append(f"sender restarted {self.restarts} time(s)")
        if not parts:
            return None
        return f"{self.received} messages received, " + ", ".join(parts)
