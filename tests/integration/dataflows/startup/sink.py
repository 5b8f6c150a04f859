"""Checks every frame id: all of them, in order; writes what it saw to REPORT (JSON)."""

from __future__ import annotations

import json
import sys

from arrow_tensor.config import integer, setting, text
from arrow_tensor.node import Node

frames = setting("FRAMES", integer(minimum=1), 20)
report = setting("REPORT", text, "")
node = Node()
ids = [metadata["frame_id"] for _, _, metadata in node]
result = {
    "ids": ids,
    "missing": sorted(set(range(frames)) - set(ids)),
    "in_order": ids == sorted(ids),
    "lost": dict(node.lost),
    "reordered": dict(node.reordered),
}
print(f"sink: {len(ids)} of {frames} frames, in order: {result['in_order']}", file=sys.stderr)
if report:
    with open(report, "w") as f:
        json.dump(result, f)
sys.exit(0 if ids == list(range(frames)) else 1)
