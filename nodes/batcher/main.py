"""Batcher node: collect up to BATCH_SIZE items or wait at most MAX_WAIT, send one batch.

Input ``in``: tensors or dicts of tensors, one item per message. Output ``batch``: the
stacked items, with every item's own metadata in order beside it (``batch_items``), the
batcher's item sequence numbers (``batch_seq``) and the batch number (``batch_index``).
Env: BATCH_SIZE (default 4), MAX_WAIT (default 20ms; the oldest item waits at most this
long), SHAPES (split | pad | error, default split; see the README).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from arrow_tensor import ArrowTensorError, batching
from arrow_tensor.config import choice, duration, integer, setting
from arrow_tensor.node import Node

try:  # warm torch now: imported lazily on the first message, it would delay it by seconds
    import torch  # noqa: F401
except ImportError:
    pass


def main(node: Any = None) -> Node:
    """Run the batcher until its input closes; returns the node (for its counters)."""
    size = setting("BATCH_SIZE", integer(minimum=1, maximum=65536), 4)
    max_wait = setting("MAX_WAIT", duration, 0.02)
    policy = setting("SHAPES", choice(*batching.POLICIES), "split")
    node = Node(node)
    pending: list[Any] = []
    deadline = 0.0
    batches = seq = rejected = 0
    first_sig = pending_sig = None  # what the first item and the pending batch look like

    def flush() -> None:
        nonlocal batches
        if not pending:
            return
        values, metas, seqs = zip(*pending, strict=True)
        try:
            batched, shapes = batching.stack(values, pad=policy == "pad")
            node.send("batch", batched, **batching.batch_metadata(metas, seqs, batches, shapes))
            batches += 1
        except ArrowTensorError as exc:
            print(f"batcher: dropped items {seqs[0]}..{seqs[-1]}: {exc}", file=sys.stderr)
        pending.clear()

    while not node.finished:
        timeout = max(0.0, deadline - time.monotonic()) if pending else None
        item = node.recv(timeout)
        if item is not None and item.value is not None:
            sig = batching.signature(item.value, with_shapes=policy != "pad")
            first_sig = sig if first_sig is None else first_sig
            if policy == "error" and sig != first_sig:
                rejected += 1
                print(
                    f"batcher: rejected item seq {seq}: {sig} is not {first_sig}", file=sys.stderr
                )
                seq += 1
                continue
            if pending and sig != pending_sig:
                flush()
            pending_sig = sig
            pending.append((item.value, item.metadata, seq))
            seq += 1
            if len(pending) == 1:
                deadline = time.monotonic() + max_wait
        if len(pending) >= size or (pending and time.monotonic() >= deadline):
            flush()
    flush()
    print(f"batcher: {seq} items in {batches} batches, {rejected} rejected", file=sys.stderr)
    return node


if __name__ == "__main__":
    main()
