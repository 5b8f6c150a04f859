"""Benchmark sender: for every case of the plan, send, wait for the receiver's ack, record."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import pyarrow as pa
import torch
from dora import Node
from methods import METHODS, output_of

CASE_SECONDS = float(os.environ.get("BENCH_CASE_SECONDS", "2.5"))
GAP_S = float(os.environ.get("BENCH_GAP_S", "0"))
"""Idle time after each ack (``run.py --gap-ms``): every message then meets cold caches."""


def make_tensor(size: int, layout: str) -> Any:
    """A float32 torch tensor of ``size`` payload bytes in the given memory layout."""
    n = size // 4
    channels, width = 8, (16 if n < 1 << 16 else 256)
    height = n // (channels * width)
    if layout == "contiguous":
        return torch.arange(n, dtype=torch.float32).view(1, channels, height, width)
    if layout == "channels_last":
        base = torch.arange(n, dtype=torch.float32).view(1, height, width, channels)
        return base.permute(0, 3, 1, 2)
    if layout == "non_dense":
        return torch.arange(2 * n, dtype=torch.float32).view(n // width, 2 * width)[:, ::2]
    raise ValueError(layout)


def wait_ack(node: Node, case: int, i: int, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ev = node.next(timeout=left)
        if ev is None:
            return None
        if ev["type"] != "INPUT":
            continue
        meta = ev["metadata"]
        if meta.get("case") == case and meta.get("i") == i:
            values = ev["value"].to_pylist()
            return {
                "latency_s": values[0],
                "decode_s": values[1],
                "value_s": values[2],
                "error": meta.get("error", ""),
            }
    return None


def handshake(node: Node) -> None:
    """Let dora set up its shared-memory routes before anything is timed."""
    for i in range(50):
        node.send_output("hello", pa.array(range(2048)), {"bench.method": "hello", "bench.i": i})
        if wait_ack(node, -1, i, 0.2) is not None:
            return


POOL_BYTES = 2 << 30
"""The sender's dora pool (``SENDER_POOL`` in run.py)."""
WARM_MAX_BYTES = 238 << 20
"""Largest untimed warm-up message: dora's cap, with its validity bitmap."""


def warm_pool(node: Node, size: int) -> None:
    """Fill dora's shared-memory pool once with samples of ``size`` bytes, untimed.

    dora hands out fresh pool pages for a new sample size until its pool has enough
    regions of that size; each fresh page costs a page fault. Without this, the first
    layout measured at a size pays those faults on every message (about 2 ms per 16 MiB
    message on the reference machine) and the layouts after it do not.
    """
    if size < 1 << 20 or size > WARM_MAX_BYTES:
        return
    payload = pa.array(np.zeros(size, dtype=np.uint8))
    for i in range(min(256, POOL_BYTES // size)):
        node.send_output("hello", payload, {"bench.method": "hello", "bench.i": i})
        if wait_ack(node, -1, i, 10.0) is None:
            return


def send_one(node: Node, c: dict[str, Any], group: dict[str, Any]) -> dict[str, Any] | None:
    """Send message ``c["i"]`` of case ``c``, wait for its ack; the record once warmed up."""
    i = c["i"]
    meta = {"bench.method": c["name"], "bench.case": c["case"], "bench.i": i}
    c0, p0 = time.thread_time(), time.process_time()
    t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
    meta["bench.t0"] = t0
    try:
        via = METHODS[c["name"]].send(node, output_of(c["name"]), c["x"], meta)
    except Exception as exc:  # a method that cannot do this case is reported, not fatal
        c["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return None
    send_s = time.clock_gettime(time.CLOCK_MONOTONIC) - t0
    cpu_s, pcpu_s = time.thread_time() - c0, time.process_time() - p0
    ack = wait_ack(node, c["case"], i, 120.0)
    if GAP_S:
        time.sleep(GAP_S)
    if ack is None or ack["error"]:
        c["error"] = "lost (no ack in 120 s)" if ack is None else ack["error"]
        return None
    c["i"] += 1
    if i == group["warmup"] - 1:  # slow methods: about case_seconds per case
        fit = int(CASE_SECONDS / max(ack["latency_s"], send_s, 1e-6))
        c["total"] = group["warmup"] + max(3, min(group["iters"], fit))
    if i < group["warmup"]:
        return None
    return {
        "i": i,
        "via": via if isinstance(via, str) else "",
        "send_s": send_s,
        "send_cpu_s": cpu_s,
        "send_process_cpu_s": pcpu_s,
        **ack,
    }


def main() -> None:
    plan = json.loads(open(os.environ["BENCH_PLAN"]).read())
    node = Node()
    handshake(node)
    records = []
    case = 0
    warmed: set[int] = set()
    for group in plan["groups"]:
        size, layout = group["size"], group["layout"]
        if size not in warmed:
            warmed.add(size)
            warm_pool(node, size)
        tensor = make_tensor(size, layout)
        # Methods take turns message by message, so that a load change on the machine
        # affects them all alike.
        cases = []
        for name in group["methods"]:
            case += 1
            cases.append(
                {
                    "name": name,
                    "case": case,
                    "x": METHODS[name].prepare(tensor),
                    "i": 0,
                    "total": group["warmup"] + group["iters"],
                    "error": "",
                }
            )
        order = random.Random(case)  # the same order in every run of this plan
        while active := [c for c in cases if c["i"] < c["total"] and not c["error"]]:
            # A method pays for the caches and allocator state the one before it left
            # (pickle5's megabytes of fresh bytes most of all): a new order every round
            # spreads that over all methods instead of charging it to one.
            order.shuffle(active)
            for c in active:
                record = send_one(node, c, group)
                if record is not None:
                    records.append({"method": c["name"], "size": size, "layout": layout, **record})
        for c in cases:
            if c["error"]:
                records.append(
                    {"method": c["name"], "size": size, "layout": layout, "error": c["error"]}
                )
            print(f"done {c['name']:12s} {layout:14s} {size:>11d} {c['error']}", flush=True)
        del tensor, cases
    with open(os.environ["BENCH_RESULTS"], "w") as f:
        json.dump(records, f)


if __name__ == "__main__":
    main()
