"""Micro-benchmark of the single-tensor codec (not a test: prints a table, asserts nothing).

Shows the two claims of the codec on this machine:
- ``decode`` is O(1) in the payload size: a 4 KiB and a 64 MiB tensor decode in about the same
  time (it only validates metadata and builds a view);
- ``encode`` of a dense tensor copies nothing: its time is flat while a memcpy of the same
  64 MiB takes milliseconds, and the Arrow buffer's address is the tensor's own.

Run: ``.venv/bin/python benchmarks/codec_micro.py [--repeat N] [--no-torch]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import arrow_tensor as at
import numpy as np

KIB = 1024
MIB = 1024 * KIB


def median_us(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall time of ``fn`` in microseconds over ``repeat`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def make(framework: str, nbytes: int, layout: str) -> Any:
    """A float32 tensor of ``nbytes`` bytes, contiguous or transposed (both dense)."""
    n = nbytes // 4
    cols = 256 if n >= 256 * 4 else 4
    x: Any = np.random.default_rng(0).random(n, dtype=np.float32).reshape(-1, cols)
    if framework == "torch":
        import torch

        x = torch.from_numpy(x)
    return x.T if layout == "transposed" else x


def data_address(x: Any) -> int:
    return x.data_ptr() if hasattr(x, "data_ptr") else x.ctypes.data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="runs per figure (median)")
    parser.add_argument("--no-torch", action="store_true", help="numpy only")
    args = parser.parse_args()
    frameworks = ["numpy"] if args.no_torch else ["numpy", "torch"]

    rows: list[tuple[str, ...]] = []
    for framework in frameworks:
        for layout in ("contiguous", "transposed"):
            for size in (4 * KIB, 64 * MIB):
                x = make(framework, size, layout)
                array, meta = at.encode(x)
                copied = array.buffers()[1].address != data_address(x)
                enc = median_us(lambda x=x: at.encode(x), args.repeat)
                dec = median_us(lambda a=array, m=meta: at.decode(a, m), args.repeat)
                rows.append(
                    (
                        framework,
                        layout,
                        f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB",
                        f"{enc:.1f}",
                        f"{dec:.1f}",
                        "yes" if copied else "no",
                    )
                )

    src = np.ones(64 * MIB, np.uint8)
    dst = np.empty_like(src)
    memcpy = median_us(lambda: np.copyto(dst, src), max(10, args.repeat // 10))
    stepped = make("numpy", 128 * MIB, "contiguous")[:, ::2]
    compact = median_us(lambda: at.encode(stepped), max(10, args.repeat // 10))
    checksum_x = make("numpy", 64 * MIB, "contiguous")
    with_checksum = median_us(lambda: at.encode(checksum_x, checksum=True), 10)

    header = ("framework", "layout", "size", "encode us", "decode us", "encode copied")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    print()
    print(f"memcpy of 64 MiB (np.copyto):                 {memcpy / 1e3:8.2f} ms")
    print(f"encode of a non-dense 64 MiB view (one copy): {compact / 1e3:8.2f} ms")
    print(f"encode of a dense 64 MiB with checksum=True:  {with_checksum / 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
