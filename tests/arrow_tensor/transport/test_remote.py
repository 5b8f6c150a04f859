"""Receivers on other machines: message caps per route, pacing, lost chunks found in bounded time.

dora's cross-machine path refuses more than 64 MiB per message and silently lost messages
well under that when sent back to back (benchmarks/README.md, "Across machines"); the
integration tests in tests/integration/test_machines.py run a real two-daemon cluster.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import arrow_tensor as at
import numpy as np
import pytest
from arrow_tensor import Receiver, send
from arrow_tensor.memory import Identity, _blocks
from arrow_tensor.node import Node
from arrow_tensor.transport import _chunks, _facts
from dora.testing import MockNode
from dora_like import DoraLikeNode

MiB = 1 << 20
DATAFLOW = str(uuid.UUID(int=0xC0FFEE))
DESCRIPTOR = {
    "nodes": [
        {"id": "cam", "inputs": {}, "deploy": {"machine": "A"}},
        {"id": "near", "inputs": {"x": "cam/local"}, "deploy": {"machine": "A"}},
        {"id": "far", "inputs": {"x": "cam/out"}, "deploy": {"machine": "B"}},
    ]
}


@pytest.fixture(autouse=True)
def camera_on_machine_a(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DORA_MACHINE_ID", "A")
    _blocks.set_identity(Identity(DATAFLOW, "cam"))
    yield
    _blocks.set_identity(None)
    _facts._STATES.clear()


def camera() -> DoraLikeNode:
    return DoraLikeNode([], dataflow_descriptor=DESCRIPTOR, dataflow_id=DATAFLOW)


def test_a_remote_route_has_its_own_cap_and_rate_and_a_local_one_keeps_dora_s() -> None:
    node = camera()
    remote = _facts.state_of(node, "out").facts
    assert [p.node_id for p in remote.remote] == ["far"]
    assert remote.message_cap == _facts.REMOTE_MESSAGE_CAP == 32 * MiB
    assert remote.remote_rate == _facts.REMOTE_RATE
    local = _facts.state_of(node, "local").facts
    assert local.remote == ()
    assert local.message_cap == _facts.DORA_MESSAGE_CAP
    assert local.remote_rate is None


def test_the_remote_cap_and_rate_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARROW_TENSOR_REMOTE_MESSAGE_BYTES", "8MiB")
    monkeypatch.setenv("ARROW_TENSOR_REMOTE_RATE", "100MiB")
    facts = _facts.state_of(camera(), "out").facts
    assert facts.message_cap == 8 * MiB
    assert facts.remote_rate == 100 * MiB


def test_values_past_the_remote_cap_are_chunked_to_fit_and_said_once() -> None:
    node = camera()
    value = np.arange(10 * MiB, dtype=np.float32)  # 40 MiB: one message on one machine
    assert send(node, "out", value) == "chunked"
    assert send(node, "local", value) in ("raw", "inline")
    remote = [(a, m) for out, a, m, _ in node.sent if out == "out"]
    assert len(remote) == 2
    for array, _ in remote:  # every message fits the remote cap, its bitmap counted
        assert array.nbytes + len(array) // 8 <= 32 * MiB
    rx = Receiver()
    values = [rx.receive(a, m) for a, m in remote]
    assert np.array_equal(values[-1], value)
    send(node, "out", np.zeros(4))
    said = [log["message"] for log in node.logs if "other machines" in log["message"]]
    assert len(said) == 1
    assert "'far' on 'B'" in said[0]
    assert "32 MiB" in said[0]


def test_sends_toward_other_machines_are_paced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARROW_TENSOR_REMOTE_RATE", "10MiB")
    clock = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(_facts.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(_facts.time, "sleep", sleep)
    node = camera()
    for _ in range(3):
        send(node, "out", np.zeros(MiB // 8))  # 1 MiB each: 0.1 s at 10 MiB/s
        send(node, "local", np.zeros(MiB // 8))  # the local output is never held back
    assert slept == pytest.approx([0.1, 0.1])


def test_an_incomplete_chunked_value_expires_with_a_reason() -> None:
    node = DoraLikeNode([])
    send(node, "out", np.arange(1 << 16), transport="chunked")
    first = node.sent[0]
    reassembler = _chunks.Reassembler(idle_s=5.0)
    assert reassembler.add(first[1], first[2]) is None
    expiry = reassembler.next_expiry()
    assert expiry is not None
    assert reassembler.expired(now=expiry - 0.1) == []
    (text,) = reassembler.expired(now=expiry)
    assert "no chunk for 5 s after chunk 1 of" in text
    assert reassembler.pending == 0
    for _, array, meta, _ in node.sent[1:]:  # the rest, late: ignored, not an error
        assert reassembler.add(array, meta) is None


class IdleMock(MockNode):
    """A MockNode whose ``"IDLE"`` event waits out the timeout, as a real node does."""

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        event = super().next(timeout)
        if event is not None and event.get("id") == "IDLE":
            assert timeout is not None, "a node with an incomplete value must not block forever"
            time.sleep(timeout)
            return {"type": "ERROR", "error": "Timeout event stream error: Receiver timed out"}
        return event


def test_a_node_reports_a_value_that_lost_a_chunk_within_the_timeout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ARROW_TENSOR_CHUNK_TIMEOUT", "200ms")
    sender = DoraLikeNode([])
    send(sender, "out", np.arange(1 << 16), transport="chunked")
    _, array, meta, _ = sender.sent[0]  # the others are lost
    later, later_meta = at.encode(np.arange(3))
    events = [
        {"type": "INPUT", "id": "x", "value": array, "metadata": meta},
        {"type": "INPUT", "id": "IDLE", "value": None, "metadata": {}},
        {"type": "INPUT", "id": "x", "value": later, "metadata": later_meta},
    ]
    started = time.monotonic()
    node = Node(IdleMock(events))
    values = [v.tolist() for _, v, _ in node]
    assert values == [[0, 1, 2]]
    assert node.errors == {"x": 1}
    assert time.monotonic() - started < 5  # bounded: the timeout, not dora's stream end
    assert "no chunk for 0.2 s" in capsys.readouterr().err
