"""Unbatcher node: split a model's batched output into one message per item.

Input ``in``: a batched value (a tensor with a leading batch dimension, a dict or tuple of
them, or a list with one entry per item) carrying the batcher's metadata, forwarded by the
model node. Output ``out``: one message per item, in order, with that item's own metadata.
A gap in ``batch_index`` (a batch dora dropped) is reported on stderr.
"""

from __future__ import annotations

import sys
from typing import Any

from arrow_tensor import ArrowTensorError, batching
from arrow_tensor.node import Node

try:  # warm torch now: imported lazily on the first message, it would delay it by seconds
    import torch  # noqa: F401
except ImportError:
    pass


def main(node: Any = None) -> Node:
    """Run the unbatcher until its input closes; returns the node (for its counters)."""
    node = Node(node)
    expected_index = sent = 0
    for _, value, metadata in node:
        try:
            items = batching.item_metadata(metadata)
            parts = batching.split(value, len(items))
        except ArrowTensorError as exc:
            node.errors["in"] += 1
            print(f"unbatcher: skipped a batch: {exc}", file=sys.stderr)
            continue
        index = metadata.get(batching.KEY_INDEX)
        if isinstance(index, int):
            if index != expected_index:
                print(f"unbatcher: batches {expected_index}..{index - 1} missing", file=sys.stderr)
            expected_index = index + 1
        for part, item_meta in zip(parts, items, strict=True):
            node.send("out", part, **item_meta)
        sent += len(parts)
    print(f"unbatcher: {sent} items sent from {expected_index} batches", file=sys.stderr)
    return node


if __name__ == "__main__":
    main()
