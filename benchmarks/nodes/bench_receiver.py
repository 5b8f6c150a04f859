"""Benchmark receiver: decode each message with the method's receiver, ack with the latency."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa
import torch  # noqa: F401  (decoders return torch tensors)
from dora import Node
from methods import METHODS


def main() -> None:
    node = Node()
    receivers: dict[str, Any] = {}
    decode_s = value_s = 0.0  # summed over the messages of one value (chunks)
    for ev in node:
        if ev["type"] != "INPUT":
            continue
        meta = ev["metadata"]
        name = meta.get("bench.method")
        if name == "hello":
            node.send_output("ack", pa.array([0.0, 0.0, 0.0]), {"case": -1, "i": meta["bench.i"]})
            continue
        receive = receivers.get(name)
        if receive is None:
            receive = receivers[name] = METHODS[name].make_receiver()
        error = ""
        v0 = time.perf_counter()
        array = ev["value"]  # dora builds the pyarrow array here, for every method alike
        d0 = time.perf_counter()
        value_s += d0 - v0
        try:
            value = receive(array, meta)
        except Exception as exc:
            value, error = None, f"{type(exc).__name__}: {str(exc)[:160]}"
        t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
        decode_s += time.perf_counter() - d0
        if value is None and not error:
            continue  # a chunk of a value still being reassembled
        latency = t1 - meta["bench.t0"]
        del value, array
        ack = {"case": meta["bench.case"], "i": meta["bench.i"], "error": error}
        node.send_output("ack", pa.array([latency, decode_s, value_s]), ack)
        decode_s = value_s = 0.0


if __name__ == "__main__":
    main()
