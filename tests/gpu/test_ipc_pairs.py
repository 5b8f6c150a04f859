"""CUDA IPC between two processes on a real GPU, without dora: the cases dataflows cannot pin.

Every test starts a receiving process (``ipc_peer.py``) and checks what it decoded against
what this process sent, byte for byte. Producers that need another allocator configuration
(expandable segments, ``cudaMallocAsync``) run in their own process too, because the
allocator is configured before CUDA starts. On failure the peer's requests, answers and
stderr are in the assertion message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ipc_peer import digest
from pair import Peer

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]


@pytest.fixture
def torch() -> Any:
    import torch

    assert torch.cuda.is_available(), "GPU tests must not run without a CUDA device"
    return torch


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer(timeout=120)
    yield p
    p.close()


def _in_flight_settles() -> int:
    from arrow_tensor.memory.cuda import _ipc

    deadline = time.monotonic() + 10
    while _ipc.in_flight() and time.monotonic() < deadline:
        time.sleep(0.01)
    return _ipc.in_flight()


def test_the_receiver_waits_for_the_producers_kernels(torch: Any, peer: Peer) -> None:
    """Fill after a long kernel, send at once: the receiver's stream waits on the event."""
    import arrow_tensor as at

    x = torch.zeros(1 << 20, device="cuda")
    torch.cuda._sleep(int(200e6))  # a busy kernel of a few tens of ms on this stream
    x.fill_(7.0)
    message = at.encode(x)  # no synchronize: the event orders the receiver after the fill
    answer = peer.ok(peer.decode(message, expect=digest(torch.full((1 << 20,), 7.0))))
    assert answer["kind"] == "torch"
    assert message[1]["at.kind"] == "cuda"
    assert message[1]["at.cuda.event"] is True


def test_a_producer_on_a_side_stream(torch: Any, peer: Peer) -> None:
    import arrow_tensor as at

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.empty(4096, device="cuda")
        torch.cuda._sleep(int(100e6))
        x.fill_(3.0)
        message = at.encode(x)  # the event is recorded on the side stream, current here
    peer.ok(peer.decode(message, expect=digest(torch.full((4096,), 3.0))))


def test_cupy_arrays_travel_as_handles(peer: Peer) -> None:
    cupy = pytest.importorskip("cupy")
    import arrow_tensor as at

    x = cupy.arange(3 * 1024, dtype=cupy.float32).reshape(3, 1024)[:, ::2]
    message = at.encode(x)
    assert message[1]["at.kind"] == "cuda"
    answer = peer.ok(peer.decode(message, expect=digest(cupy.ascontiguousarray(x))))
    assert answer["kind"] == "cupy"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_decode_onto_a_device(torch: Any, peer: Peer, device: str) -> None:
    import arrow_tensor as at

    x = torch.arange(1000, device="cuda", dtype=torch.int64)
    answer = peer.ok(peer.decode(at.encode(x), device=device, expect=digest(x)))
    assert answer["kind"] == "torch"
    assert answer["device"].startswith(device)


def test_writable_is_a_private_copy_and_verify_checks_the_bytes(torch: Any, peer: Peer) -> None:
    import arrow_tensor as at

    x = torch.arange(4096, device="cuda", dtype=torch.float32).view(64, 64).t()
    before = digest(x)
    peer.ok(peer.decode(at.encode(x, checksum=True), verify=True, expect=before))
    peer.ok(peer.decode(at.encode(x), writable=True, hold=True, expect=before))
    assert peer.ok(peer.ask("write"))["wrote"]
    torch.cuda.synchronize()
    assert digest(x) == before, "a write into the private copy reached the producer"


def test_a_received_tensor_can_be_sent_on(torch: Any, peer: Peer) -> None:
    """Memory received from another process cannot be re-exported: it is copied first."""
    import arrow_tensor as at
    import numpy as np
    import pyarrow as pa

    x = torch.randn(256, 256, device="cuda").to(torch.bfloat16)
    peer.ok(peer.decode(at.encode(x), hold=True, expect=digest(x)))
    again = peer.ok(peer.ask("resend"))
    assert again["meta"]["at.kind"] == "cuda"
    array = pa.array(np.frombuffer(bytes.fromhex(again["array"]), np.uint8))
    back = at.decode(array, again["meta"])  # memory of the peer's, opened here
    assert digest(back) == digest(x)


def test_memory_is_back_at_its_baseline_after_every_receiver_released(
    torch: Any, peer: Peer
) -> None:
    """Nothing stays referenced for a receiver that released: the allocator gets it all."""
    import arrow_tensor as at

    assert _in_flight_settles() == 0  # what earlier tests sent is given back first
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    for i in range(50):
        x = torch.full((1 << 18,), float(i), device="cuda")
        peer.ok(peer.decode(at.encode(x), hold=i % 5 == 0, expect=digest(x)))
        del x
    peer.ok(peer.ask("release"))
    assert _in_flight_settles() == 0
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline
    assert peer.ok(peer.ask("stats"))["handles"] == 0


PRODUCER = textwrap.dedent(
    """
    import json, sys
    import torch
    import arrow_tensor as at
    from dora.testing import MockNode

    class Recorder(MockNode):
        def __init__(self):
            super().__init__([])
            self.kinds = []
        def send_output(self, output_id, data, metadata=None):
            self.kinds.append(metadata["at.kind"])

    node = Recorder()
    source = sys.argv[1]
    if source == "dlpack":
        import cupy
        x = torch.from_dlpack(cupy.arange(4096, dtype=cupy.float32))
    else:
        x = torch.arange(4096, device="cuda", dtype=torch.float32)
    route = at.send(node, "out", x)
    torch.cuda.synchronize()
    logs = [entry["message"] for entry in node.logs]
    print(json.dumps({"route": route, "kinds": node.kinds, "logs": logs}))
    """
)


@pytest.mark.parametrize(
    ("source", "alloc_conf"),
    [
        ("torch", "expandable_segments:True"),
        ("torch", "backend:cudaMallocAsync"),
        ("dlpack", ""),
    ],
    ids=["expandable-segments", "cudaMallocAsync", "dlpack-imported"],
)
def test_memory_legacy_ipc_cannot_share_takes_the_host_path(
    torch: Any, source: str, alloc_conf: str
) -> None:
    if source == "dlpack":
        pytest.importorskip("cupy")
    done = subprocess.run(
        [sys.executable, "-c", PRODUCER, source],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": alloc_conf},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["route"] in ("inline", "raw"), result
    assert result["kinds"] == ["tensor"], result
    assert any("host path" in line for line in result["logs"]), result  # said, once
