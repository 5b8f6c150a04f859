"""Relay-safe handles: a handle goes only where every receiver has shown it can open the pool.

Note [Relay-safe handles] in memory._host_pool. One process plays every node (the identity
is switched around each decode), as in test_host_pool.py, but nothing here trusts the
dataflow descriptor: receivers prove themselves by opening the pool a probe names.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
from arrow_tensor import pool
from arrow_tensor.memory import Identity, _blocks, _host_mapped, _host_pool
from arrow_tensor.transport import _facts
from dora.testing import MockNode

if not _blocks.available():
    pytest.skip("POSIX shared memory (/dev/shm) is not available", allow_module_level=True)

DATAFLOW = str(uuid.UUID(int=0xFEEDFACE0123456789ABCDEF01234567))
HEX = uuid.UUID(DATAFLOW).hex


def descriptor(*receivers: str) -> dict[str, Any]:
    nodes = [{"id": "prod", "inputs": {}}]
    nodes += [{"id": r, "inputs": {"x": "prod/out"}} for r in receivers]
    return {"nodes": [*nodes, {"id": "far", "inputs": {"x": "echo/x"}}]}


class RecordingNode(MockNode):
    def __init__(self, *receivers: str) -> None:
        super().__init__([], dataflow_descriptor=descriptor(*receivers), dataflow_id=DATAFLOW)
        self.sent: list[tuple[str, Any, dict[str, Any]]] = []

    def send_output(self, output_id: str, data: Any, metadata: Any = None) -> None:
        self.sent.append((output_id, data, dict(metadata or {})))


@pytest.fixture(autouse=True)
def producer_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("ARROW_TENSOR_SHM_TRUST", raising=False)
    _blocks.set_identity(Identity(DATAFLOW, "prod"))
    yield
    pool.close()
    _OPENED.clear()
    _host_mapped.forget_pools()
    _host_mapped._refused.clear()
    _blocks.set_identity(None)
    _facts._STATES.clear()
    leftovers = [n for n in os.listdir(_blocks.SHM_DIR) if n.startswith(f"at-{HEX}-")]
    assert leftovers == [], "a test left pool files in /dev/shm"


def receive_as(node_id: str, message: tuple[str, Any, dict[str, Any]], rx: Any = None) -> Any:
    """Decode ``message`` as node ``node_id`` would, then become the producer again.

    One process plays every node, so each keeps its own cache of opened pools (a receiver
    process opens a pool once, for itself).
    """
    opened = _host_mapped._mapped
    own = _OPENED.setdefault(node_id, {})
    others = dict(opened)
    opened.clear()
    opened.update(own)
    _blocks.set_identity(Identity(DATAFLOW, node_id))
    try:
        if rx is not None:
            return rx.receive(message[1], message[2])
        return at.decode(message[1], message[2])
    finally:
        own.clear()
        own.update(opened)
        opened.clear()
        opened.update(others)
        _blocks.set_identity(Identity(DATAFLOW, "prod"))


_OPENED: dict[str, dict[str, Any]] = {}


def loan_and_send(node: RecordingNode, fill: int) -> str:
    t = pool.loan(node, "out", (256,), np.int32)
    t[:] = fill
    route = pool.send(node, "out", t, {"fill": fill})
    del t
    return route


def test_handles_start_once_every_receiver_has_opened_the_pool() -> None:
    node = RecordingNode("rx1", "rx2")
    assert loan_and_send(node, 1) == "message"  # nobody has shown anything yet
    first = node.sent[-1]
    assert first[2]["at.kind"] == "tensor"
    assert first[2]["at.shm.probe"].startswith(f"at-{HEX}-")
    assert np.array_equal(receive_as("rx1", first), np.full(256, 1, np.int32))
    assert loan_and_send(node, 2) == "message"  # rx2 has not opened it yet
    for message in node.sent:
        assert np.array_equal(receive_as("rx2", message), np.full(256, message[2]["fill"]))
    assert loan_and_send(node, 3) == "shm"
    handle = node.sent[-1]
    assert "at.shm.probe" not in handle[2]
    for rx in ("rx1", "rx2"):
        assert np.array_equal(receive_as(rx, handle), np.full(256, 3, np.int32))
    warnings = [log["message"] for log in node.logs if "have not opened" in log["message"]]
    assert len(warnings) == 1
    assert "['rx1', 'rx2']" in warnings[0]


def test_behind_a_relay_every_value_travels_in_its_message() -> None:
    node = RecordingNode("echo")
    far = at.Receiver()
    for fill in range(5):
        assert loan_and_send(node, fill) == "message"
        # dora-echo forwards value and metadata unchanged; "far" is no receiver of the pool.
        forwarded = node.sent[-1]
        assert np.array_equal(receive_as("far", forwarded, far), np.full(256, fill, np.int32))
    probe = node.sent[-1][2]["at.shm.probe"]
    assert _host_mapped._refused.get(probe) is True  # tried once, then skipped
    assert probe not in _host_mapped._mapped


def test_a_tensor_past_the_message_cap_goes_in_chunks_until_proven(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_facts, "DORA_MESSAGE_CAP", 1 << 20)
    monkeypatch.setenv("ARROW_TENSOR_SHM_MIN_BYTES", "1MiB")
    node = RecordingNode("echo")
    value = np.arange(3 << 18, dtype=np.float32)  # 3 MiB: the pool's, or three chunks
    assert at.send(node, "out", value) == "chunked"
    assert len(node.sent) > 1
    assert all("at.shm.probe" in meta for _, _, meta in node.sent)
    far = at.Receiver()
    out = [receive_as("far", message, far) for message in node.sent]
    assert np.array_equal(out[-1], value)
    assert all(v is None for v in out[:-1])


def test_the_descriptor_can_be_trusted_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARROW_TENSOR_SHM_TRUST", "descriptor")
    node = RecordingNode("rx1")
    assert loan_and_send(node, 1) == "shm"
    assert np.array_equal(receive_as("rx1", node.sent[-1]), np.full(256, 1, np.int32))


def test_a_probe_never_raises_and_hostile_names_are_only_remembered() -> None:
    array, meta = at.encode(np.arange(3))
    for name in ("../../etc/passwd", f"at-{HEX}-1-{'0' * 32}", "x" * 300):
        assert at.decode(array, {**meta, "at.shm.probe": name}).tolist() == [0, 1, 2]
        assert _host_mapped._refused.get(name) is True
    assert at.decode(array, {**meta, "at.shm.probe": 7}).tolist() == [0, 1, 2]


def test_a_pool_only_probed_is_closed_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_host_pool, "LINGER_S", 5.0)
    node = RecordingNode("echo")
    loan_and_send(node, 1)
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 1.0


def test_a_receiver_sees_its_own_probe_message_exactly_as_sent() -> None:
    node = RecordingNode("rx1")
    t = pool.loan(node, "out", (4, 5), np.float64)
    t[...] = np.arange(20).reshape(4, 5)
    expected = t.copy()
    assert pool.send(node, "out", t) == "message"
    del t
    _, array, meta = node.sent[-1]
    assert meta["at.kind"] == "tensor"
    assert isinstance(array, pa.Array)
    assert len(array) == 20
    got = receive_as("rx1", node.sent[-1])
    assert np.array_equal(got, expected)
