"""Sends tensors past dora's 256 MiB message cap, one at a time, waiting for each ack."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pyarrow as pa
from arrow_tensor import send
from cases import CASES, make
from dora import Node


def main() -> None:
    node = Node()
    transport = os.environ.get("TRANSPORT", "chunked") or None
    # Hello until the receiver answers: dora loses what is sent before a route is up
    # (between machines, the first chunks of the first value).
    for _ in range(600):
        node.send_output("tensors", pa.array([0], pa.uint8()), {"case": "hello"})
        ev = node.next(timeout=0.1)
        if ev is not None and ev["type"] == "INPUT":
            break
    else:
        print("no answer to hello", flush=True)
        sys.exit(1)
    while (ev := node.next(timeout=0.3)) is not None and ev["type"] == "INPUT":
        pass  # answers to the other hellos
    for name in os.environ.get("CASES", ",".join(CASES)).split(","):
        x = make(name)
        t0 = time.monotonic()
        # dora messages (chunks) unless TRANSPORT says otherwise: by default a same-machine
        # receiver would get these through arrow_tensor's shared-memory pool instead.
        used = send(node, "tensors", x, {"case": name}, checksum=True, transport=transport)
        took = time.monotonic() - t0
        del x
        ev = node.next(timeout=120)
        while ev is not None and ev["type"] != "INPUT":
            ev = node.next(timeout=120)
        if ev is None:
            print(f"no ack for {name}", flush=True)
            sys.exit(1)
        print(
            f"sent {name} via {used} in {took:.2f} s; receiver says {ev['metadata']['status']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
