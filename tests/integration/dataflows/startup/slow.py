"""Falls behind on purpose (sleeps on its first message) and writes what it got to REPORT."""

from __future__ import annotations

import json
import time

from arrow_tensor.config import setting, text
from arrow_tensor.node import Node

report = setting("REPORT", text, "")
node = Node()
got = []
for _, _, metadata in node:
    if not got:
        time.sleep(1.0)
    got.append(metadata["i"])
with open(report, "w") as f:
    json.dump({"got": got, "lost": dict(node.lost), "reordered": dict(node.reordered)}, f)
