"""The two-process harness of tests/gpu (``ipc_peer.py``, ``pair.py``, ``smoke.py``), run on
the host stand-in: the GPU checks' own logic is tested where there is no GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest

GPU_DIR = Path(__file__).parents[2] / "gpu"
sys.path.insert(0, str(GPU_DIR))

from ipc_peer import digest  # noqa: E402
from pair import Peer  # noqa: E402


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer(timeout=60)
    yield p
    p.close()


def test_the_smoke_check_passes_on_the_stand_in(tmp_path: Path) -> None:
    report_path = tmp_path / "smoke.json"
    done = subprocess.run(
        [
            sys.executable,
            str(GPU_DIR / "smoke.py"),
            "--backend=standin",
            "--seconds=3",
            "--max-bytes=65536",
            f"--json={report_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["passed"]
    assert report["messages"] > 50
    assert report["peer_open_handles"] == report["in_flight_at_end"] == 0
    assert "smoke: PASS" in done.stdout


def test_the_peer_compares_bytes_and_reports_a_mismatch(sb: Any, peer: Peer) -> None:
    x = sb.allocator.asarray(np.arange(60, dtype=np.int16).reshape(6, 10))
    message = at.encode(x.T)
    answer = peer.ok(peer.decode(message, expect=digest(x.view.T)))
    assert answer["kind"] == "numpy"
    assert answer["strides"] == [1, 10]  # the producer's layout, kept
    wrong = peer.decode(message, expect=digest(x.view))  # same bytes, other shape
    assert not wrong["ok"]


def test_the_peer_tries_writes_and_resends(sb: Any, peer: Peer) -> None:
    x = sb.allocator.asarray(np.arange(16, dtype=np.float32))
    peer.ok(peer.decode(at.encode(x), hold=True, expect=digest(x.view)))
    refused = peer.ok(peer.ask("write"))
    assert refused["wrote"] is False  # a received view is read-only
    peer.ok(peer.decode(at.encode(x), writable=True, hold=True, expect=digest(x.view)))
    assert peer.ok(peer.ask("write"))["wrote"] is True
    assert digest(x.view) == digest(np.arange(16, dtype=np.float32))  # the producer's intact
    again = peer.ok(peer.ask("resend"))
    array = pa.array(np.frombuffer(bytes.fromhex(again["array"]), np.uint8))
    back = at.decode(array, again["meta"])
    assert back[0] == 1.0  # the peer's private copy, as it wrote it


def test_the_peer_decodes_with_every_option(sb: Any, peer: Peer) -> None:
    x = sb.allocator.asarray(np.arange(8, dtype=np.uint8))
    peer.ok(peer.decode(at.encode(x, checksum=True), verify=True, expect=digest(x.view)))
    answer = peer.ok(peer.decode(at.encode(x), device="cpu", expect=digest(x.view)))
    assert answer["device"] == "cpu"
    peer.ok(peer.ask("release"))
    assert peer.ok(peer.ask("stats"))["handles"] == 0
    failing = peer.decode((pa.array(np.zeros(3, np.uint8)), {"at.version": 2}))
    assert not failing["ok"]
    assert failing["error"].startswith("MetadataError")


def test_big_host_messages_reach_the_peer_through_a_file(peer: Peer) -> None:
    x = np.arange(1 << 19, dtype=np.float32)  # 2 MiB: more than a JSON line should carry
    answer = peer.ok(peer.decode(at.encode(x), expect=digest(x)))
    assert answer["kind"] == "numpy"
    assert any("array_file" in line for line in peer.log)
