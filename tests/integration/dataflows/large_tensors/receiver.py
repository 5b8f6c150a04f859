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
from cases import CASES, make
from dora import Node


def main() -> None:
    node = Node()
    receiver = Receiver(verify=True)
    report: dict[str, dict] = {}
    chunks = 0
    for ev in node:
        if ev["type"] != "INPUT":
            continue
        name = ev["metadata"]["case"]
        if name == "hello":
            node.send_output("ack", pa.array([1]), {"status": "hello"})
            continue
        chunks += 1
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
    # PASS only when every case the sender sends arrived exact: nothing received is a FAIL.
    wanted = os.environ.get("CASES", ",".join(CASES)).split(",")
    failed = [k for k in wanted if not report.get(k, {}).get("ok")]
    print(f"LARGE TENSORS {'FAIL ' + str(failed) if failed else 'PASS'}: {report}", flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
