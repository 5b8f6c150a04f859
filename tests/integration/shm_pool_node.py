"""A producer or receiver node for tests/integration/test_shm_pool.py (role from ROLE)."""

from __future__ import annotations

import collections
import os
import signal
import sys
import time

import arrow_tensor as at
import numpy as np
import pyarrow as pa
from arrow_tensor import pool
from dora import Node

ELEMENTS = int(os.environ.get("ELEMENTS", "65536"))


def expected(seq: int) -> np.ndarray:
    """Content of message ``seq``: every element differs between messages and positions."""
    return (np.arange(ELEMENTS, dtype=np.int64) * 7 + seq * 1_000_003).astype(np.int64)


def forged_handles(node: Node, seq: int) -> list[dict]:
    """Handles a hostile node could send: each must be refused without reading anything."""
    from arrow_tensor.codec import _schema
    from arrow_tensor.transport import _facts

    name = _facts.state_of(node, "out").shm_pool().segment_names()[-1]
    base = {
        "at.version": _schema.VERSION,
        "at.kind": "shm",
        "at.tensor": _schema.pack("numpy", "int64", [ELEMENTS], [0]),
        "at.shm.pool": name,
        "at.shm.slot": 0,
        "at.shm.gen": 1,
        "at.shm.seq": 1,
        "at.shm.offset": 0,
        "seq": seq,
    }
    changes = [
        {"at.shm.pool": "../../../etc/passwd"},
        {"at.shm.pool": f"at-{'0' * 32}-1-{'0' * 32}"},
        {"at.shm.slot": 99_999},
        {"at.shm.gen": 1 << 50},
        {"at.shm.offset": 1 << 40},
        {"at.tensor": _schema.pack("numpy", "int64", [1 << 40], [0])},
    ]
    return [{**base, **change} for change in changes]


def produce(node: Node) -> None:
    count = int(os.environ["COUNT"])
    kill_at = int(os.environ.get("KILL_AT", "-1"))
    period = float(os.environ.get("PERIOD", "0.005"))
    framework = os.environ.get("FRAMEWORK", "numpy")
    routes = collections.Counter()
    if framework == "torch":
        import torch  # loaded before the first send, as a torch producer has it
    waiting = set(filter(None, os.environ.get("READY", "").split(",")))
    deadline = time.monotonic() + 120
    while waiting and time.monotonic() < deadline:  # every receiver is iterating: no drops
        event = node.next(timeout=1.0)
        if event is not None and event["type"] == "INPUT":
            waiting.discard(event["id"].removeprefix("ready_"))
    print("PRODUCER_START", flush=True)
    for seq in range(count):
        if seq == kill_at:
            print(f"PRODUCER_KILLING_SELF at {seq}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if framework == "torch":
            t = pool.loan(node, "out", (ELEMENTS,), torch.int64)
            t.copy_(torch.from_numpy(expected(seq)))
        else:
            t = pool.loan(node, "out", (ELEMENTS,), np.int64)
            t[:] = expected(seq)
        routes[pool.send(node, "out", t, {"seq": seq})] += 1
        del t
        if os.environ.get("FORGE") and seq % 10 == 5:
            for meta in forged_handles(node, seq):
                node.send_output("out", pa.array([], pa.uint8()), meta)
        time.sleep(period)
    node.send_output("done", pa.array([count]))
    print(f"PRODUCER_DONE shm={routes['shm']} message={routes['message']}", flush=True)


def receive(node: Node) -> None:
    if os.environ.get("FRAMEWORK") == "torch":
        import torch  # noqa: F401  (a torch consumer has it loaded before messages arrive)

    pool.attach(node)
    hold = int(os.environ.get("HOLD", "3"))
    delay = float(os.environ.get("DELAY", "0"))
    kill_at = int(os.environ.get("KILL_AT", "-1"))
    held: collections.deque = collections.deque()
    counts = collections.Counter()
    node.send_output("ready", pa.array([1]))
    if os.environ.get("DECODE") == "0":  # subscribed, never maps the pool
        for _ in node:
            pass
        return
    for event in node:
        if event["type"] != "INPUT" or event["id"] != "x":
            if event["type"] in ("NODE_FAILED", "INPUT_CLOSED"):
                print(f"RECEIVER_EVENT {event['type']}", flush=True)
            continue
        meta = event["metadata"]
        seq = meta["seq"]
        try:
            value = at.decode(event["value"], meta)
        except at.ArrowTensorError as exc:
            counts["error"] += 1
            print(f"RECEIVER_DECODE_ERROR seq={seq} {type(exc).__name__}: {exc}", flush=True)
            continue
        array = np.asarray(value)
        counts[meta["at.kind"]] += 1
        if not np.array_equal(array, expected(seq)):
            counts["torn"] += 1
            print(f"RECEIVER_TORN seq={seq} on receipt", flush=True)
        held.append((seq, value))
        if len(held) > hold:
            old_seq, old = held.popleft()
            if not np.array_equal(np.asarray(old), expected(old_seq)):
                counts["torn"] += 1
                print(f"RECEIVER_TORN seq={old_seq} overwritten while held", flush=True)
            del old
        if counts["shm"] + counts["tensor"] == kill_at:
            print("RECEIVER_KILLING_SELF", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if delay:
            time.sleep(delay)
    for old_seq, old in held:
        if not np.array_equal(np.asarray(old), expected(old_seq)):
            counts["torn"] += 1
    print(
        f"RECEIVER_DONE shm={counts['shm']} message={counts['tensor']} "
        f"torn={counts['torn']} error={counts['error']}",
        flush=True,
    )


if __name__ == "__main__":
    node = Node()
    {"producer": produce, "receiver": receive}[os.environ["ROLE"]](node)
    sys.exit(0)
