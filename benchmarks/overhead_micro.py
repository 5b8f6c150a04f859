"""Per-message CPU overhead of the codec for small tensors (not a test: prints, asserts nothing).

Issue 6 asks for at most 20 µs of end-to-end overhead over raw dora for 4 KiB messages, so
this measures, in one process and without dora, what arrow_tensor adds per message:

- the public verbs ``at.encode`` / ``at.decode`` and their parts (``_codec.plan``,
  ``encode_plan``, ``TensorHeader.to_metadata``, ``_schema.parse_header``,
  ``read_payload``, ``view_tensor``, ``decode_tensor``);
- the transport layer around them, ``_transport.send`` to a node whose ``send_output`` does
  nothing and ``Receiver.receive`` (header cache warm);
- the raw baseline a user would write by hand: ``pa.array(np_array)`` to send,
  ``np.frombuffer(array.buffers()[1])`` or ``torch.from_dlpack(array)`` to receive.

Every figure is the median over ``--repeat`` loops of ``--number`` calls (µs per call).
``--profile`` prints a cProfile of encode + decode for 4 KiB float32 instead.

Run: ``.venv/bin/python benchmarks/overhead_micro.py [--number N] [--repeat R] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
from arrow_tensor.codec import _schema
from arrow_tensor.codec import _tensor as _codec
from arrow_tensor.transport import _send as _transport

SIZES = {"64 B": 64, "4 KiB": 4096}
LAYOUTS = ("contiguous", "transposed")


def time_all(
    fns: dict[tuple[str, str], Callable[[], Any]], number: int, repeat: int
) -> dict[tuple[str, str], float]:
    """Median over ``repeat`` loops of ``number`` calls of each function, in µs per call.

    Rounds go over every function in turn, so that a noisy moment on a shared machine
    spoils one loop of many functions rather than every loop of one.
    """
    for fn in fns.values():
        for _ in range(min(number, 200)):  # warm caches and the allocator
            fn()
    loops: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            start = time.perf_counter()
            for _ in range(number):
                fn()
            loops[key].append((time.perf_counter() - start) / number)
    return {key: statistics.median(times) * 1e6 for key, times in loops.items()}


def make(framework: str, nbytes: int, layout: str) -> Any:
    """A float32 tensor of ``nbytes`` bytes, 2-D, contiguous or transposed (both dense)."""
    n = nbytes // 4
    x: Any = np.arange(n, dtype=np.float32).reshape(-1, 4 if n < 64 else 16)
    if framework == "torch":
        import torch

        x = torch.from_numpy(x)
    return x.T if layout == "transposed" else x


class NullNode:
    """A dora node stand-in whose outputs go nowhere (measures arrow_tensor's side only)."""

    def send_output(self, output_id: str, data: Any, metadata: Any = None) -> None:
        pass

    def node_config(self) -> dict[str, Any]:
        return {}


def case_functions(framework: str, x: Any) -> dict[str, Callable[[], Any]]:
    """Every measured call for one tensor, by row name."""
    dense = np.ascontiguousarray(x.numpy() if framework == "torch" else x)
    raw = pa.array(dense.reshape(-1))
    if framework == "torch":
        import torch

        def raw_decode() -> Any:
            return torch.from_dlpack(raw)
    else:

        def raw_decode() -> Any:
            return np.frombuffer(raw.buffers()[1], dtype=dense.dtype)

    p = _codec.plan(x)
    array, meta = _codec.encode_plan(p)
    header = _schema.parse_header(meta)
    buf = _codec.read_payload(array, header.nbytes)
    node = NullNode()
    receiver = at.Receiver()
    return {
        "raw send: pa.array(np)": lambda: pa.array(dense.reshape(-1)),
        "raw recv: frombuffer/dlpack": raw_decode,
        "at.encode": lambda: at.encode(x),
        "at.decode": lambda: at.decode(array, meta),
        "_codec.plan": lambda: _codec.plan(x),
        "_codec.encode_plan": lambda: _codec.encode_plan(p),
        "TensorHeader.to_metadata": header.to_metadata,
        "_schema.parse_header": lambda: _schema.parse_header(meta),
        "_codec.read_payload": lambda: _codec.read_payload(array, header.nbytes),
        "_codec.view_tensor": lambda: _codec.view_tensor(header, buf, False),
        "_codec.decode_tensor": lambda: _codec.decode_tensor(array, meta),
        "_transport.send (null node)": lambda: _transport.send(node, "out", x),
        "Receiver.receive": lambda: receiver.receive(array, meta),
    }


def profile(number: int) -> None:
    """cProfile of encode + decode of a 4 KiB float32, numpy then torch, contiguous."""
    for framework in ("numpy", "torch"):
        x = make(framework, 4096, "contiguous")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(number):
            at.decode(*at.encode(x))
        profiler.disable()
        print(f"\n=== cProfile: at.decode(*at.encode(x)), {framework} 4 KiB, {number} calls")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=4000, help="calls per timed loop")
    parser.add_argument("--repeat", type=int, default=5, help="timed loops (median)")
    parser.add_argument("--no-torch", action="store_true", help="numpy only")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--profile", action="store_true", help="cProfile instead of the table")
    args = parser.parse_args()
    frameworks = ["numpy"] if args.no_torch else ["numpy", "torch"]
    if args.profile:
        profile(args.number)
        return

    fns: dict[tuple[str, str], Callable[[], Any]] = {}
    for framework in frameworks:
        for layout in LAYOUTS:
            for size_name, nbytes in SIZES.items():
                label = f"{framework} {layout[:6]} {size_name}"
                x = make(framework, nbytes, layout)
                for name, fn in case_functions(framework, x).items():
                    fns[label, name] = fn
    columns: dict[str, dict[str, float]] = {}
    for (label, name), us in time_all(fns, args.number, args.repeat).items():
        columns.setdefault(label, {})[name] = us

    names = list(next(iter(columns.values())))
    labels = list(columns)
    totals = {
        "= raw send + recv": ("raw send: pa.array(np)", "raw recv: frombuffer/dlpack"),
        "= at.encode + at.decode": ("at.encode", "at.decode"),
        "= send + Receiver.receive": ("_transport.send (null node)", "Receiver.receive"),
    }
    width = max(map(len, [*names, *totals])) + 2
    print(f"µs per call, median of {args.repeat} loops x {args.number} calls, float32 tensors")
    print("".ljust(width) + "".join(f"{label:>22}" for label in labels))
    for name in names:
        print(name.ljust(width) + "".join(f"{columns[c][name]:>22.2f}" for c in labels))
    for total, parts in totals.items():
        print(
            total.ljust(width)
            + "".join(f"{sum(columns[c][p] for p in parts):>22.2f}" for c in labels)
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(columns, f, indent=1)


if __name__ == "__main__":
    main()
