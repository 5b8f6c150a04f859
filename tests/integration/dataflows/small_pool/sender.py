"""Sends 16 MiB tensors from a node left with dora's default 8 MB pool."""

from __future__ import annotations

import numpy as np
from arrow_tensor import send
from dora import Node


def main() -> None:
    node = Node()
    dense = np.ones((1024, 4096), dtype=np.float32)  # 16 MiB: inline
    strided = np.ones((1024, 8192), dtype=np.float32)[:, ::2]  # 16 MiB: raw
    for i in range(3):
        # Explicit dora-message transports: the shared-memory pool of arrow_tensor (chosen
        # by default for same-machine receivers) would not use dora's pool at all.
        for output, value, transport in (("dense", dense, "inline"), ("strided", strided, "raw")):
            assert send(node, output, value, {"i": i}, transport=transport) == transport
            ev = node.next(timeout=60)
            while ev is not None and ev["type"] != "INPUT":
                ev = node.next(timeout=60)
            assert ev is not None, "no ack"
    print("SENDER DONE", flush=True)


if __name__ == "__main__":
    main()
