"""Sender or receiver (ROLE) for tests/integration/test_structured_payloads.py."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from arrow_tensor.node import Node

LEAVES = int(os.environ.get("LEAVES", "2000"))


def expected(seq: int) -> dict[str, Any]:
    """Message ``seq``: thousands of small leaves, mixed frameworks, dtypes, layouts, scalars."""
    dtypes = [np.float32, np.int64, np.uint8, np.float16, np.complex64]
    return {
        "leaves": [np.full(i % 4, (seq * 7 + i) % 128, dtype=dtypes[i % 5]) for i in range(LEAVES)],
        "outputs": {
            "boxes": torch.arange(24, dtype=torch.float32).reshape(6, 4).t() + seq,
            "scores": torch.linspace(0, 1, 6, dtype=torch.bfloat16),
            "labels": (torch.arange(6) * seq).to(torch.int64)[::2],
        },
        "meta": (seq, 2.5, None, "text", True, -(2**70)),
    }


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous())


def same(a: Any, b: Any) -> bool:
    """``a`` (received) has the structure, types, bits and dense strides of ``b``."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and (a.stride() == b.stride() or not _dense(b))  # non-dense ones are compacted
            and a.contiguous().view(torch.uint8).numpy().tobytes()
            == b.contiguous().view(torch.uint8).numpy().tobytes()
        )
    return a == b


def main() -> None:
    """Send two structured messages, or receive and check them into REPORT."""
    if os.environ["ROLE"] == "sender":
        node = Node(checksum=True)
        for seq in range(2):
            node.send("out", expected(seq), seq=seq, note=f"message {seq}")
        return
    node = Node(verify=True)
    results = []
    for _, value, md in node:
        want = expected(md["seq"])
        entry = {"seq": md["seq"], "note": md["note"], "same": same(value, want)}
        if not entry["same"]:  # name the first differing part, for the failure message
            entry["differs"] = [k for k in want if not same(value.get(k), want[k])]
            entry["got"] = repr(value.get(entry["differs"][0]))[:300] if entry["differs"] else ""
        results.append(entry)
    report = {"results": results, "errors": dict(node.errors)}
    with open(os.environ["REPORT"], "w") as f:
        json.dump(report, f, default=str)


if __name__ == "__main__":
    main()
