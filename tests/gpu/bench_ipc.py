"""A short GPU benchmark: CUDA IPC handle against the host path, two processes, no dora.

    python tests/gpu/bench_ipc.py --json out/gpu_bench.json [--quick]

For each case (sizes 4 KiB, 64 MiB, 1 GiB of float32; the dora-rs/dora#978 ``torch.stack``
of two small tensors; bfloat16; a non-dense view) the time from ``encode`` until the
receiving process holds the tensor on the GPU and answered: once as an IPC handle (the
receiver opens it) and once by the host path (a device-to-host copy, the message's bytes,
a host-to-device copy on the receiver). Medians of a few rounds; one untimed round per case
and path checks every byte. Figures only: nothing is asserted beyond exactness.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from ipc_peer import digest
from pair import Peer

CASES = [
    ("float32 4 KiB", "float32", (1024,), "contiguous"),
    ("float32 64 MiB", "float32", (16 << 20,), "contiguous"),
    ("float32 1 GiB", "float32", (256 << 20,), "contiguous"),
    ("stack #978", "float32", (2, 16), "stack"),
    ("bfloat16 16 MiB", "bfloat16", (8 << 20,), "contiguous"),
    ("non-dense 16 MiB", "float32", (4 << 20,), "stepped"),
]


def make(torch: Any, dtype: str, shape: tuple[int, ...], layout: str) -> Any:
    dt = getattr(torch, dtype)
    if layout == "stack":
        return torch.stack([torch.arange(16.0, device="cuda"), torch.ones(16, device="cuda")])
    n = shape[0] * (2 if layout == "stepped" else 1)
    x = torch.arange(n, device="cuda", dtype=torch.float32).to(dt)
    return x[::2] if layout == "stepped" else x


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="no 1 GiB case")
    args = parser.parse_args()
    import arrow_tensor as at
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_ipc: torch sees no CUDA device")
    props = torch.cuda.get_device_properties(0)
    rows: list[dict[str, Any]] = []
    peer = Peer(timeout=300)
    try:
        for name, dtype, shape, layout in CASES:
            if args.quick and "1 GiB" in name:
                continue
            x = make(torch, dtype, shape, layout)
            expect = digest(x)
            row: dict[str, Any] = {"case": name, "bytes": x.numel() * x.element_size()}
            for path in ("ipc", "host"):
                times = []
                for i in range(args.rounds + 1):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    message = at.encode(x if path == "ipc" else x.cpu())
                    checked = i == 0  # the first round checks the bytes, untimed
                    answer = peer.decode(
                        message, expect=expect if checked else None, device="cuda", sync=True
                    )
                    if not checked:
                        times.append(time.perf_counter() - t0)
                    if not answer.get("ok"):
                        raise SystemExit(f"bench_ipc: {name} {path} inexact: {answer}")
                    if path == "ipc" and message[1]["at.kind"] != "cuda":
                        raise SystemExit(f"bench_ipc: {name} did not travel as a handle")
                    del message
                row[f"{path}_ms"] = round(1e3 * statistics.median(times), 3)
            row["speedup"] = round(row["host_ms"] / row["ipc_ms"], 2)
            rows.append(row)
            print(
                f"{name:>18}: ipc {row['ipc_ms']:9.3f} ms  host {row['host_ms']:9.3f} ms  "
                f"({row['speedup']}x)",
                flush=True,
            )
            del x
            torch.cuda.empty_cache()
    finally:
        peer.close()
    report = {
        "device": props.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "rounds": args.rounds,
        "note": "round trip: encode until the other process holds the tensor on the GPU",
        "rows": rows,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
