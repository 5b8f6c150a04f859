"""Decodes what arrives and acks it; counts the values."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from arrow_tensor import Receiver
from dora import Node


def main() -> None:
    node = Node()
    receiver = Receiver()
    count = 0
    for ev in node:
        if ev["type"] != "INPUT":
            continue
        value = receiver.receive(ev["value"], ev["metadata"])
        assert value.shape == (1024, 4096)
        assert bool(np.all(value == 1.0))
        count += 1
        node.send_output("ack", pa.array([count]))
    print(f"RECEIVED {count}", flush=True)


if __name__ == "__main__":
    main()
