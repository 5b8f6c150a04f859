"""Two-process CUDA IPC smoke check without dora, bounded in time: the first GPU check to run.

    python tests/gpu/smoke.py --seconds 30 --json out/gpu_smoke.json [--backend standin]

This process encodes device tensors (sizes, dtypes, layouts, the dora-rs/dora#978
``torch.stack`` case) with ``arrow_tensor.encode`` and a second process (``ipc_peer.py``)
decodes each one and compares its bytes with what was sent. At the end every handle the
peer opened must be closed, every in-flight slot here given back and, for torch, the
device memory back at its baseline (nothing left in torch's IPC limbo). Exit code 0 only
when all of that holds; the JSON says what ran on which device, with figures.
``--backend standin`` runs the same on the host stand-in (tests run it on CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from ipc_peer import digest
from pair import Peer

SIZES = (4 << 10, 1 << 20, 64 << 20)
DTYPES = ("float32", "bfloat16", "uint8", "int64")
LAYOUTS = ("contiguous", "permuted", "stepped", "stack978")


class Torch:
    """Tensors on the current CUDA device."""

    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch
        if not torch.cuda.is_available():
            raise SystemExit("smoke: torch sees no CUDA device")

    def make(self, dtype: str, layout: str, nbytes: int, seed: int) -> Any:
        torch = self.torch
        dt = getattr(torch, dtype)
        n = max(nbytes // torch.empty(0, dtype=dt).element_size(), 64)
        g = torch.Generator(device="cuda").manual_seed(seed)
        base = torch.randint(0, 100, (2 * n,), generator=g, device="cuda").to(dt)
        if layout == "contiguous":
            return base[:n]
        if layout == "permuted":
            return base[: n - n % 64].view(-1, 64).t()
        if layout == "stepped":
            return base[::2]
        small = [base[:16], base[16:32]]  # dora-rs/dora#978: lands at an offset of a block
        return torch.stack(small)

    def facts(self) -> dict[str, Any]:
        torch = self.torch
        props = torch.cuda.get_device_properties(0)
        return {
            "device": props.name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "memory_allocated": torch.cuda.memory_allocated(),
        }

    def settle(self) -> int:
        self.torch.cuda.synchronize()
        return int(self.torch.cuda.memory_allocated())


class StandIn:
    """The host stand-in: the same checks on CPU."""

    name = "standin"

    def __init__(self) -> None:
        from arrow_tensor.memory.cuda import _standin

        self.sb = _standin.standin()

    def make(self, dtype: str, layout: str, nbytes: int, seed: int) -> Any:
        np_dtype = {"bfloat16": "float16"}.get(dtype, dtype)
        n = max(nbytes // np.dtype(np_dtype).itemsize, 64)
        rng = np.random.default_rng(seed)
        base = self.sb.allocator.asarray(rng.integers(0, 100, 2 * n).astype(np_dtype))
        if layout == "contiguous":
            return base[:n]
        if layout == "permuted":
            return _permuted(base, n)
        if layout == "stepped":
            return base[::2]
        return self.sb.allocator.stack([base[:16], base[16:32]])

    def facts(self) -> dict[str, Any]:
        return {"device": "host stand-in", "exports": self.sb.exports}

    def settle(self) -> int:
        return self.sb.exports


def _permuted(base: Any, n: int) -> Any:
    from arrow_tensor.memory.cuda._standin import StandInArray

    m = n - n % 64
    view = base.view[:m].reshape(-1, 64).T
    return StandInArray(view, base.block, base.storage)


def run(backend: Any, seconds: float, max_bytes: int) -> dict[str, Any]:
    import arrow_tensor as at
    from arrow_tensor.memory.cuda import _ipc

    report: dict[str, Any] = {"backend": backend.name, **backend.facts()}
    report["platform"] = platform.platform()
    baseline = backend.settle()
    peer = Peer(timeout=120)
    failures: list[dict[str, Any]] = []
    timings: dict[str, list[float]] = {}
    sent = 0
    start = time.monotonic()
    try:
        cases = [
            (d, layout, s) for s in SIZES if s <= max_bytes for d in DTYPES for layout in LAYOUTS
        ]
        for i, (dtype, layout, size) in enumerate(cases * 50):
            if time.monotonic() - start > seconds:
                break
            x = backend.make(dtype, layout, size, seed=i)
            expect = digest(x if backend.name == "torch" else x.view)
            t0 = time.perf_counter()
            message = at.encode(x)
            answer = peer.decode(message, expect=expect, hold=i % 7 == 0)
            timings.setdefault(str(size), []).append(time.perf_counter() - t0)
            sent += 1
            kind = message[1].get("at.kind")
            if not answer.get("ok") or kind != "cuda":
                failures.append(
                    {"case": f"{dtype}/{layout}/{size}", "kind": kind, "answer": answer}
                )
                if len(failures) >= 10:
                    break
            del x, message
            if i % 21 == 20:
                peer.ask("release")
        peer.ask("release")
        stats = peer.ask("stats")
        report["peer_open_handles"] = stats.get("handles")
        deadline = time.monotonic() + 10
        while _ipc.in_flight() and time.monotonic() < deadline:
            time.sleep(0.01)
        report["in_flight_at_end"] = _ipc.in_flight()
        _ipc.close_all(0)
        report["leftover"] = backend.settle() - baseline
    finally:
        peer.close()
    report.update(
        messages=sent,
        seconds=round(time.monotonic() - start, 2),
        failures=failures,
        round_trip_ms_median={
            size: round(1e3 * sorted(ts)[len(ts) // 2], 3) for size, ts in timings.items()
        },
    )
    report["passed"] = (
        sent > 0
        and not failures
        and report["peer_open_handles"] == 0
        and report["in_flight_at_end"] == 0
        and report["leftover"] <= 0
    )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--backend", choices=("torch", "standin"), default="torch")
    parser.add_argument("--max-bytes", type=int, default=SIZES[-1])
    args = parser.parse_args()
    backend = Torch() if args.backend == "torch" else StandIn()
    report = run(backend, args.seconds, args.max_bytes)
    text = json.dumps(report, indent=2, default=str)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    verdict = "PASS" if report["passed"] else "FAIL"
    print(
        f"smoke: {verdict}: {report['messages']} messages in {report['seconds']} s on "
        f"{report['device']}, {len(report['failures'])} failures, "
        f"{report['peer_open_handles']} handles left open, "
        f"{report['in_flight_at_end']} in flight, leftover {report['leftover']}"
    )
    if not report["passed"]:
        print(text[-6000:])
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
