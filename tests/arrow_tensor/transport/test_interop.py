"""Talking to nodes without arrow_tensor: plain outputs, plain values, foreign inputs, verify.

What a node-hub consumer does with a message is written out as it does it
(``value.to_numpy().reshape(height, width, 3)``, ``value[0].as_py()``); arrow_tensor's own
receivers must still get the exact value back from the same message.
"""

from __future__ import annotations

from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
from arrow_tensor import Receiver, send
from arrow_tensor.node import Node
from arrow_tensor.transport import _facts
from dora.testing import MockNode
from dora_like import DoraLikeNode

torch = pytest.importorskip("torch")


def plain_consumer_image(array: pa.Array, meta: dict[str, Any]) -> np.ndarray:
    """What opencv-plot and dora-rerun do with an image message."""
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "mono8": 1}[meta["encoding"]]
    shape = (meta["height"], meta["width"], channels)
    return array.to_numpy().reshape(shape if channels > 1 else shape[:2])


# --- plain outputs -------------------------------------------------------------------------
def test_an_hwc_view_of_a_chw_image_reads_right_to_a_plain_consumer() -> None:
    chw = torch.arange(3 * 32 * 48, dtype=torch.uint8).reshape(3, 32, 48)
    hwc = chw.permute(1, 2, 0)  # dense, but its bytes lie channel-planar in memory
    node = DoraLikeNode([])
    assert send(node, "image", hwc, {"frame": 7}, plain=True) == "inline"
    (_, array, meta, kind), *_ = node.sent
    assert kind == "inline"
    assert array.type == pa.uint8()
    assert (meta["encoding"], meta["width"], meta["height"]) == ("rgb8", 48, 32)
    assert meta["primitive"] == "image"
    assert meta["frame"] == 7
    assert np.array_equal(plain_consumer_image(array, meta), hwc.numpy())
    back = at.decode(array, meta)  # an arrow_tensor receiver: the same tensor, C-ordered
    assert torch.equal(back, hwc)
    assert back.is_contiguous()


def test_without_plain_the_same_view_is_what_a_plain_consumer_misreads() -> None:
    """Why plain outputs exist: the default send keeps the layout, a consumer garbles it."""
    hwc = torch.arange(3 * 8 * 8, dtype=torch.uint8).reshape(3, 8, 8).permute(1, 2, 0)
    node = DoraLikeNode([])
    send(node, "image", hwc)
    (_, array, meta, _), *_ = node.sent
    assert not np.array_equal(array.to_numpy().reshape(8, 8, 3), hwc.numpy())
    assert torch.equal(at.decode(array, meta), hwc)


def test_the_senders_own_encoding_key_wins_but_the_size_is_the_tensors() -> None:
    bgr = np.zeros((4, 6, 3), np.uint8)
    node = DoraLikeNode([])
    camera = {"encoding": "bgr8", "width": 640, "height": 480, "primitive": "image"}
    send(node, "image", bgr, camera, plain=True)  # a crop, sent with its camera's metadata
    meta = node.sent[0][2]
    assert meta["encoding"] == "bgr8"
    assert (meta["width"], meta["height"]) == (6, 4)


@pytest.mark.parametrize(
    ("value", "arrow_type"),
    [
        (np.linspace(0, 1, 4 << 20, dtype=np.float32), pa.float32()),  # 16 MiB: raw by default
        (np.arange(4096, dtype=np.float64).reshape(64, 64)[:, ::2], pa.float64()),  # non-dense
        (torch.arange(6, dtype=torch.int16).reshape(2, 3).t(), pa.int16()),
        (np.arange(12, dtype=">i4").reshape(3, 4), pa.int32()),  # big-endian: swapped
        (torch.randn(3, 4).to(torch.bfloat16), pa.uint16()),  # Arrow has no bfloat16
        (torch.tensor([[True, False], [False, True]]).t(), pa.bool_()),
        (np.zeros((2, 0, 3), np.float32), pa.float32()),
    ],
    ids=["float32-16MiB", "non-dense", "transposed", "big-endian", "bfloat16", "bool", "empty"],
)
def test_plain_outputs_carry_c_order_in_the_dtypes_own_arrow_type(
    value: Any, arrow_type: pa.DataType
) -> None:
    node = DoraLikeNode([])
    assert send(node, "out", value, plain=True) == "inline"
    (_, array, meta, kind), *_ = node.sent
    assert kind == "inline"  # never a raw sample: a plain consumer would read bytes
    assert array.type == arrow_type
    back = at.decode(array, meta)
    assert type(back) is type(value)
    assert tuple(back.shape) == tuple(value.shape)
    if isinstance(value, torch.Tensor):
        assert back.dtype == value.dtype
        bits = value.view(torch.int16) if value.dtype == torch.bfloat16 else value
        c_order = bits.contiguous().numpy().ravel()
        assert torch.equal(back.view(bits.dtype), bits)
    else:
        assert back.dtype == value.dtype.newbyteorder("=")  # decoded in native order
        c_order = np.ascontiguousarray(value).ravel()
        assert np.array_equal(back, value)
    flat = array.to_numpy(zero_copy_only=False)  # what a consumer without arrow_tensor reads
    if arrow_type == pa.uint16():  # bfloat16's bits
        flat = flat.view(np.int16)
    assert np.array_equal(flat, c_order)


def test_plain_outputs_refuse_structures_and_send_nothing() -> None:
    node = DoraLikeNode([])
    with pytest.raises(at.TransportError, match="a structure needs arrow_tensor"):
        send(node, "out", {"x": np.zeros(3)}, plain=True)
    assert node.sent == []


def test_plain_outputs_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARROW_TENSOR_PLAIN_OUTPUTS", " image , depth")
    node = DoraLikeNode([])
    x = np.arange(8192, dtype=np.float32)[::2]  # would go raw on an ordinary output
    send(node, "image", x)
    send(node, "depth", x)
    send(node, "other", x)
    assert [(out, kind) for out, _, _, kind in node.sent] == [
        ("image", "inline"),
        ("depth", "inline"),
        ("other", "raw"),
    ]
    monkeypatch.setenv("ARROW_TENSOR_PLAIN_OUTPUTS", "*")
    star = DoraLikeNode([])
    send(star, "anything", x)
    assert star.sent[0][3] == "inline"
    assert star.sent[0][1].type == pa.float32()


def test_a_node_declares_its_plain_outputs_and_their_loans_are_private() -> None:
    dora_node = DoraLikeNode([])
    node = Node(dora_node, plain_outputs=["image"])
    frame = node.empty("image", (4, 4, 3), np.uint8)
    frame[:] = 9
    assert node.send("image", frame) == "inline"
    assert node.send("other", np.arange(8192, dtype=np.float32)[::2]) == "raw"
    meta = dora_node.sent[0][2]
    assert meta["encoding"] == "rgb8"
    assert "at.shm.pool" not in meta
    assert _facts.state_of(dora_node, "image").pool is None  # no pool was ever made


# --- plain values ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "read_by_a_plain_node"),
    [
        ("person detected", lambda a: a[0].as_py()),
        (b"\xff\xd8jpeg", lambda a: a.to_numpy().tobytes()),
        ([1, 2, 3], lambda a: a.to_pylist()),
        ([0.25, 0.5], lambda a: a.to_pylist()),
        (["a", "b"], lambda a: a.to_pylist()),
        (pa.array([{"bbox": [1.0, 2.0], "labels": "cat"}]), lambda a: a),
    ],
    ids=["str", "bytes", "ints", "floats", "strs", "struct"],
)
def test_a_node_sends_plain_values_both_worlds_read(value: Any, read_by_a_plain_node: Any) -> None:
    dora_node = DoraLikeNode([])
    node = Node(dora_node, checksum=True)
    assert node.send("out", value, source="test") == "inline"
    _, array, meta, _ = dora_node.sent[0]
    assert meta["source"] == "test"
    seen = read_by_a_plain_node(array)
    assert seen.equals(value) if isinstance(value, pa.Array) else seen == value
    back = Receiver(verify=True).receive(array, meta)
    assert back.equals(value) if isinstance(value, pa.Array) else back == value


def test_a_plain_value_too_big_for_one_message_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_facts, "DORA_MESSAGE_CAP", 1 << 20)
    node = DoraLikeNode([])
    with pytest.raises(at.TransportError, match="cannot join chunks"):
        send(node, "out", b"x" * (2 << 20))
    assert node.sent == []


# --- foreign inputs -------------------------------------------------------------------------
def camera_event(input_id: str = "image", encoding: str = "bgr8") -> dict[str, Any]:
    frame = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    meta = {"encoding": encoding, "width": 6, "height": 4, "primitive": "image", "tick": 1}
    return {"type": "INPUT", "id": input_id, "value": pa.array(frame.ravel()), "metadata": meta}


def test_receiver_foreign_modes() -> None:
    event = camera_event()
    with pytest.raises(at.NotATensorMessageError):
        Receiver().receive(event["value"], event["metadata"])
    image = Receiver(foreign="decode").receive(event["value"], event["metadata"])
    assert image.shape == (4, 6, 3)
    assert Receiver(foreign="raw").receive(event["value"], event["metadata"]) is event["value"]
    with pytest.raises(ValueError, match="foreign must be one of"):
        Receiver(foreign="guess")


def test_a_message_with_some_of_our_keys_is_never_taken_for_foreign() -> None:
    array, meta = at.encode(np.zeros(3))
    del meta["at.version"]
    with pytest.raises(at.NotATensorMessageError):
        Receiver(foreign="decode").receive(array, meta)


def test_receiver_fallbacks_are_counted_and_reported() -> None:
    seen: list[tuple[str, str]] = []
    rx = Receiver(foreign="decode", on_fallback=lambda reason, text: seen.append((reason, text)))
    event = camera_event(encoding="nv12")
    for _ in range(3):
        assert rx.receive(event["value"], event["metadata"]).shape == (72,)
    assert rx.fallbacks == {"encoding nv12": 3}
    assert len(seen) == 3
    assert "nv12" in seen[0][1]


def test_node_decodes_camera_frames_and_logs_a_fallback_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = [camera_event(), camera_event(encoding="nv12"), camera_event(encoding="nv12")]
    node = Node(MockNode(events))
    items = list(node)
    assert [v.shape for _, v, _ in items] == [(4, 6, 3), (72,), (72,)]
    assert items[0].metadata == {
        "encoding": "bgr8",
        "width": 6,
        "height": 4,
        "primitive": "image",
        "tick": 1,
    }
    assert node.fallbacks == {("image", "encoding nv12"): 2}
    assert node.errors == {}
    err = capsys.readouterr().err
    assert err.count("nv12") == 2  # the first time, then the summary at the end
    assert "input 'image': 2 messages delivered raw (encoding nv12)" in err


def test_node_foreign_switch_per_input() -> None:
    events = [camera_event("a"), camera_event("b"), camera_event("c")]
    node = Node(MockNode(events), foreign={"a": "raw", "*": "error"})
    items = list(node)
    assert [item.id for item in items] == ["a"]
    assert isinstance(items[0].value, pa.Array)
    assert node.errors == {"b": 1, "c": 1}
    with pytest.raises(ValueError, match="foreign mode of 'x'"):
        Node(MockNode([]), foreign={"x": "maybe"})


# --- verify="auto" --------------------------------------------------------------------------
def test_verify_auto_checks_what_carries_a_checksum_and_nothing_else() -> None:
    plain_array, plain_meta = at.encode(np.arange(4))
    summed_array, summed_meta = at.encode(np.arange(4), checksum=True)
    bad_meta = {**summed_meta, "at.checksum": "xxh3_64:0000000000000000"}
    auto = Receiver(verify="auto")
    assert auto.receive(plain_array, plain_meta).tolist() == [0, 1, 2, 3]
    assert auto.receive(summed_array, summed_meta).tolist() == [0, 1, 2, 3]
    with pytest.raises(at.ChecksumError, match="mismatch"):
        auto.receive(summed_array, bad_meta)
    with pytest.raises(at.ChecksumError, match="mismatch"):
        at.decode(summed_array, bad_meta, verify="auto")
    assert at.decode(plain_array, plain_meta, verify="auto").tolist() == [0, 1, 2, 3]
    with pytest.raises(at.ChecksumError, match="carries no checksum"):
        Receiver(verify=True).receive(plain_array, plain_meta)
    with pytest.raises(ValueError, match="verify must be True, False or 'auto'"):
        Receiver(verify="sometimes")


def test_verify_auto_checks_a_chunked_value_once_whole() -> None:
    node = DoraLikeNode([])
    value = np.arange(1 << 16, dtype=np.int64)
    send(node, "out", value, checksum=True, transport="chunked")
    messages = [(a, m) for _, a, m, _ in node.sent]
    good = Receiver(verify="auto")
    results = [good.receive(a, m) for a, m in messages]
    assert np.array_equal(results[-1], value)
    last_array, last_meta = messages[-1]
    bad = Receiver(verify="auto")
    for array, meta in messages[:-1]:
        assert bad.receive(array, meta) is None
    with pytest.raises(at.ChecksumError):
        bad.receive(last_array, {**last_meta, "at.checksum": "xxh3_64:0000000000000000"})


def test_a_node_verifies_by_default_when_the_sender_checksummed() -> None:
    array, meta = at.encode(np.arange(3), checksum=True)
    plain_array, plain_meta = at.encode(np.arange(3))
    events = [
        {
            "type": "INPUT",
            "id": "x",
            "value": array,
            "metadata": {**meta, "at.checksum": "xxh3_64:00"},
        },
        {"type": "INPUT", "id": "x", "value": plain_array, "metadata": plain_meta},
        {"type": "INPUT", "id": "x", "value": array, "metadata": meta},
    ]
    node = Node(MockNode(events))
    assert [v.tolist() for _, v, _ in node] == [[0, 1, 2], [0, 1, 2]]
    assert node.errors == {"x": 1}
