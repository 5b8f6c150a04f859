"""The batcher node and the stacking half of micro-batching."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from arrow_tensor import BatchError, ConfigError
from arrow_tensor import batching as _batch
from node_helpers import IDLE, RecordingMock, item_event, load_node

torch = pytest.importorskip("torch")
batcher = load_node("batcher")


def run_batcher(
    events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, **env: str
) -> RecordingMock:
    for key in ("BATCH_SIZE", "MAX_WAIT", "SHAPES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    mock = RecordingMock(events)
    batcher.main(mock)
    return mock


def frames(n: int, shape: tuple[int, ...] = (3, 2, 2), start: int = 0) -> list[dict[str, Any]]:
    return [
        item_event(torch.full(shape, float(i)), frame_id=i, camera="left")
        for i in range(start, start + n)
    ]


def test_full_batches_then_a_final_partial_one(monkeypatch: pytest.MonkeyPatch) -> None:
    mock = run_batcher(frames(10), monkeypatch, BATCH_SIZE="4", MAX_WAIT="10s")
    sent = mock.decoded()
    assert [v.shape[0] for v, _ in sent] == [4, 4, 2]
    for index, (value, meta) in enumerate(sent):
        items = json.loads(meta["batch_items"])
        ids = [m["frame_id"] for m in items]
        assert ids == list(range(4 * index, 4 * index + len(ids)))
        assert all(m == {"frame_id": i, "camera": "left"} for m, i in zip(items, ids, strict=True))
        assert meta["batch_seq"] == ids
        assert meta["batch_index"] == index
        assert meta["batch_size"] == len(ids)
        assert value[:, 0, 0, 0].tolist() == [float(i) for i in ids]
        assert isinstance(value, torch.Tensor)


def test_max_wait_flushes_a_partial_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    events = [*frames(2), IDLE, *frames(3, start=2)]
    mock = run_batcher(events, monkeypatch, BATCH_SIZE="8", MAX_WAIT="30ms")
    ids = [[m["frame_id"] for m in json.loads(meta["batch_items"])] for _, meta in mock.decoded()]
    assert ids == [[0, 1], [2, 3, 4]]


def test_shape_change_starts_a_new_batch_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    events = [*frames(2, (3, 2, 2)), *frames(3, (3, 4, 4), start=2)]
    mock = run_batcher(events, monkeypatch, BATCH_SIZE="4", MAX_WAIT="10s")
    assert [tuple(v.shape) for v, _ in mock.decoded()] == [(2, 3, 2, 2), (3, 3, 4, 4)]


def test_pad_policy_pads_and_records_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    events = [item_event(np.ones((2, 3), np.float32), i=0), item_event(np.ones((4, 1)), i=1)]
    mock = run_batcher(events, monkeypatch, BATCH_SIZE="2", SHAPES="pad")
    # float32 vs float64: different dtypes never share a batch, even when padding.
    assert [v.shape for v, _ in mock.decoded()] == [(1, 2, 3), (1, 4, 1)]
    events = [item_event(np.ones((2, 3)), i=0), item_event(np.full((4, 1), 2.0), i=1)]
    ((value, meta),) = run_batcher(events, monkeypatch, BATCH_SIZE="2", SHAPES="pad").decoded()
    assert value.shape == (2, 4, 3)
    assert json.loads(meta["batch_shapes"]) == {"value": [[2, 3], [4, 1]]}
    assert value[0].tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert value[1].tolist() == [[2, 0, 0], [2, 0, 0], [2, 0, 0], [2, 0, 0]]


def test_error_policy_rejects_the_odd_item(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shapes = [(1,), (2,), (1,), (2,), (1,)]
    events = [frames(1, shape, start=i)[0] for i, shape in enumerate(shapes)]
    mock = run_batcher(events, monkeypatch, BATCH_SIZE="2", SHAPES="error")
    ids = [[m["frame_id"] for m in json.loads(meta["batch_items"])] for _, meta in mock.decoded()]
    assert ids == [[0, 2], [4]]
    err = capsys.readouterr().err
    assert "rejected item seq 1" in err
    assert "rejected item seq 3" in err
    assert "2 rejected" in err


def test_dict_items_stack_per_key_and_gather_scalars(monkeypatch: pytest.MonkeyPatch) -> None:
    events = [
        item_event({"image": np.full((2, 2), i, np.uint8), "name": f"f{i}", "k": (i, None)}, n=i)
        for i in range(3)
    ]
    ((value, _),) = run_batcher(events, monkeypatch, BATCH_SIZE="3").decoded()
    assert list(value) == ["image", "name", "k"]
    assert value["image"].shape == (3, 2, 2)
    assert value["name"] == ["f0", "f1", "f2"]
    assert value["k"] == [(0, None), (1, None), (2, None)]


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"BATCH_SIZE": "0"}, "BATCH_SIZE"),
        ({"SHAPES": "crop"}, "SHAPES"),
        ({"MAX_WAIT": "x"}, "MAX"),
    ],
)
def test_bad_configuration_is_rejected(
    env: dict[str, str], match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=match):
        run_batcher([], monkeypatch, **env)


@pytest.mark.parametrize(
    ("items", "match"),
    [
        ([np.zeros(2), torch.zeros(2)], "framework"),
        ([np.zeros(2), np.zeros(3)], "different shapes"),
        ([{"a": np.zeros(1)}, {"b": np.zeros(1)}], "same keys"),
        ([], "empty"),
    ],
)
def test_stack_errors_name_the_problem(items: list[Any], match: str) -> None:
    with pytest.raises(BatchError, match=match):
        _batch.stack(items)


def test_stack_then_split_gives_the_items_back() -> None:
    items = [
        {"x": torch.full((2,), float(i)), "tag": f"t{i}", "n": {"y": np.int32([i])}}
        for i in range(3)
    ]
    batched, shapes = _batch.stack(items)
    assert shapes == {}
    back = _batch.split(batched, 3)
    for original, item in zip(items, back, strict=True):
        assert item["x"].tolist() == original["x"].tolist()
        assert item["tag"] == original["tag"]
        assert item["n"]["y"].tolist() == original["n"]["y"].tolist()
