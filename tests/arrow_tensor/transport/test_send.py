"""Sending through each route, chunks past dora's cap and pool-size advice.

The decision itself has its table in test_decide.py; here every route is taken for real.
"""

from __future__ import annotations

from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
from arrow_tensor import (
    IncompleteTransferError,
    MetadataError,
    PayloadError,
    Receiver,
    TransportError,
    send,
)
from arrow_tensor.codec import _schema
from arrow_tensor.codec import _tensor as _codec
from arrow_tensor.codec._tensor import plan
from arrow_tensor.transport import _advice, _chunks, _decide, _facts
from dora.testing import MockNode
from dora_like import DoraLikeNode
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")


def _deliver(node: DoraLikeNode, receiver: Receiver) -> list[Any]:
    """Feed every recorded message to ``receiver``; the completed values in order."""
    values = [receiver.receive(array, meta) for _, array, meta, _ in node.sent]
    return [v for v in values if v is not None]


def _layouts(kind: str) -> dict[str, Any]:
    base = np.arange(4 * 16 * 16 * 8, dtype=np.float32).reshape(4, 16, 16, 8)
    if kind == "torch":
        base = torch.from_numpy(base.copy())
        return {
            "contiguous": base,
            "channels_last": base.permute(0, 3, 1, 2),
            "non_dense": base[:, ::2],
            "strided": base[:, :, 1::2, ::3],
        }
    return {
        "contiguous": base,
        "channels_last": base.transpose(0, 3, 1, 2),
        "non_dense": base[:, ::2],
        "big_endian": base.astype(">f4"),
    }


def _same(a: Any, b: Any) -> None:
    if isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray)
        assert a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=")
        np.testing.assert_array_equal(a, b)
    else:
        assert isinstance(a, torch.Tensor)
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert torch.equal(a, b)


# --- dora's message cap -----------------------------------------------------------------

CAP = _facts.DORA_MESSAGE_CAP


def test_message_size_model_matches_dora_cap() -> None:
    # Measured with dora 1.1: 262,000,000 uint8 bytes encode to 294,750,344 bytes (refused),
    # 238,608,000 passed.
    assert _decide.message_bytes(262_000_000, 1) >= 294_750_344
    assert _decide.message_bytes(262_000_000, 1) > CAP
    largest = _decide.max_chunk_payload(CAP, 1)
    assert _decide.message_bytes(largest, 1) <= CAP
    assert _decide.message_bytes(largest + 4096, 1) > CAP
    assert 230_000_000 < largest <= 238_608_000


# --- raw one-copy sends -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_dense", "other"])
def test_send_round_trip_with_expected_transport(kind: str, layout: str) -> None:
    layouts = _layouts(kind)
    x = layouts[layout] if layout in layouts else list(layouts.values())[-1]
    node = DoraLikeNode([])
    used = send(node, "out", x, {"frame": 3})
    dense = layout in ("contiguous", "channels_last")
    assert used == ("inline" if dense else "raw")
    ((output_id, array, meta, how),) = node.sent
    assert (output_id, how, meta["frame"]) == ("out", used, 3)
    if used == "raw":
        assert array.type == pa.uint8()
    got = Receiver().receive(array, meta)
    _same(got, x if kind == "torch" or layout != "other" else x.astype("<f4"))


@pytest.mark.parametrize("transport", ["inline", "raw"])
@pytest.mark.parametrize("dtype", ["float64", "int16", "uint8", "bool", "complex64"])
def test_forced_transports_round_trip_every_layout(transport: str, dtype: str) -> None:
    x = (np.arange(2 * 64 * 48) % 251).astype(dtype).reshape(2, 64, 48)
    for value in (x, x[:, ::2], x.transpose(2, 0, 1), x[:, :, ::-3]):
        node = DoraLikeNode([])
        send(node, "out", value, transport=transport)
        ((_, array, meta, how),) = node.sent
        assert how == transport
        np.testing.assert_array_equal(Receiver().receive(array, meta), value)


def test_raw_send_with_checksum_goes_inline_and_verifies() -> None:
    x = np.arange(64 * 64, dtype=np.int32).reshape(64, 64)[:, ::2]
    node = DoraLikeNode([])
    assert send(node, "out", x, checksum=True) == "inline"
    ((_, array, meta, _),) = node.sent
    assert meta[_schema.KEY_CHECKSUM].startswith("xxh3_64:")
    np.testing.assert_array_equal(Receiver(verify=True).receive(array, meta), x)


def test_plain_mocknode_falls_back_to_inline() -> None:
    node = MockNode([])
    x = np.zeros((64, 64), dtype=np.float32)[:, ::2]
    assert send(node, "out", x) == "inline"
    assert len(node.outputs["out"]) == 1


def test_unknown_or_impossible_transports_are_refused_and_nothing_is_sent() -> None:
    node = DoraLikeNode([])
    with pytest.raises(TransportError, match="transport must be one of"):
        send(node, "out", np.zeros(3), transport="carrier-pigeon")
    with pytest.raises(TransportError, match="'raw' is not possible here: it carries a checksum"):
        send(node, "out", np.zeros(4096), transport="raw", checksum=True)
    with pytest.raises(TransportError, match="'raw' is not possible here: this node has no raw"):
        send(MockNode([]), "out", np.zeros(4096), transport="raw")
    assert node.sent == []


def test_a_node_that_refuses_raw_samples_is_learned_once() -> None:
    calls = []

    class Refusing(MockNode):
        def send_output_raw(self, *args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            return super().send_output_raw(*args, **kwargs)

    node = Refusing([])
    x = np.zeros((64, 64), dtype=np.float32)[:, ::2]
    assert [send(node, "out", x) for _ in range(3)] == ["inline"] * 3
    assert len(calls) == 1
    assert not _facts.state_of(node, "out").facts.raw


# --- chunks ------------------------------------------------------------------------------

SMALL_CAP = (64 << 10) + 64 + 40_000  # leaves ~35 KB of payload per chunk


@pytest.fixture
def small_cap(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(_facts, "DORA_MESSAGE_CAP", SMALL_CAP)  # read when an output starts
    return _decide.max_chunk_payload(SMALL_CAP, 1)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_dense"])
@pytest.mark.parametrize("checksum", [False, True])
def test_chunked_round_trip(small_cap: int, kind: str, layout: str, checksum: bool) -> None:
    base = np.random.default_rng(0).standard_normal((6, 40, 30, 3)).astype(np.float32)
    src = torch.from_numpy(base) if kind == "torch" else base
    x = {
        "contiguous": src,
        "channels_last": src.permute(0, 3, 1, 2) if kind == "torch" else src.transpose(0, 3, 1, 2),
        "non_dense": src[:, ::2],
    }[layout]
    node = DoraLikeNode([])
    assert send(node, "out", x, {"cam": "left"}, checksum=checksum) == "chunked"
    nbytes = x.numel() * 4 if kind == "torch" else x.nbytes
    assert len(node.sent) >= 2
    assert all(how == "raw" and array.nbytes <= small_cap for _, array, _, how in node.sent)
    for i, (_, _, meta, _) in enumerate(node.sent):
        assert meta[_schema.KEY_KIND] == "chunk"
        assert meta[_schema.KEY_CHUNK_INDEX] == i
        assert meta[_schema.KEY_CHUNK_COUNT] == len(node.sent)
        assert meta[_schema.KEY_CHUNK_TOTAL] == nbytes
        assert meta["cam"] == "left"
    receiver = Receiver(verify=checksum)
    outs = [receiver.receive(a, m) for _, a, m, _ in node.sent]
    assert outs[:-1] == [None] * (len(outs) - 1)
    _same(outs[-1], x)
    assert receiver.pending == 0


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    dtype=st.sampled_from(["uint8", "float16", "int32", "float64"]),
    step=st.integers(1, 3),
    chunk=st.integers(64, 2048),
)
def test_chunked_bytes_exact_for_any_layout(
    shape: list[int], dtype: str, step: int, chunk: int
) -> None:
    x = (np.arange(np.prod(shape) * step) % 255).astype(dtype)
    x = x.reshape([*shape[:-1], shape[-1] * step])[..., ::step]
    p = plan(x)
    if p.nbytes < 2:
        return
    pieces, _ = _chunks.plan_pieces(p, max(chunk, 1))
    assert sum(piece.nbytes for piece in pieces) == p.nbytes
    node = DoraLikeNode([])
    _chunks.send_chunks(node, "out", pieces, p.nbytes, p.header.to_metadata(), {})
    (got,) = _deliver(node, Receiver())
    np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize("layout", ["non_dense", "dense"])
def test_non_dense_chunks_are_compacted_by_the_threaded_copy(
    small_cap: int, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Non-dense row blocks are compacted on torch's threads where they pay; dense chunks
    are one memcpy each (the receiver copies the previous chunk on the other core)."""
    from arrow_tensor.codec import _torch

    copies: list[int] = []
    real = _torch.copy_bits
    monkeypatch.setattr(_codec, "PARALLEL_COPY_BYTES", 0)
    monkeypatch.setattr(_torch, "threads", lambda: 2)  # as on any multi-core machine
    monkeypatch.setattr(_torch, "copy_bits", lambda d, s: copies.append(s.nbytes) or real(d, s))
    base = np.random.default_rng(1).standard_normal((400, 80)).astype(np.float32)
    x = base[:, ::2] if layout == "non_dense" else base
    node = DoraLikeNode([])
    assert send(node, "out", x) == "chunked"
    assert len(node.sent) >= 2
    if layout == "non_dense":
        assert len(copies) == len(node.sent)
        assert sum(copies) == x.nbytes
    else:
        assert copies == []
    (got,) = _deliver(node, Receiver())
    np.testing.assert_array_equal(got, x)


def _chunk_messages(x: np.ndarray) -> list[tuple[pa.Array, dict]]:
    node = DoraLikeNode([])
    assert send(node, "out", x) == "chunked"
    return [(a, m) for _, a, m, _ in node.sent]


def test_missing_chunk_is_a_clear_error_and_the_next_value_arrives(small_cap: int) -> None:
    x = np.arange(30_000, dtype=np.float64)
    first, second = _chunk_messages(x), _chunk_messages(x + 1)
    assert len(first) >= 3
    receiver = Receiver()
    assert receiver.receive(*first[0]) is None
    with pytest.raises(IncompleteTransferError, match=r"expected chunk 1 of \d+.*got chunk 2"):
        receiver.receive(*first[2])
    for message in first[3:]:  # the rest of the dropped value is ignored quietly
        assert receiver.receive(*message) is None
    assert receiver.pending == 0
    np.testing.assert_array_equal(_deliver_messages(receiver, second), x + 1)


def _deliver_messages(receiver: Receiver, messages: list[tuple[pa.Array, dict]]) -> Any:
    outs = [receiver.receive(a, m) for a, m in messages]
    assert all(o is None for o in outs[:-1])
    return outs[-1]


def test_duplicate_chunk_is_an_error(small_cap: int) -> None:
    messages = _chunk_messages(np.arange(20_000, dtype=np.float64))
    receiver = Receiver()
    receiver.receive(*messages[0])
    receiver.receive(*messages[1])
    with pytest.raises(IncompleteTransferError, match="lost, duplicated or reordered"):
        receiver.receive(*messages[1])


def test_first_chunk_missing_is_an_error(small_cap: int) -> None:
    messages = _chunk_messages(np.arange(20_000, dtype=np.float64))
    receiver = Receiver()
    with pytest.raises(IncompleteTransferError, match="before chunk 0"):
        receiver.receive(*messages[1])
    assert all(receiver.receive(*m) is None for m in messages[2:])


def test_lost_last_chunk_is_reported_when_the_sender_moves_on(small_cap: int) -> None:
    x = np.arange(20_000, dtype=np.float64)
    first, second = _chunk_messages(x), _chunk_messages(-x)
    receiver = Receiver()
    for message in first[:-1]:
        assert receiver.receive(*message) is None
    with pytest.raises(IncompleteTransferError, match="abandoned"):
        receiver.receive(*second[0])
    outs = [receiver.receive(a, m) for a, m in second[1:]]
    np.testing.assert_array_equal(outs[-1], -x)


def test_close_reports_incomplete_values(small_cap: int) -> None:
    messages = _chunk_messages(np.arange(20_000, dtype=np.float64))
    receiver = Receiver()
    receiver.receive(*messages[0])
    assert receiver.pending == 1
    with pytest.raises(IncompleteTransferError, match="incomplete chunked values dropped"):
        receiver.close()
    assert receiver.pending == 0


def test_transfers_in_flight_are_bounded(small_cap: int) -> None:
    x = np.arange(20_000, dtype=np.float64)
    receiver = Receiver(max_transfers=2)
    streams = []
    for i in range(3):
        messages = _chunk_messages(x + i)
        stream = f"sender{i}"
        streams.append([(a, {**m, _schema.KEY_CHUNK_STREAM: stream}) for a, m in messages])
    receiver.receive(*streams[0][0])
    receiver.receive(*streams[1][0])
    with pytest.raises(IncompleteTransferError, match="more than 2 transfers in flight"):
        receiver.receive(*streams[2][0])
    assert receiver.pending == 2
    np.testing.assert_array_equal(_deliver_messages(receiver, streams[2][1:]), x + 2)


def _first_chunk(total: int, text: str) -> dict[str, Any]:
    """The metadata of chunk 0 of 2 announcing ``total`` bytes of the header ``text``."""
    return {
        **at.encode(np.zeros(4, dtype=np.uint8))[1],
        _schema.KEY_KIND: "chunk",
        _schema.KEY_CHUNK_KIND: "tensor",
        _schema.KEY_CHUNK_STREAM: "s",
        _schema.KEY_CHUNK_SEQ: 0,
        _schema.KEY_CHUNK_INDEX: 0,
        _schema.KEY_CHUNK_COUNT: 2,
        _schema.KEY_CHUNK_OFFSET: 0,
        _schema.KEY_CHUNK_TOTAL: total,
        _schema.KEY_TENSOR: text,
    }


def test_absurd_total_is_refused_before_allocating() -> None:
    meta = _first_chunk(1 << 60, _schema.pack("numpy", "uint8", [1 << 60], [0]))
    with pytest.raises(PayloadError, match="refused"):
        Receiver().receive(pa.array(np.zeros(8, np.uint8)), meta)
    meta[_schema.KEY_CHUNK_TOTAL] = 8
    with pytest.raises(PayloadError, match="announce 8"):
        Receiver().receive(pa.array(np.zeros(8, np.uint8)), meta)
    meta[_schema.KEY_CHUNK_COUNT] = 1
    with pytest.raises(MetadataError, match="2 <= count"):
        Receiver().receive(pa.array(np.zeros(8, np.uint8)), meta)


def test_a_header_no_receiver_can_view_is_refused_at_the_first_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """numpy;bfloat16 is refused when parsed, before chunk 0 allocates the whole value."""
    allocations: list[Any] = []
    real_empty = np.empty
    monkeypatch.setattr(np, "empty", lambda *a, **k: allocations.append(a) or real_empty(*a, **k))
    meta = _first_chunk(1 << 24, _schema.pack("numpy", "bfloat16", [1 << 23], [0]))
    with pytest.raises(MetadataError, match="'bfloat16' has no numpy form"):
        Receiver().receive(pa.array(np.zeros(8, np.uint8)), meta)
    assert not any(a and a[0] == 1 << 24 for a in allocations)


@pytest.mark.parametrize("framework", ["cupy", "pyarrow.cuda"])
def test_a_device_framework_is_refused_at_the_first_chunk(framework: str) -> None:
    """Host bytes decode to numpy or torch: refused before chunk 0 allocates the value."""
    meta = _first_chunk(1 << 24, _schema.pack(framework, "uint8", [1 << 24], [0]))
    receiver = Receiver()
    with pytest.raises(MetadataError, match=f"header names {framework!r}"):
        receiver.receive(pa.array(np.zeros(8, np.uint8)), meta)
    assert receiver.pending == 0


def test_chunk_claiming_more_bytes_than_its_total_is_an_error(small_cap: int) -> None:
    messages = _chunk_messages(np.arange(20_000, dtype=np.float64))
    receiver = Receiver()
    receiver.receive(*messages[0])
    array, meta = messages[1]
    with pytest.raises(IncompleteTransferError, match="claims bytes"):
        receiver.receive(array, {**meta, _schema.KEY_CHUNK_OFFSET: 8})


def test_decode_of_a_lone_chunk_points_at_the_receiver(small_cap: int) -> None:
    array, meta = _chunk_messages(np.arange(20_000, dtype=np.float64))[1]
    with pytest.raises(IncompleteTransferError, match=r"chunk 1 of \d+.*Receiver"):
        at.decode(array, meta)


def test_receiver_writable_chunked_value_is_private(small_cap: int) -> None:
    x = np.arange(20_000, dtype=np.float64)
    receiver = Receiver(writable=True)
    for _ in range(2):  # the second value's header is known to the fast path by then
        got = _deliver_messages(receiver, _chunk_messages(x))
        assert got.flags.writeable
        # The reassembly buffer is private already: no second copy of a large value.
        assert any(np.shares_memory(got, b) for b in receiver._chunks._spares.values())
        got[0] = -1.0
        assert x[0] == 0.0


# --- pool advice -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "pool", "advice"),
    [
        (4000, 10, None),
        (16 << 20, 64_000_000, None),
        (16 << 20, 24_000_000, "shared_memory_pool_size: 64MB"),
        (64 << 20, 8_000_000, "shared_memory_pool_size: 256MB"),
        (230 << 20, 256 << 20, "shared_memory_pool_size: 1GB"),
    ],
)
def test_pool_advice(message: int, pool: int, advice: str | None) -> None:
    assert _advice.pool_advice(message, pool) == advice


def test_pool_advice_for_chunks_counts_every_chunk_in_flight() -> None:
    chunk = _decide.message_bytes(_decide.max_chunk_payload(CAP, 1), 1)
    assert _advice.pool_advice(chunk, 2 << 30, in_flight=6) is None
    assert _advice.pool_advice(chunk, 1 << 30, in_flight=6) == "shared_memory_pool_size: 2GB"


def test_pool_too_small_is_said_once_per_output_with_the_fix() -> None:
    node = DoraLikeNode([], node_config={"shared_memory_pool_size": 8_000_000})
    x = np.zeros(4 << 20, dtype=np.float32)  # 16 MiB
    for _ in range(3):
        send(node, "a", x)
        send(node, "b", x)
    warnings = [entry for entry in node.logs if "shared_memory_pool_size" in str(entry)]
    assert len(warnings) == 2
    text = str(warnings[0])
    assert "'a'" in text
    assert "`shared_memory_pool_size: 64MB`" in text


def test_big_enough_pool_is_quiet() -> None:
    node = DoraLikeNode([], node_config={"shared_memory_pool_size": 1 << 30})
    send(node, "a", np.zeros(4 << 20, dtype=np.float32))
    assert not [entry for entry in node.logs if "shared_memory_pool_size" in str(entry)]


def test_pool_size_reads_env_when_yaml_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DORA_NODE_SHM_POOL_SIZE", "123456789")
    assert _facts.state_of(DoraLikeNode([]), "out").facts.pool_bytes == 123456789
    node = DoraLikeNode([], node_config={"shared_memory_pool_size": 5})
    assert _facts.state_of(node, "out").facts.pool_bytes == 5


def test_reassembly_buffer_is_reused_only_when_nobody_holds_the_value(small_cap: int) -> None:
    x = np.arange(20_000, dtype=np.float64)
    receiver = Receiver()
    held = _deliver_messages(receiver, _chunk_messages(x))
    second = _deliver_messages(receiver, _chunk_messages(x + 1))
    np.testing.assert_array_equal(held, x)  # not overwritten by the second value
    np.testing.assert_array_equal(second, x + 1)
    address = second.__array_interface__["data"][0]
    del second
    third = _deliver_messages(receiver, _chunk_messages(x + 2))
    np.testing.assert_array_equal(third, x + 2)
    assert third.__array_interface__["data"][0] == address  # warm pages reused
    torch_held = _deliver_messages(receiver, _chunk_messages(torch.from_numpy(x + 3)))
    del third
    again = _deliver_messages(receiver, _chunk_messages(torch.from_numpy(x + 4)))
    assert torch.equal(torch_held, torch.from_numpy(x + 3))
    assert torch.equal(again, torch.from_numpy(x + 4))


class _Text(str):
    """A str subclass: parsed from its own characters, never looked up in a cache."""


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        # Shapes int() reads as [1, 3], in forms the schema refuses.
        (_schema.pack("numpy", "float32", [True, 3], [0, 1]), "the shape must be decimal"),
        (_schema.pack("numpy", "float32", [1.0, 3], [0, 1]), "the shape must be decimal"),
        (_schema.pack("numpy", "float32", ["01", 3], [0, 1]), "the shape must be decimal"),
        (_schema.pack("numpy", "float32", ["+1", 3], [0, 1]), "the shape must be decimal"),
        (_schema.pack("numpy", "float32", [1, 3], [0, " 1"]), "the perm must be decimal"),
        # The cached text itself, as something other than a str.
        (b"numpy;float32;1,3;0,1", "'at.tensor' must be str, got bytes"),
        (["numpy", "float32", [1, 3], [0, 1]], "'at.tensor' must be str, got list"),
        # A str subclass is parsed from its own characters, never looked up.
        (_Text("numpy;float32;1,3;0,2"), "the perm must be a permutation of 0..1"),
    ],
)
def test_header_cache_never_serves_what_parsing_refuses(bad: Any, match: str) -> None:
    receiver = Receiver()
    array, meta = at.encode(np.zeros((1, 3), dtype=np.float32))
    assert meta[_schema.KEY_TENSOR] == "numpy;float32;1,3;0,1"
    assert receiver.receive(array, meta).shape == (1, 3)  # now cached
    with pytest.raises(MetadataError, match=match):
        receiver.receive(array, {**meta, _schema.KEY_TENSOR: bad})
    with pytest.raises(MetadataError, match=match):
        _codec.decode_tensor(array, {**meta, _schema.KEY_TENSOR: bad})
    assert receiver.receive(array, meta).shape == (1, 3)


def test_pool_warning_still_fires_when_messages_grow() -> None:
    node = DoraLikeNode([], node_config={"shared_memory_pool_size": 8 << 20})
    send(node, "a", np.zeros(1024, dtype=np.float32))
    assert not [e for e in node.logs if "shared_memory_pool_size" in str(e)]
    send(node, "a", np.zeros(16 << 20, dtype=np.uint8))
    assert len([e for e in node.logs if "shared_memory_pool_size" in str(e)]) == 1


def test_the_dataflow_descriptor_is_read_once_per_output() -> None:
    reads = []

    class Counting(DoraLikeNode):
        def dataflow_descriptor(self) -> Any:
            reads.append(1)
            return super().dataflow_descriptor()

    node = Counting([])
    for value in (np.zeros(16), np.zeros((8, 8))[:, ::2], {"a": np.zeros(3)}, np.zeros(16)):
        send(node, "out", value)
    assert len(reads) == 1
    send(node, "other", np.zeros(16))
    assert len(reads) == 2


class DaemonPathNode(DoraLikeNode):
    """A node whose output dora put on its daemon path: messages over ``limit`` refused."""

    def __init__(self, limit: int) -> None:
        super().__init__([])
        self.limit = limit

    def _check(self, nbytes: int) -> None:
        if nbytes > self.limit:
            raise RuntimeError(
                f'Failed to send: output error: output "out": IPC-encoded message is {nbytes} '
                f"bytes, exceeding the {self.limit}-byte daemon transport limit (the output "
                f"is on the daemon path)"
            )

    def send_output(self, output_id: str, data: Any, metadata: dict | None = None) -> None:
        self._check(data.nbytes)
        super().send_output(output_id, data, metadata)

    def send_output_raw(self, output_id: str, nbytes: int, metadata: dict | None = None) -> Any:
        self._check(nbytes)
        return super().send_output_raw(output_id, nbytes, metadata)


@pytest.mark.parametrize(
    "value",
    [
        np.arange(1 << 19, dtype=np.float32),  # 2 MiB dense: inline, by the fast path
        np.arange(1 << 20, dtype=np.float32)[::2],  # 2 MiB to compact: raw
        {"a": np.arange(1 << 19, dtype=np.float32)},  # a structure
    ],
    ids=["inline", "raw", "tree"],
)
def test_a_route_with_a_lower_cap_is_learned_from_doras_refusal(value: Any) -> None:
    node = DaemonPathNode(limit=1 << 20)
    assert send(node, "out", value) == "chunked"
    assert send(node, "out", value) == "chunked"  # decided with the learned cap from now on
    assert all(m["at.kind"] == "chunk" for _, _, m, _ in node.sent)
    values = _deliver(node, Receiver())
    assert len(values) == 2
    for got in values:
        if isinstance(value, dict):
            assert np.array_equal(got["a"], value["a"])
        else:
            assert np.array_equal(got, value)
    warnings = [log["message"] for log in node.logs if "daemon path" in log["message"]]
    assert len(warnings) == 1
    assert str(1 << 20) in warnings[0]


def test_other_dora_errors_are_not_taken_for_a_cap() -> None:
    class Broken(DoraLikeNode):
        def send_output(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("Failed to send: the daemon is gone")

    with pytest.raises(RuntimeError, match="daemon is gone"):
        send(Broken([]), "out", np.zeros(4))
