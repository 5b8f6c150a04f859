"""Receives the large tensors, verifies checksum and content, writes a JSON report."""

from __future__ import annotations

import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import pyarrow as pa
import torch
from arrow_tensor import ArrowTensorError, Receiver
from cases import make
from dora import Node


def main() -> None:
    node = Node()
    receiver = Receiver(verify=True)
    report: dict[str, dict] = {}
    chunks = 0
    for ev in node:
        if ev["type"] != "INPUT":
            continue
        chunks += 1
        name = ev["metadata"]["case"]
        try:
            value = receiver.receive(ev["value"], ev["metadata"])
        except ArrowTensorError as exc:
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            value = None
        else:
            if value is None:
                continue
            expected = make(name)
            if isinstance(expected, np.ndarray):
                same = (
                    isinstance(value, np.ndarray)
                    and value.strides == expected.strides
                    and np.array_equal(value, expected)
                )
            else:
                same = (
                    isinstance(value, torch.Tensor)
                    and value.shape == expected.shape
                    and torch.equal(value, expected)
                )
            report[name] = {"ok": bool(same), "messages": chunks, "shape": list(value.shape)}
            del value, expected
        chunks = 0
        node.send_output("ack", pa.array([1]), {"status": json.dumps(report[name])})
    report["_max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    path = os.environ.get("REPORT") or os.path.join(os.getcwd(), "out", "large_tensors.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f)
    failed = [k for k, v in report.items() if isinstance(v, dict) and not v.get("ok")]
    print(f"LARGE TENSORS {'FAIL ' + str(failed) if failed else 'PASS'}: {report}", flush=True)
    if failed or len(report) < 2:
        sys.exit(1)


if __name__ == "__main__":
    main()
