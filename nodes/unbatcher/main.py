"""Unbatcher node: split a model's batched output into one message per item.

Input ``in``: a batched value (a tensor with a leading batch dimension, a dict or tuple of
them, or a list with one entry per item) carrying the batcher's metadata, forwarded by the
model node. Output ``out``: one message per item, in order, with that item's own metadata.
A gap in ``batch_index`` (a batch dora dropped) is reported on stderr.

Env: ITEM_GAP (default 1ms) between the items of one batch. dora's publisher drops a
message, without a word, when it is handed the next one before its send task ran
(zenoh's ``CongestionControl::Drop``): sent back to back on a loaded machine, items of a
batch were lost in 4 of about 15 runs of the vision example. A millisecond per item lets
that task run.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from arrow_tensor import _batch
from arrow_tensor._config import duration, setting
from arrow_tensor._errors import ArrowTensorError
from arrow_tensor.node import Node

try:  # warm torch now: imported lazily on the first message, it would delay it by seconds
    import torch  # noqa: F401
except ImportError:
    pass


def main(node: Any = None) -> Node:
    """Run the unbatcher until its input closes; returns the node (for its counters)."""
    gap = setting("ITEM_GAP", duration, 0.001)
    node = Node(node)
    expected_index = sent = 0
    for _, value, metadata in node:
        try:
            items = _batch.item_metadata(metadata)
            parts = _batch.split(value, len(items))
        except ArrowTensorError as exc:
            node.errors["in"] += 1
            print(f"unbatcher: skipped a batch: {exc}", file=sys.stderr)
            continue
        index = metadata.get(_batch.KEY_INDEX)
        if isinstance(index, int):
            if index != expected_index:
                print(f"unbatcher: batches {expected_index}..{index - 1} missing", file=sys.stderr)
            expected_index = index + 1
        for i, (part, item_meta) in enumerate(zip(parts, items, strict=True)):
            if i and gap:
                time.sleep(gap)
            node.send("out", part, **item_meta)
        sent += len(parts)
    print(f"unbatcher: {sent} items sent from {expected_index} batches", file=sys.stderr)
    return node


if __name__ == "__main__":
    main()
