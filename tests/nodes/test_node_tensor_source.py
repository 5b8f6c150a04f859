"""nodes/tensor_source and nodes/validator driven by dora.testing.MockNode (no daemon)."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
from arrow_tensor import testing as tt
from dora.testing import MockNode
from node_helpers import load_node

source_node = load_node("tensor_source")
validator_node = load_node("validator")


class AckingMock(MockNode):
    """A source's view of dora: every tensor it sends is acked, STOP after ``stop_after``."""

    def __init__(self, stop_after: int | None = None, ack: bool = True) -> None:
        super().__init__([])
        self.queue: deque[dict[str, Any]] = deque()
        self.sent: list[tuple[str, pa.Array, dict[str, Any]]] = []
        self.stop_after, self.ack = stop_after, ack

    def send_output(self, output_id: str, data: Any, metadata: Any = None) -> None:
        super().send_output(output_id, data, metadata)
        meta = dict(metadata or {})
        self.sent.append((output_id, data, meta))
        seq = -1 if meta.get(tt.KEY_HELLO) else meta.get(tt.KEY_SEQ)
        if self.ack and seq is not None:
            self.queue.append({"type": "INPUT", "id": "ack", "value": pa.array([seq])})
        if self.stop_after is not None and seq == self.stop_after - 1:
            self.queue.append({"type": "STOP", "id": "MANUAL"})

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        return self.queue.popleft() if self.queue else None

    def try_recv(self) -> dict[str, Any] | None:
        return self.next()


@pytest.fixture
def small_env(monkeypatch: pytest.MonkeyPatch) -> list[tt.Case]:
    monkeypatch.setenv("SEED", "4")
    monkeypatch.setenv("CASES", "*/float16/*,numpy/bool/*")
    monkeypatch.setenv("SIZES", "0,4KiB")
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("WINDOW", "2")
    return tt.select_cases(["*/float16/*", "numpy/bool/*"], (0, 4096))


def test_source_says_hello_sends_every_case_then_an_end_marker(small_env):
    node = AckingMock()
    summary = source_node.main(node)
    assert summary["sent"] == len(small_env)
    assert not summary["stopped"]
    outputs = {output for output, _, _ in node.sent}
    assert outputs == {"tensors"}
    hello, *tensors, end = node.sent
    assert hello[2][tt.KEY_HELLO] is True
    assert end[2][tt.KEY_END] is True
    assert end[2][tt.KEY_TOTAL] == len(small_env)
    for seq, ((_, array, meta), case) in enumerate(zip(tensors, small_env, strict=True)):
        assert meta[tt.KEY_CASE] == case.id
        assert meta[tt.KEY_SEQ] == seq
        assert meta[tt.KEY_SEED] == 4
        assert meta[tt.KEY_TOTAL] == len(small_env)
        received = at.decode(array, meta, verify=True)  # checksums on by default
        assert tt.describe_mismatch(tt.make_tensor(case, 4, seq), received) is None


def test_source_stops_on_stop_and_announces_what_it_sent(small_env):
    node = AckingMock(stop_after=3)
    summary = source_node.main(node)
    assert summary == {**summary, "sent": 3, "stopped": True}
    assert node.sent[-1][2][tt.KEY_TOTAL] == 3


def test_source_window_waits_for_acks_then_gives_up(small_env, monkeypatch, capsys):
    monkeypatch.setenv("ACK_TIMEOUT", "50ms")
    node = AckingMock(ack=False)
    summary = source_node.main(node)
    assert summary["sent"] == len(small_env)  # flow control switched off, all sent anyway
    assert "no ack from the validator for 0.05s" in capsys.readouterr().out


def test_source_rejects_bad_settings_before_joining_dora(monkeypatch):
    monkeypatch.setenv("SIZES", "4KiB,huge")
    with pytest.raises(SystemExit, match=r"^tensor_source: SIZES='4KiB,huge' is invalid"):
        source_node.main(object())  # never touched: the error comes first
    monkeypatch.setenv("SIZES", "4KiB")
    monkeypatch.setenv("CASES", "torch/float33/*")
    with pytest.raises(SystemExit, match=r"^tensor_source: case patterns \['torch/float33/\*'\]"):
        source_node.main(AckingMock())
    monkeypatch.setenv("VERIFY", "sometimes")
    with pytest.raises(SystemExit, match=r"^validator: VERIFY='sometimes' is invalid: expected"):
        validator_node.main(object())


def test_corrupt_switch_flips_bytes_and_the_validator_catches_it(small_env, monkeypatch):
    monkeypatch.setenv("ARROW_TENSOR_TEST_CORRUPT", "1")
    node = AckingMock()
    source_node.main(node)
    validator = tt.Validator(log=lambda line: None)
    outcomes = [validator.handle(array, meta) for _, array, meta in node.sent]
    nonempty = sum(1 for _, array, meta in node.sent[1:-1] if array.nbytes)
    assert outcomes.count("corrupt") == nonempty > 0
    assert outcomes[0] == "hello"
    assert outcomes[-1] == "end"


# -- validator node ---------------------------------------------------------------------------


def stream(small_env: list[tt.Case]) -> list[tuple[pa.Array, dict[str, Any]]]:
    node = AckingMock()
    source_node.main(node)
    return [(array, meta) for _, array, meta in node.sent]


def inputs(messages: list[tuple[pa.Array, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{"type": "INPUT", "id": "tensors", "value": a, "metadata": m} for a, m in messages]


def run_validator(events, tmp_path: Path, monkeypatch, **env: str) -> tuple[int, dict, MockNode]:
    report = tmp_path / "report.json"
    monkeypatch.setenv("REPORT_PATH", str(report))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    node = MockNode(events, node_config={"inputs": {}, "outputs": ["ack"]})
    code = validator_node.main(node)
    return code, json.loads(report.read_text()), node


def test_validator_passes_keeps_draining_after_stop_and_acks(small_env, tmp_path, monkeypatch):
    messages = stream(small_env)
    events = inputs(messages[:5])
    events += [{"type": "INPUT_CLOSED", "id": "tensors"}, {"type": "STOP", "id": "ALL"}]
    events += inputs(messages[5:])  # dora delivers STOP ahead of still-queued inputs
    code, report, node = run_validator(events, tmp_path, monkeypatch)
    assert code == 0
    assert report["passed"]
    assert report["ok"] == report["expected_total"] == len(small_env)
    acks = [a[0].as_py() for a in node.outputs["ack"]]
    assert acks == [-1, *range(len(small_env))]


def test_validator_skips_foreign_messages_and_inputs(small_env, tmp_path, monkeypatch):
    messages = stream(small_env)
    events = inputs([(pa.array([1.0]), {"who": "lidar"}), *messages])
    events.append({"type": "INPUT", "id": "other", "value": pa.array([0]), "metadata": {}})
    code, report, _ = run_validator(events, tmp_path, monkeypatch)
    assert code == 0
    assert report["foreign"] == 2
    assert report["ok"] == len(small_env)


def test_validator_exits_1_on_corruption(small_env, tmp_path, monkeypatch):
    messages = stream(small_env)
    array, meta = messages[2]  # seq 1: torch/float16/contiguous/4KiB
    messages[2] = (tt.flip_byte(array, 0), meta)
    code, report, _ = run_validator(inputs(messages), tmp_path, monkeypatch)
    assert code == 1
    assert report["corrupt"] == 1
    assert report["failures"][0]["seq"] == 1


def test_validator_exits_1_when_nothing_arrived(tmp_path, monkeypatch):
    code, report, node = run_validator([], tmp_path, monkeypatch)
    assert code == 1
    assert report["reasons"] == ["no test message arrived"]
    assert "ack" not in node.outputs


@pytest.mark.parametrize(("allowed", "code"), [("0", 1), ("0.5", 0)])
def test_validator_drop_threshold(small_env, tmp_path, monkeypatch, allowed, code):
    messages = stream(small_env)
    del messages[4]
    got, report, _ = run_validator(
        inputs(messages), tmp_path, monkeypatch, MAX_DROP_FRACTION=allowed
    )
    assert got == code
    assert report["dropped"] == 1
    assert report["missing_seqs"] == [3]


def test_validator_without_ack_output_sends_nothing(small_env, tmp_path, monkeypatch):
    monkeypatch.setenv("REPORT_PATH", str(tmp_path / "r.json"))
    node = MockNode(inputs(stream(small_env)))
    assert validator_node.main(node) == 0
    assert node.outputs == {}


def test_numpy_views_from_validator_input_are_read_only(small_env):
    array, meta = stream(small_env)[-2]  # a numpy bool case
    assert isinstance(at.decode(array, meta), np.ndarray)
    assert not at.decode(array, meta).flags.writeable


def test_source_duration_mode_announces_the_total_at_the_end(small_env, monkeypatch):
    monkeypatch.setenv("DURATION", "1ms")
    node = AckingMock()
    summary = source_node.main(node)
    tensors = node.sent[1:-1]
    assert summary["sent"] == len(tensors) >= len(small_env)  # at least one full round
    assert {meta[tt.KEY_TOTAL] for _, _, meta in tensors} == {-1}
    assert [meta[tt.KEY_SEQ] for _, _, meta in tensors] == list(range(len(tensors)))
    assert node.sent[-1][2][tt.KEY_TOTAL] == len(tensors)


def test_validator_logs_a_chunked_value_cut_short(small_env, tmp_path, monkeypatch, capsys):
    from arrow_tensor.transport import _send

    monkeypatch.setattr(_send, "max_chunk_payload", lambda cap, width: 1000)
    case = tt.Case("numpy", "uint8", "contiguous", 4096)
    recorder = AckingMock(ack=False)
    meta = {tt.KEY_CASE: case.id, tt.KEY_SEQ: 0, tt.KEY_SEED: 0, tt.KEY_TOTAL: 1}
    at.send(recorder, "tensors", tt.make_tensor(case, 0, 0), meta, transport="chunked")
    chunks = [(array, m) for _, array, m in recorder.sent]
    code, report, _ = run_validator(inputs(chunks[:-1]), tmp_path, monkeypatch)
    assert code == 1
    assert report["dropped"] == 1
    assert report["corrupt"] == 0
    assert "incomplete value(s) at the end of the stream" in capsys.readouterr().out
