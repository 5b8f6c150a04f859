"""One dora node for the CUDA transport's dataflow tests: a producer or a receiver.

Runs on a GPU (``BACKEND=torch``) and, on any machine, against the host stand-in
(``BACKEND=standin``, see ``arrow_tensor.memory.cuda._standin.HostStandIn``), so the same dataflows
check the transport logic on CPU in the normal suite and the real IPC path in tests/gpu.

Producer env: ``BACKEND``, ``MODE`` (``stack``: dora-rs/dora#978's ``torch.stack`` of two
small tensors; ``sizes``: float32 tensors of each of ``SIZES`` bytes, ``COUNT`` each),
``COUNT``, ``KILL_AT`` (SIGKILL itself after that many sends), ``REPORT``.
Receiver env: ``BACKEND``, ``MODE`` (the producer's, to regenerate what was sent; ``observe``
only counts message kinds), ``HOLD`` (keep that many received tensors alive), ``REPORT``.
Every tensor is a pure function of (mode, seq, size), so receivers check every byte.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import statistics
import time
from typing import Any

import arrow_tensor as at
import numpy as np
from arrow_tensor import ArrowTensorError
from arrow_tensor.memory.cuda import _handles
from arrow_tensor.memory.cuda import _ipc as _cuda_ipc

BACKEND = os.environ.get("BACKEND", "torch")
MODE = os.environ.get("MODE", "stack")


def host_expected(seq: int, size: int) -> np.ndarray:
    """What message ``seq`` holds, on the host."""
    rng = np.random.default_rng(seq)
    if MODE == "stack":
        return rng.standard_normal((2, 3)).astype(np.float32)
    return rng.standard_normal(max(size // 4, 1)).astype(np.float32)


def on_device(seq: int, size: int) -> Any:
    """The tensor to send, built on the device the way users build them."""
    host = host_expected(seq, size)
    if BACKEND == "standin":
        from arrow_tensor.memory.cuda import _standin as _cuda_backend

        pool = _cuda_backend.standin().allocator
        if MODE == "stack":
            return pool.stack([pool.asarray(host[0]), pool.asarray(host[1])])
        return pool.asarray(host)
    import torch

    if MODE == "stack":  # two small tensors in one caching-allocator block, then stacked
        a = torch.from_numpy(host[0]).cuda()
        b = torch.from_numpy(host[1]).cuda()
        return torch.stack([a, b])
    return torch.from_numpy(host).cuda()


def to_host(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy()


def matches(value: Any, meta: dict[str, Any]) -> bool:
    """Every byte of ``value`` is what the producer put in message ``meta["seq"]``."""
    got = to_host(value)
    want = host_expected(int(meta["seq"]), int(meta.get("size", 0)))
    return got.shape == want.shape and got.tobytes() == want.tobytes()


def sizes() -> list[int]:
    return [int(s) for s in os.environ.get("SIZES", "4096").split(",")]


def device_memory() -> int:
    if BACKEND == "standin":
        return 0
    import torch

    return int(torch.cuda.memory_allocated())


def producer() -> None:
    from dora import Node

    if BACKEND == "torch":
        import torch

        torch.cuda.init()
    node = Node()
    count = int(os.environ.get("COUNT", "100"))
    kill_at = int(os.environ.get("KILL_AT", "0"))
    paths: collections.Counter[str] = collections.Counter()
    memory = []
    seq = 0
    time.sleep(0.5)  # dora needs ~0.5 s to set up the receivers' routes
    for size in sizes():
        for _ in range(count):
            x = on_device(seq, size)
            meta = {"seq": seq, "size": size, "t_ns": time.monotonic_ns()}
            paths[at.send(node, "out", x, meta)] += 1
            del x
            seq += 1
            if kill_at and seq == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if seq % max(count // 10, 1) == 0:
                memory.append(device_memory())
    report = {
        "sent": seq,
        "paths": dict(paths),
        "memory": memory,
        "in_flight_at_end": _cuda_ipc.in_flight(),
    }
    with open(os.environ["REPORT"], "w") as f:
        json.dump(report, f)


def receiver() -> None:
    from dora import Node

    node = Node()
    rx = at.Receiver()
    hold: collections.deque[Any] = collections.deque(maxlen=int(os.environ.get("HOLD", "0")))
    received = corrupt = 0
    kinds: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    latency: dict[int, list[float]] = collections.defaultdict(list)
    for event in node:
        if event["type"] != "INPUT":
            continue
        meta = event["metadata"]
        kinds[str(meta.get("at.kind"))] += 1
        try:
            value = rx.receive(event["value"], meta)
        except ArrowTensorError as exc:
            errors[type(exc).__name__] += 1
            continue
        if BACKEND == "torch" and not isinstance(value, np.ndarray):
            import torch

            torch.cuda.current_stream().synchronize()
        if "t_ns" in meta:
            latency[int(meta.get("size", 0))].append((time.monotonic_ns() - meta["t_ns"]) / 1e6)
        received += 1
        if MODE != "observe" and not matches(value, meta):
            corrupt += 1
        hold.append(value)
        del value
    hold.clear()
    report = {
        "received": received,
        "corrupt": corrupt,
        "kinds": dict(kinds),
        "errors": dict(errors),
        "open_handles": len(_handles.opened),
        "latency_ms": {str(k): statistics.median(v) for k, v in latency.items()},
    }
    with open(os.environ["REPORT"], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    producer() if os.environ.get("ROLE") == "producer" else receiver()
