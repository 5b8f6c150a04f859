"""Decodes every message with Receiver and compares it with the rebuilt tensor; JSON report."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import pyarrow as pa
import torch
from arrow_tensor import Receiver
from arrow_tensor.codec import _tensor as _codec
from cases import bits, make
from dora import Node


def main() -> None:
    node = Node()
    receiver = Receiver()
    report: dict[str, dict] = {}
    for ev in node:
        if ev["type"] != "INPUT":
            continue
        meta = ev["metadata"]
        name, i = meta["case"], meta["i"]
        entry = report.setdefault(name, {"received": 0, "ok": 0, "fast": 0, "errors": []})
        entry["received"] += 1
        entry["fast"] += _codec.fast_decode(ev["value"], meta) is not None
        try:
            got, want = receiver.receive(ev["value"], meta), make(name, i)
            same = (
                type(got) is type(want)
                and got.dtype == want.dtype
                and tuple(got.shape) == tuple(want.shape)
                and bits(got) == bits(want)
            )
            if same and isinstance(want, np.ndarray):
                same = not got.flags.writeable
            if same and isinstance(want, torch.Tensor) and want.is_contiguous():
                same = got.stride() == want.stride()
            if same:
                entry["ok"] += 1
            else:
                entry["errors"].append(f"message {i}: content, type, shape or strides differ")
        except Exception as exc:
            entry["errors"].append(f"message {i}: {type(exc).__name__}: {exc}")
        node.send_output("ack", pa.array([i]))
    with open(os.environ["REPORT"], "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
