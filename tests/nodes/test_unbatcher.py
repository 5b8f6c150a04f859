"""The unbatcher node and the splitting half of micro-batching."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from arrow_tensor import BatchError
from arrow_tensor import batching as _batch
from node_helpers import RecordingMock, item_event, load_node

torch = pytest.importorskip("torch")
unbatcher = load_node("unbatcher")
batcher = load_node("batcher")


def batch_event(value: Any, items: list[dict[str, Any]], index: int = 0) -> dict[str, Any]:
    meta = _batch.batch_metadata(items, range(len(items)), index, {})
    return item_event(value, **meta)


def test_dict_outputs_are_split_per_item_with_their_metadata() -> None:
    out = {
        "boxes": torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4),
        "scores": torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.4, 0.2]]),
        "labels": torch.tensor([[1, 2, 3], [4, 5, 6]]),
    }
    items = [
        {"frame_id": 10, "t_ns": 5, "camera": "left"},
        {"frame_id": 11, "t_ns": 6, "camera": "x"},
    ]
    mock = RecordingMock([batch_event(out, items)])
    unbatcher.main(mock)
    sent = mock.decoded()
    assert [meta for _, meta in sent] == items
    for i, (value, _) in enumerate(sent):
        assert list(value) == ["boxes", "scores", "labels"]
        assert value["boxes"].tolist() == out["boxes"][i].tolist()
        assert value["scores"].tolist() == out["scores"][i].tolist()
        assert value["labels"].tolist() == out["labels"][i].tolist()


@pytest.mark.parametrize(
    ("batched", "expected"),
    [
        (np.arange(6).reshape(3, 2), [[0, 1], [2, 3], [4, 5]]),
        ((np.arange(3), np.arange(3) * 2), [(0, 0), (1, 2), (2, 4)]),
        ([{"n": np.array([i])} for i in range(3)], [{"n": [0]}, {"n": [1]}, {"n": [2]}]),
    ],
    ids=["tensor", "tuple", "per-item-list"],
)
def test_split_rules(batched: Any, expected: list[Any]) -> None:
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return tuple(plain(v) for v in x)
        return x.tolist()

    assert [plain(p) for p in _batch.split(batched, 3)] == expected


def test_batches_it_cannot_split_are_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    good = batch_event(np.arange(2), [{"i": 0}, {"i": 1}], index=0)
    wrong_size = batch_event(np.arange(3), [{"i": 2}, {"i": 3}], index=1)
    no_items = item_event(np.arange(2), batch_index=2)
    mock = RecordingMock([good, wrong_size, no_items])
    node = unbatcher.main(mock)
    assert [meta["i"] for _, meta in mock.decoded()] == [0, 1]
    assert node.errors["in"] == 2
    err = capsys.readouterr().err
    assert "leading batch dimension of 2" in err
    assert "batch_items" in err


def test_missing_batches_are_reported(capsys: pytest.CaptureFixture[str]) -> None:
    events = [batch_event(np.arange(1), [{"i": 0}], 0), batch_event(np.arange(1), [{"i": 5}], 3)]
    unbatcher.main(RecordingMock(events))
    assert "batches 1..2 missing" in capsys.readouterr().err


def test_split_rejects_lists_of_the_wrong_length() -> None:
    with pytest.raises(BatchError, match="one entry per item"):
        _batch.split([1, 2], 3)


def test_batcher_then_unbatcher_restores_every_item(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_SIZE", "3")
    monkeypatch.setenv("MAX_WAIT", "10s")
    originals = [
        ({"img": torch.full((2, 2), float(i)), "id": i}, {"frame_id": i, "w": [i, 2]})
        for i in range(7)
    ]
    first = RecordingMock([item_event(v, **m) for v, m in originals])
    batcher.main(first)
    # Forward each batch as a model node would: same value, same metadata.
    second = RecordingMock(
        [{"type": "INPUT", "id": "in", "value": d, "metadata": m} for _, d, m in first.sent]
    )
    unbatcher.main(second)
    back = second.decoded()
    assert [meta for _, meta in back] == [m for _, m in originals]
    for (value, _), (original, _) in zip(back, originals, strict=True):
        assert value["img"].tolist() == original["img"].tolist()
        assert value["id"] == original["id"]
    assert json.loads(first.sent[0][2]["batch_items"])[0] == {"frame_id": 0, "w": [0, 2]}
