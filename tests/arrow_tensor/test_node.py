"""The node API: event loop, decoding, error counting, draining and the function style."""

from __future__ import annotations

from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
from arrow_tensor.node import Input, Node, run

dora_testing = pytest.importorskip("dora.testing")


class RecordingMock(dora_testing.MockNode):
    """MockNode that also records the metadata of every send (MockNode drops it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[str, Any, dict[str, Any]]] = []

    def send_output(self, output_id: str, data: Any, metadata: Any = None) -> None:
        self.sent.append((output_id, data, dict(metadata or {})))
        super().send_output(output_id, data, metadata)

    def decoded(self) -> list[tuple[str, Any, dict[str, Any]]]:
        user = [{k: v for k, v in m.items() if not k.startswith("at.")} for _, _, m in self.sent]
        return [(o, at.decode(d, m), u) for (o, d, m), u in zip(self.sent, user, strict=True)]


def tensor_event(input_id: str, value: Any, **metadata: Any) -> dict[str, Any]:
    array, meta = at.encode(value)
    meta.update(metadata)
    return {"type": "INPUT", "id": input_id, "value": array, "metadata": meta}


def test_iteration_decodes_and_strips_our_keys() -> None:
    mock = RecordingMock(
        [
            tensor_event("x", np.arange(3.0), frame_id=7, timestamp="dora's"),
            tensor_event("y", {"a": np.ones(2, np.int8), "n": None}),
        ]
    )
    node = Node(mock)
    items = list(node)
    assert [i.id for i in items] == ["x", "y"]
    input_id, value, metadata = items[0]
    assert (input_id, value.tolist(), metadata) == ("x", [0.0, 1.0, 2.0], {"frame_id": 7})
    assert items[0].timestamp == "dora's"
    assert not value.flags.writeable
    assert items[1].value["a"].tolist() == [1, 1]
    assert items[1].value["n"] is None
    assert node.finished
    assert node.received == {"x": 1, "y": 1}


def test_writable_option_gives_private_copies() -> None:
    node = Node(RecordingMock([tensor_event("x", np.arange(3.0))]), writable=True)
    (item,) = list(node)
    item.value[0] = 5.0
    assert item.value.flags.writeable


def test_send_encodes_values_and_metadata() -> None:
    mock = RecordingMock([])
    node = Node(mock, checksum=True)
    node.send("out", {"boxes": np.zeros((2, 4), np.float32)}, frame_id=3, tags=["a", "b"])
    ((output, value, metadata),) = mock.decoded()
    assert output == "out"
    assert value["boxes"].shape == (2, 4)
    assert metadata == {"frame_id": 3, "tags": ["a", "b"]}
    assert "at.checksum" in mock.sent[0][2]
    with pytest.raises(at.MetadataError, match="reserved"):
        node.send("out", np.zeros(1), **{"at.kind": "x"})


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"type": "INPUT", "id": "x", "value": pa.array([1]), "metadata": {}}, "NotATensor"),
        (
            {
                "type": "INPUT",
                "id": "x",
                "value": pa.array(["1.5"]),
                "metadata": at.encode(np.zeros(1))[1],
            },
            "PayloadError",
        ),
        (
            {
                "type": "INPUT",
                "id": "x",
                "value": pa.array([1], pa.uint64()),
                "metadata": {**at.encode(np.zeros(1))[1], "at.version": 99},
            },
            "VersionError",
        ),
    ],
    ids=["foreign", "wrong-array", "version"],
)
def test_bad_messages_are_logged_once_counted_and_skipped(
    bad: dict[str, Any], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [bad, tensor_event("x", np.arange(2)), bad, bad]
    node = Node(RecordingMock(events), foreign="error")
    values = [v.tolist() for _, v, _ in node]
    assert values == [[0, 1]]
    assert node.errors == {"x": 3}
    lines = capsys.readouterr().err.splitlines()
    logged = [line for line in lines if "skipped a message on input 'x'" in line]
    assert len(logged) == 1, lines  # once per input and reason, then counted
    assert reason in logged[0]
    assert any(f"input 'x': 3 messages skipped ({reason}" in line for line in lines), lines


def test_checksum_failures_are_skipped_with_verify() -> None:
    array, meta = at.encode(np.arange(4), checksum=True)
    meta["at.checksum"] = "xxh3_64:0000000000000000"
    node = Node(
        RecordingMock([{"type": "INPUT", "id": "x", "value": array, "metadata": meta}]), verify=True
    )
    assert list(node) == []
    assert node.errors["x"] == 1


def test_inputs_queued_behind_stop_are_still_delivered() -> None:
    # dora delivers STOP / INPUT_CLOSED ahead of still-queued inputs.
    events = [
        tensor_event("x", np.array([0])),
        {"type": "INPUT_CLOSED", "id": "x"},
        {"type": "STOP", "id": "ALL_INPUTS_CLOSED"},
        tensor_event("x", np.array([1])),
        tensor_event("x", np.array([2])),
    ]
    node = Node(RecordingMock(events))
    assert [int(v[0]) for _, v, _ in node] == [0, 1, 2]
    assert node.closed == {"x"}
    assert node.finished


class TickingMock(RecordingMock):
    """A node whose timer input ticks forever after its scripted events (a dora timer)."""

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        event = super().next(timeout)
        if event is None or event.get("type") == "STOP":
            return {"type": "INPUT", "id": "tick", "value": pa.array([0]), "metadata": {}}
        return event

    def __next__(self) -> dict[str, Any]:
        event = self.next()
        assert event is not None
        return event


def test_loop_ends_when_data_inputs_close_although_timers_tick() -> None:
    config = {"inputs": {"x": {"source": "cam/out"}, "tick": "dora/timer/millis/10"}}
    events = [
        tensor_event("x", np.array([0])),
        {"type": "INPUT", "id": "tick", "value": pa.array([0]), "metadata": {}},
        {"type": "INPUT_CLOSED", "id": "x"},
        tensor_event("x", np.array([1])),
    ]
    node = Node(TickingMock(events, node_config=config), drain_timeout=0.05)
    seen = [(i.id, None if i.value is None else int(i.value[0])) for i in node]
    assert seen == [("x", 0), ("tick", None), ("x", 1)]
    assert node.finished


def test_recv_timeout_returns_none_without_finishing() -> None:
    class Idle(RecordingMock):
        def next(self, timeout: float | None = None) -> dict[str, Any] | None:
            # What dora returns when next(timeout=...) expires.
            return {"type": "ERROR", "error": "Timeout event stream error: Receiver timed out"}

    node = Node(Idle([]))
    assert node.recv(timeout=0.01) is None
    assert not node.finished


def test_raw_inputs_pass_through_undecoded() -> None:
    value = pa.array([1, 2, 3])
    node = Node(
        RecordingMock([{"type": "INPUT", "id": "r", "value": value, "metadata": {"k": 1}}]),
        raw_inputs=["r"],
    )
    (item,) = list(node)
    assert item.value is value
    assert item.metadata == {"k": 1}


def test_input_unpacks_as_three_fields() -> None:
    input_id, value, metadata = Input("x", 1, {"a": 2}, timestamp="t")
    assert (input_id, value, metadata) == ("x", 1, {"a": 2})


def test_run_calls_the_function_and_forwards_metadata() -> None:
    def normalize(x: np.ndarray, metadata: dict[str, Any]) -> np.ndarray | None:
        if metadata["frame_id"] == 1:
            return None  # sends nothing
        metadata["scale"] = 2.0
        return (x * 2).T

    mock = RecordingMock(
        [
            tensor_event("image", np.arange(6.0).reshape(2, 3), frame_id=0),
            tensor_event("image", np.arange(6.0).reshape(2, 3), frame_id=1),
            tensor_event("other", np.arange(6.0).reshape(2, 3), frame_id=2),
        ]
    )
    node = run(normalize, output="normalized", inputs=["image"], node=mock)
    sent = mock.decoded()
    assert len(sent) == 1
    output, value, metadata = sent[0]
    assert output == "normalized"
    assert value.tolist() == (np.arange(6.0).reshape(2, 3) * 2).T.tolist()
    assert metadata == {"frame_id": 0, "scale": 2.0}
    assert node.received == {"image": 2, "other": 1}


def test_multi_message_values_are_reassembled_and_incomplete_ones_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from arrow_tensor.transport import _decide, _facts

    # A tiny message cap makes the transport split a 40 kB tensor into several chunks.
    monkeypatch.setattr(_facts, "DORA_MESSAGE_CAP", _decide.IPC_SLACK + 64 + 8192)
    value = np.arange(5000, dtype=np.int64)
    first, second = RecordingMock([]), RecordingMock([])
    Node(first).send("out", value, frame_id=1)
    Node(second).send("out", value, frame_id=2)
    first_chunks = [
        {"type": "INPUT", "id": "x", "value": d, "metadata": m} for _, d, m in first.sent
    ]
    second_chunks = [
        {"type": "INPUT", "id": "x", "value": d, "metadata": m} for _, d, m in second.sent
    ]
    assert len(first_chunks) > 2
    node = Node(RecordingMock(first_chunks + second_chunks[:-1]))
    items = list(node)
    assert len(items) == 1
    assert items[0].value.tolist() == value.tolist()
    assert items[0].metadata == {"frame_id": 1}
    assert node.errors["x"] == 1
    assert "IncompleteTransferError" in capsys.readouterr().err


class WarningMock(dora_testing.MockNode):
    """MockNode that keeps dora's log warnings."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warnings: list[str] = []

    def log_warn(self, message: str) -> None:
        self.warnings.append(message)


def test_sequence_gaps_and_late_messages_are_warned_once_and_counted() -> None:
    seqs = [0, 1, 4, 5, 3, 8, 8]
    events = [tensor_event("x", np.full(2, s), **{"at.seq": s, "s": s}) for s in seqs]
    config = {"inputs": {"x": {"source": "cam/frame", "queue_size": 5}}}
    mock = WarningMock(events, node_config=config)
    node = Node(mock)
    got = [m["s"] for _, _, m in node]
    assert got == seqs  # nothing is held back or reordered by the Node
    assert node.lost == {"x": 3}  # 2 (then 3 arrived late), 6, 7
    assert node.reordered == {"x": 1}
    assert node.duplicates == {"x": 1}
    gaps = [w for w in mock.warnings if "never arrived" in w]
    assert len(gaps) == 1
    assert "input 'x' (from cam/frame): messages 2-3 never arrived" in gaps[0]
    assert "queue_size 5" in gaps[0]
    assert "queue_size: 100}" in gaps[0]
    late = [w for w in mock.warnings if "arrived after later ones" in w]
    assert len(late) == 1
    assert "shared_memory_pool_size of node cam" in late[0]
    assert mock.warnings[-1].endswith(
        "input 'x' (from cam/frame): 7 messages received, 3 lost (2, 6-7), 1 out of order, "
        "1 duplicated"
    )


def test_metadata_seq_is_not_handed_to_the_user_and_sends_are_numbered() -> None:
    mock = RecordingMock([tensor_event("x", np.zeros(2), **{"at.seq": 0})])
    node = Node(mock)
    (item,) = list(node)
    assert "at.seq" not in item.metadata
    for _ in range(3):
        node.send("out", np.zeros(3))
    assert [m["at.seq"] for _, _, m in mock.sent] == [0, 1, 2]
