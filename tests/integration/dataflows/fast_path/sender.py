"""Sends every case REPEATS times, one message in flight, and says which took the fast path."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import arrow_tensor as at
from arrow_tensor.transport import _facts
from cases import CASES, REPEATS, make
from dora import Node


def main() -> None:
    node = Node()
    for name in CASES:
        vias = []
        for i in range(REPEATS):
            vias.append(at.send(node, "data", make(name, i), {"case": name, "i": i}))
            ev = node.next(timeout=60)
            while ev is not None and ev["type"] != "INPUT":
                ev = node.next(timeout=60)
            assert ev is not None, f"no ack for {name} {i}"
        state = _facts.state_of(node, "data")
        fast = any(_facts.FAST_SENDS[key] is not None for key in state.fast_keys())
        print(f"CASE {name} via {'+'.join(sorted(set(vias)))} fast_entries={fast}", flush=True)
        state.forget_fast()  # the next case must learn its own layout
    print("SENDER DONE", flush=True)


if __name__ == "__main__":
    main()
