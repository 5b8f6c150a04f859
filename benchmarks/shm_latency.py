"""One-way latency of loaned shared-memory tensors versus raw dora, 4 KiB to 1 GiB.

Run ``.venv/bin/python benchmarks/shm_latency.py [--sizes 4KiB,64MiB,1GiB] [--iters 30]``.
It writes a dataflow to a temporary directory and runs it with ``dora run``: the sender
times each send with ``CLOCK_MONOTONIC`` (shared by every process on the machine), the
receiver decodes and acks with the time it held the tensor, and the sender waits for the
ack before the next send (one message in flight). Methods:

- ``loan``: ``pool.loan`` a tensor, write its first element (the producer computes into
  the slot), ``pool.send``: only a handle travels. Timed from just before ``pool.send``.
- ``pool_copy``: ``pool.send`` of an ordinary tensor: one copy into a slot.
- ``raw``: ``send_output(pa.array(numpy))``, dora's own one copy (up to 240 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
RAW_MAX = 240 << 20


def _sender() -> None:
    import numpy as np
    import pyarrow as pa
    from arrow_tensor import pool
    from dora import Node

    node = Node()
    sizes = [int(s) for s in os.environ["SIZES"].split(",")]
    iters, warmup = int(os.environ["ITERS"]), int(os.environ["WARMUP"])
    methods = os.environ["METHODS"].split(",")
    results: list[dict[str, Any]] = []
    arrivals: list[float] = []

    def wait_ack(tag: str) -> float | None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ev = node.next(timeout=deadline - time.monotonic())
            if ev is None:
                return None
            if ev["type"] == "INPUT" and ev["metadata"].get("tag") == tag:
                values = ev["value"].to_pylist()
                arrivals.append(values[-1])
                return values[0]
        return None

    for i in range(50):  # let dora set up its routes before timing
        node.send_output("data", pa.array([0], pa.uint8()), {"tag": f"hello{i}", "kind": "hi"})
        if wait_ack(f"hello{i}") is not None:
            break
    for i in range(300):  # dora's first few hundred sends are slower (measured): warm up
        node.send_output("data", pa.array([0], pa.uint8()), {"tag": f"warm{i}", "kind": "hi"})
        wait_ack(f"warm{i}")
    for size in sizes:
        source = np.arange(size, dtype=np.uint8)
        for method in methods:
            if method == "raw" and size > RAW_MAX:
                continue
            lat, send = [], []
            arrivals.clear()
            for i in range(warmup + iters):
                tag = f"{method}-{size}-{i}"
                if method == "loan":
                    t = pool.loan(node, "data", (size,), np.uint8)
                    t[0] = i % 256
                elif method == "pool_copy":
                    t = source
                t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
                meta = {"tag": tag, "t0": t0, "kind": method}
                if method == "raw":
                    node.send_output("data", pa.array(source), meta)
                else:
                    route = pool.send(node, "data", t, meta)
                    del t
                    if route != "shm":
                        raise RuntimeError(f"{method} {size}: went by {route}")
                t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
                latency = wait_ack(tag)
                if latency is None:
                    raise RuntimeError(f"no ack for {tag}")
                if i >= warmup:
                    lat.append(latency)
                    send.append(t1 - t0)
            results.append(
                {
                    "method": method,
                    "size": size,
                    "latency_ms": statistics.median(lat) * 1e3,
                    "latency_p90_ms": sorted(lat)[int(0.9 * (len(lat) - 1))] * 1e3,
                    "send_ms": statistics.median(send) * 1e3,
                    "arrival_ms": statistics.median(arrivals[warmup:]) * 1e3,
                }
            )
            print(json.dumps(results[-1]), flush=True)
        del source
    Path(os.environ["RESULTS"]).write_text(json.dumps(results))


def _receiver() -> None:
    import arrow_tensor as at
    import pyarrow as pa
    from arrow_tensor import pool
    from dora import Node

    node = Node()
    pool.attach(node)
    held = None
    for ev in node:
        if ev["type"] != "INPUT":
            continue
        arrived = time.clock_gettime(time.CLOCK_MONOTONIC)
        meta = ev["metadata"]
        if meta.get("kind") == "hi":
            node.send_output("ack", pa.array([0.0, 0.0]), {"tag": meta["tag"]})
            continue
        if meta["kind"] == "raw":
            value = ev["value"].to_numpy(zero_copy_only=True)
        else:
            value = at.decode(ev["value"], meta)
        t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
        held = value  # hold it until the next message, as a consumer would
        node.send_output(
            "ack", pa.array([t1 - meta["t0"], arrived - meta["t0"]]), {"tag": meta["tag"]}
        )
    del held


def _size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for suffix, unit in units.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * unit
    return int(text)


def _label(n: int) -> str:
    for suffix, unit in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n % unit == 0:
            return f"{n // unit} {suffix}"
    return f"{n} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4KiB,64KiB,1MiB,16MiB,64MiB,256MiB,1GiB")
    parser.add_argument("--methods", default="loan,pool_copy,raw")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    sizes = [_size(s) for s in args.sizes.split(",")]
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        results_path = Path(tmp) / "results.json"
        env = {
            "SIZES": ",".join(map(str, sizes)),
            "ITERS": str(args.iters),
            "WARMUP": str(args.warmup),
            "METHODS": args.methods,
            "RESULTS": str(results_path),
        }
        dataflow = {
            "nodes": [
                {
                    "id": "sender",
                    "path": str(HERE),
                    "args": "sender",
                    "inputs": {"ack": "receiver/ack"},
                    "outputs": ["data"],
                    "shared_memory_pool_size": "1GB",
                    "env": {**env, "ARROW_TENSOR_SHM_SLOTS": "3"},
                },
                {
                    "id": "receiver",
                    "path": str(HERE),
                    "args": "receiver",
                    "inputs": {"data": {"source": "sender/data", "queue_size": 4}},
                    "outputs": ["ack"],
                },
            ]
        }
        spec = Path(tmp) / "dataflow.yml"
        spec.write_text(json.dumps(dataflow))  # JSON is YAML
        path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        done = subprocess.run(
            [str(bin_dir / "dora"), "run", str(spec)],
            cwd=tmp,
            env={**os.environ, "PATH": path},
            capture_output=True,
            text=True,
        )
        if not results_path.exists():
            sys.exit(f"benchmark failed (dora exit {done.returncode}):\n{done.stdout[-3000:]}")
        results = json.loads(results_path.read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    methods = args.methods.split(",")
    print("one-way latency, median ms (p90) until the receiver holds the tensor")
    print(f"{'size':>8} | " + " | ".join(f"{m:>18}" for m in methods))
    for size in sizes:
        row = []
        for m in methods:
            hit = [r for r in results if r["method"] == m and r["size"] == size]
            row.append(
                f"{hit[0]['latency_ms']:8.3f} ({hit[0]['latency_p90_ms']:7.3f})" if hit else "-"
            )
        print(f"{_label(size):>8} | " + " | ".join(f"{c:>18}" for c in row))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("sender", "receiver"):
        {"sender": _sender, "receiver": _receiver}[sys.argv[1]]()
    else:
        main()
