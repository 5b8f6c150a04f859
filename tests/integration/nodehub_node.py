"""Our side of the node-hub dataflows in test_nodehub_packages.py (role from ROLE).

- ``ticker``: a plain dora node (no arrow_tensor keys, like a dora timer) that ticks COUNT
  times every PERIOD seconds: it drives opencv-video-capture.
- ``frames``: an arrow_tensor ``Node`` that records every image it gets, per input, in
  REPORT (an .npz); it decodes whatever the cameras send with no configuration.
- ``relay_source`` / ``relay_sink``: the values of ``relay_values()``, sent by an
  arrow_tensor node through dora-echo and checked bit for bit at the far end.
- ``bridge``: takes pyarrow-sender's plain array in and sends plain values and a plain
  output to pyarrow-assert.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa

ROLE = os.environ.get("ROLE", "")
LARGE = int(os.environ.get("LARGE_BYTES", str(300 << 20)))


def relay_values() -> dict[str, Any]:
    """What the relay test sends: one value per kind of message a relay must carry."""
    import torch

    g = torch.Generator().manual_seed(5)
    bf16 = torch.randn(2, 3, 16, 16, generator=g).to(torch.bfloat16)
    return {
        "bf16_channels_last": bf16.to(memory_format=torch.channels_last),
        "large": torch.arange(LARGE // 4, dtype=torch.float32),
        "nested": {
            "boxes": torch.randn(4, 4, generator=g),
            "ids": [1, 2, 3],
            "meta": {"name": "cam0", "scale": 0.5},
            "mask": np.arange(12, dtype=np.uint8).reshape(3, 4)[:, ::2],
        },
    }


def loan_fill(t: Any) -> None:
    import torch

    t.copy_(torch.arange(t.numel(), dtype=t.dtype).reshape(t.shape) * 3)


def same(a: Any, b: Any) -> bool:
    """Exact equality: type, dtype, shape and bits, through structures."""
    import torch

    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.stride() == b.stride()
            and torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a, b)
        )
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b)
        )
    return type(a) is type(b) and a == b


def ticker() -> None:
    from dora import Node

    node = Node()
    for i in range(int(os.environ["COUNT"])):
        node.send_output("tick", pa.array([i]), {"i": i})
        time.sleep(float(os.environ.get("PERIOD", "0.05")))


def frames() -> None:
    from arrow_tensor.node import Node

    node = Node()
    got: dict[str, list[np.ndarray]] = {}
    ticks: dict[str, list[int]] = {}
    for input_id, value, metadata in node:
        got.setdefault(input_id, []).append(np.array(value))
        ticks.setdefault(input_id, []).append(metadata.get("i", -1))
    arrays = {f"{k}/frames": np.stack(v) for k, v in got.items()}
    arrays |= {f"{k}/ticks": np.array(v) for k, v in ticks.items()}
    np.savez(os.environ["REPORT"], **arrays)
    print(f"FRAMES_DONE {json.dumps({k: len(v) for k, v in got.items()})}", flush=True)
    print(f"FRAMES_ERRORS {json.dumps(dict(node.errors))}", flush=True)


def relay_source() -> None:
    import torch
    from arrow_tensor.node import Node

    node = Node()
    # Say hello through the relay until the sink answers: both hops' routes are up.
    while True:
        node.send("out", np.zeros(1, np.uint8), name="hello")
        item = node.recv(timeout=0.2)
        if item is not None and item.id == "ready":
            break
    loaned = node.empty("out", (64, 32), torch.float32)
    loan_fill(loaned)
    print(f"SENT loaned {node.send('out', loaned, name='loaned')}", flush=True)
    del loaned
    for name, value in relay_values().items():
        print(f"SENT {name} {node.send('out', value, name=name)}", flush=True)
    # Stay until the sink has everything: a relay whose input closes may drop what it
    # still had queued (dora delivers the close ahead of queued inputs).
    node.recv(timeout=120)


def relay_sink() -> None:
    import torch
    from arrow_tensor.node import Node

    node = Node()
    expected = relay_values()
    loaned = torch.zeros(64, 32)
    loan_fill(loaned)
    expected["loaned"] = loaned
    results = {}
    ready = False
    for _, value, metadata in node:
        name = metadata["name"]
        if name == "hello":
            if not ready:
                node.send("ready", np.ones(1, np.uint8))
                ready = True
            continue
        results[name] = same(expected[name], value)
        print(f"GOT {name} exact={results[name]}", flush=True)
        if len(results) == len(expected):
            break
    print(f"RELAY_DONE {json.dumps(results)} errors={dict(node.errors)}", flush=True)
    node.send("done", np.ones(1, np.uint8))


def bridge() -> None:
    from arrow_tensor.node import Node

    node = Node(plain_outputs=["tensor"])
    for input_id, value, _ in node:
        if input_id != "data":
            continue
        print(f"BRIDGE got {type(value).__name__} {value.tolist()}", flush=True)
        node.send("numbers", value.tolist())  # a flat list of ints: an Int64Array
        node.send("text", "hello node-hub")  # a one-element StringArray
        node.send("tensor", np.array([[1.0, 2.0], [3.0, 4.0]]).T)  # C order: 1, 3, 2, 4
        break


if __name__ == "__main__":
    roles = {
        "ticker": ticker,
        "frames": frames,
        "relay_source": relay_source,
        "relay_sink": relay_sink,
        "bridge": bridge,
    }
    if ROLE not in roles:
        sys.exit(f"ROLE must be one of {sorted(roles)}, got {ROLE!r}")
    roles[ROLE]()
