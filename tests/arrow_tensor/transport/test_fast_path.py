"""The fast paths (Note [The fast path] in _codec): same results as the full path, same errors.

A stream's first message of a header goes the full way and teaches the fast path; the
tests here send or decode every case at least twice and compare the second result with what
the full path (``decode_tensor``, ``plan``) gives, and check that hostile messages with a
learned header still get the full path's error.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
from arrow_tensor import MetadataError, PayloadError, Receiver, UnsupportedTensorError, send
from arrow_tensor.codec import _schema, _torch
from arrow_tensor.codec import _tensor as _codec
from arrow_tensor.codec._memo import Memo
from arrow_tensor.transport import _facts
from dora.testing import MockNode

torch = pytest.importorskip("torch")


def _numpy_layouts(dtype: np.dtype, tensors: Any) -> dict[str, np.ndarray]:
    x = tensors.random_numpy((2, 3, 4, 5), dtype)
    return {
        "contiguous": x,
        "transposed": x.transpose(3, 1, 0, 2),
        "size1": x[:1, :, :1],
        "scalar": x[0, 0, 0, 0, ...],
    }


def _torch_layouts(dtype: torch.dtype, tensors: Any) -> dict[str, torch.Tensor]:
    x = tensors.random_torch((2, 3, 4, 5), dtype)
    return {
        "contiguous": x,
        "channels_last": tensors.random_torch((2, 4, 5, 3), dtype).permute(0, 3, 1, 2),
        "transposed": x.transpose(0, 3),
        "size1": x[:1, :1],
    }


def _strides(x: Any) -> tuple[tuple[int, int], ...]:
    """(dim, byte stride) of dims of size > 1."""
    if isinstance(x, np.ndarray):
        shape, strides = x.shape, x.strides
    else:
        shape, strides = tuple(x.shape), tuple(s * x.element_size() for s in x.stride())
    return tuple((i, s) for i, (n, s) in enumerate(zip(shape, strides, strict=True)) if n > 1)


def _same(fast: Any, full: Any, tensors: Any) -> None:
    assert _strides(fast) == _strides(full)
    if isinstance(full, np.ndarray):
        assert not fast.flags.writeable
        tensors.assert_same_numpy(fast, full)
    else:
        tensors.assert_same_torch(fast, full)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "size1", "scalar"])
def test_numpy_decode_fast_path_matches_the_full_path(
    numpy_dtype: np.dtype, layout: str, tensors: Any
) -> None:
    x = _numpy_layouts(numpy_dtype, tensors)[layout]
    array, meta = at.encode(x)  # big-endian sources are compacted to little-endian here
    full = _codec.decode_tensor(array, meta)
    at.decode(array, meta)  # learns the header
    fast = _codec.fast_decode(array, dict(meta))
    if numpy_dtype == np.bool_:
        assert fast is None  # every bool payload is scanned for bytes other than 0 and 1
    else:
        assert fast is not None, "a learned numpy header must take the fast path"
        _same(fast, full, tensors)
    _same(at.decode(array, dict(meta)), full, tensors)
    _same(Receiver().receive(array, dict(meta)), full, tensors)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "size1"])
def test_torch_decode_fast_path_matches_the_full_path(
    torch_dtype: Any, layout: str, tensors: Any
) -> None:
    x = _torch_layouts(torch_dtype, tensors)[layout]
    array, meta = at.encode(x)
    full = _codec.decode_tensor(array, meta)
    at.decode(array, meta)
    fast = _codec.fast_decode(array, dict(meta))
    has_numpy = _schema.parse_text(meta[_schema.KEY_TENSOR]).dtype.numpy_dtype is not None
    if torch_dtype == torch.bool or not has_numpy:
        assert fast is None  # scanned, or viewed through torch: the full path
    else:
        assert fast is not None
        _same(fast, full, tensors)
    _same(at.decode(array, dict(meta)), full, tensors)


def test_fast_decode_leaves_bool_and_empty_to_the_full_path() -> None:
    for x in (np.array([True, False]), np.zeros((0, 3), np.float32)):
        array, meta = at.encode(x)
        first = at.decode(array, meta)
        assert _codec.fast_decode(array, dict(meta)) is None
        np.testing.assert_array_equal(at.decode(array, dict(meta)), first)


LEARNED_SHAPE = (2, 3, 4)


@pytest.fixture
def learned() -> tuple[pa.Array, dict[str, Any]]:
    """A float32 message whose header the fast path knows."""
    x = np.arange(24, dtype=np.float32).reshape(LEARNED_SHAPE)
    array, meta = at.encode(x)
    assert meta == {
        _schema.KEY_VERSION: _schema.VERSION,
        _schema.KEY_KIND: _schema.KIND_TENSOR,
        _schema.KEY_TENSOR: "numpy;float32;2,3,4;0,1,2",
    }
    at.decode(array, meta)
    assert _codec.fast_decode(array, dict(meta)) is not None
    return array, meta


class _LooksLike:
    """Equal to, and hashed like, ``value`` without being of its type."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return other == self.value

    def __hash__(self) -> int:
        return hash(self.value)


_LEARNED_TEXT = "numpy;float32;2,3,4;0,1,2"


def _text(shape: Any = LEARNED_SHAPE, perm: Any = (0, 1, 2), dtype: Any = "float32") -> str:
    """An ``at.tensor`` text like the learned one, unvalidated (``_schema.pack``)."""
    return _schema.pack("numpy", dtype, shape, perm)


def _assert_only_exact_str_keys() -> None:
    """No look-alike was ever stored as a cache key (where it could answer for a real text)."""
    assert all(type(k) is str for k in _codec._FAST_DECODE)
    assert all(type(k) is str for k in _schema._HEADERS)


NOT_DIMS = "must be decimal integers separated by ','"


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        # Values equal to valid ones (or to version 1's) in a dict key, of the wrong type.
        (_schema.KEY_VERSION, True, "'at.version' must be int, got bool"),
        (_schema.KEY_VERSION, 1.0, "'at.version' must be int, got float"),
        (_schema.KEY_VERSION, float(_schema.VERSION), "'at.version' must be int, got float"),
        (_schema.KEY_VERSION, np.int64(_schema.VERSION), "'at.version' must be int, got int64"),
        # Texts whose numbers int() reads as the learned ones, in a form the schema refuses.
        (_schema.KEY_TENSOR, _text(shape=[True, 3, 4]), f"the shape {NOT_DIMS}"),
        (_schema.KEY_TENSOR, _text(shape=[2.0, 3, 4]), f"the shape {NOT_DIMS}"),
        (_schema.KEY_TENSOR, _text(perm=[False, 1, 2]), f"the perm {NOT_DIMS}"),
        (_schema.KEY_TENSOR, _text(shape=["02", 3, 4]), f"the shape {NOT_DIMS}"),
        (_schema.KEY_TENSOR, _text(shape=["+2", 3, 4]), f"the shape {NOT_DIMS}"),
        (_schema.KEY_TENSOR, _text(shape=[" 2", 3, 4]), f"the shape {NOT_DIMS}"),
        (_schema.KEY_TENSOR, _text(shape=[2, 3, "4 "]), f"the shape {NOT_DIMS}"),
        (_schema.KEY_TENSOR, _text(shape=["2_0", 3, 4]), f"the shape {NOT_DIMS}"),
        (_schema.KEY_TENSOR, _text(shape=["\uff12", 3, 4]), f"the shape {NOT_DIMS}"),  # fullwidth 2
        (_schema.KEY_TENSOR, _text(shape=["\u0662", 3, 4]), f"the shape {NOT_DIMS}"),  # Arabic 2
        (_schema.KEY_TENSOR, _text(perm=["-0", 1, 2]), f"the perm {NOT_DIMS}"),
        (_schema.KEY_TENSOR, _text(perm=["00", 1, 2]), f"the perm {NOT_DIMS}"),
        (_schema.KEY_TENSOR, _text(perm=[0, 1, 2, ""]), f"the perm {NOT_DIMS}"),
        (_schema.KEY_TENSOR, _text(dtype="float32 "), "unknown dtype 'float32 '"),
        (_schema.KEY_TENSOR, _text(dtype="<f4"), "unknown dtype '<f4'"),
        (_schema.KEY_TENSOR, _text() + ";", "4 fields separated by ';'"),
        (_schema.KEY_TENSOR, " " + _text(), "the framework must be one of"),
        # look-alike values: equal to, and hashed like, valid ones without their type
        (_schema.KEY_TENSOR, _LooksLike(_LEARNED_TEXT), "'at.tensor' must be str, got _LooksLike"),
        (_schema.KEY_TENSOR, _LEARNED_TEXT.encode(), "'at.tensor' must be str, got bytes"),
        (_schema.KEY_TENSOR, _LEARNED_TEXT.split(";"), "'at.tensor' must be str, got list"),
        (_schema.KEY_TENSOR, None, "'at.tensor' must be str, got NoneType"),
        (_schema.KEY_VERSION, _LooksLike(_schema.VERSION), "'at.version' must be int"),
        (_schema.KEY_KIND, b"tensor", "'at.kind' must be str, got bytes"),
        (_schema.KEY_KIND, _LooksLike("tensor"), "'at.kind' must be str, got _LooksLike"),
    ],
)
def test_learned_header_with_equal_but_wrong_types_is_refused(
    learned: tuple[pa.Array, dict[str, Any]], key: str, value: Any, match: str
) -> None:
    array, meta = learned
    bad = {**meta, key: value}
    assert _codec.fast_decode(array, bad) is None
    with pytest.raises(MetadataError, match=match):
        at.decode(array, bad)
    with pytest.raises(MetadataError, match=match):
        Receiver().receive(array, bad)
    assert _codec.fast_decode(array, dict(meta)) is not None  # the learned entry is intact
    _assert_only_exact_str_keys()


class _Text(str):
    """A str subclass: never a key of the fast path's or the header memo's cache."""


def test_learned_text_as_a_str_subclass_takes_the_full_path(
    learned: tuple[pa.Array, dict[str, Any]],
) -> None:
    array, meta = learned
    subclassed = {**meta, _schema.KEY_TENSOR: _Text(meta[_schema.KEY_TENSOR])}
    assert _codec.fast_decode(array, subclassed) is None
    expected = np.arange(24, dtype=np.float32).reshape(LEARNED_SHAPE)
    for y in (at.decode(array, subclassed), Receiver().receive(array, subclassed)):
        np.testing.assert_array_equal(y, expected)  # validated from its own characters
        assert not y.flags.writeable
    hostile = {**meta, _schema.KEY_TENSOR: _Text(_text(perm=[0, 1, 3]))}
    assert _codec.fast_decode(array, hostile) is None
    with pytest.raises(MetadataError, match=r"the perm must be a permutation of 0\.\.2"):
        at.decode(array, hostile)
    _assert_only_exact_str_keys()


def _pretender(content: str, learned_text: str) -> str:
    """A str of ``content`` that hashes like ``learned_text`` and claims to equal it."""

    class Pretender(str):
        def __eq__(self, other: object) -> bool:
            return other == learned_text or str.__eq__(self, other)

        def __ne__(self, other: object) -> bool:
            return not self.__eq__(other)

        def __hash__(self) -> int:
            return hash(learned_text)

    text = Pretender(content)
    assert text == learned_text
    assert hash(text) == hash(learned_text)
    assert {learned_text: "hit"}.get(text) == "hit"  # a dict lookup would be fooled
    return text


@pytest.mark.parametrize(
    ("content", "outcome"),
    [
        # Other valid headers over the same 96 bytes: must be viewed as themselves.
        (_text(shape=(6, 4), perm=(1, 0)), np.arange(24, dtype=np.float32).reshape(4, 6).T),
        (_text(dtype="int32"), np.arange(24, dtype=np.float32).view(np.int32).reshape(2, 3, 4)),
        (_text(perm=(2, 1, 0)), np.arange(24, dtype=np.float32).reshape(4, 3, 2).transpose()),
        # Refused headers: their own error, never the learned view.
        (_text(shape=(2, 3, 5)), (PayloadError, "describe 120 bytes")),
        (_text(perm=(0, 1, 5)), (MetadataError, "the perm must be a permutation of 0..2")),
        (_text(shape=("2", "3", "-4")), (MetadataError, f"the shape {NOT_DIMS}")),
        (_text(dtype="float99"), (MetadataError, "unknown dtype 'float99'")),
        ("numpy;float32", (MetadataError, "4 fields separated by ';'")),
        ("x" * (_schema.MAX_HEADER_CHARS + 1), (MetadataError, "at most 4096 are allowed")),
    ],
    ids=[
        "other shape",
        "other dtype",
        "other perm",
        "longer",
        "bad perm",
        "negative",
        "bad dtype",
        "fields",
        "too long",
    ],
)
def test_str_subclass_pretending_to_be_a_learned_text_is_not_served_by_the_cache(
    learned: tuple[pa.Array, dict[str, Any]], content: str, outcome: Any
) -> None:
    array, meta = learned
    learned_text = meta[_schema.KEY_TENSOR]
    assert learned_text in _codec._FAST_DECODE
    bad = {**meta, _schema.KEY_TENSOR: _pretender(content, learned_text)}
    assert _codec.fast_decode(array, bad) is None
    assert _codec.fast_decode(array, dict(bad)) is None
    if isinstance(outcome, np.ndarray):
        for y in (at.decode(array, bad), Receiver().receive(array, bad)):
            assert y.dtype == outcome.dtype
            assert y.shape == outcome.shape
            assert y.strides == outcome.strides
            assert y.tobytes() == outcome.tobytes()
    else:
        error, match = outcome
        with pytest.raises(error, match=match):
            at.decode(array, bad)
        with pytest.raises(error, match=match):
            Receiver().receive(array, bad)
    _assert_only_exact_str_keys()
    # The learned text still gets its own view, from the fast path.
    y = _codec.fast_decode(array, dict(meta))
    assert y is not None
    np.testing.assert_array_equal(y, np.arange(24, dtype=np.float32).reshape(LEARNED_SHAPE))


def test_a_refused_lookalike_first_does_not_spoil_the_valid_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_codec, "_FAST_DECODE", Memo(256))  # no header learned yet
    x = np.arange(35, dtype=np.float32).reshape(5, 7)
    array, meta = at.encode(x)
    text = meta[_schema.KEY_TENSOR]
    with pytest.raises(MetadataError, match=f"the shape {NOT_DIMS}"):
        at.decode(
            array, {**meta, _schema.KEY_TENSOR: _schema.pack("numpy", "float32", [5.0, 7], [0, 1])}
        )
    with pytest.raises(MetadataError, match=r"'at\.version' must be int, got float"):
        at.decode(array, {**meta, _schema.KEY_VERSION: float(_schema.VERSION)})
    with pytest.raises(MetadataError, match=r"'at\.tensor' must be str"):
        at.decode(array, {**meta, _schema.KEY_TENSOR: _LooksLike(text)})
    with pytest.raises(MetadataError, match="the perm must be a permutation"):
        at.decode(array, {**meta, _schema.KEY_TENSOR: _pretender(_text((5, 7), (0, 7)), text)})
    np.testing.assert_array_equal(at.decode(array, {**meta, _schema.KEY_TENSOR: _Text(text)}), x)
    assert text not in _codec._FAST_DECODE  # none of them taught the fast path anything
    at.decode(array, meta)
    assert _codec.fast_decode(array, dict(meta)) is not None
    _assert_only_exact_str_keys()


def _hostile_arrays(array: pa.Array) -> dict[str, pa.Array]:
    data = array.buffers()[1]
    n = len(array)
    return {
        "longer": pa.Array.from_buffers(pa.uint32(), n + 1, [None, pa.py_buffer(bytes(4 * n + 4))]),
        "shorter": array.slice(0, n - 1),
        "nulls": pa.array([None, *range(n - 1)], type=pa.uint32()),
        "date type": pa.Array.from_buffers(pa.date32(), n, [None, data]),
        "chunked": pa.chunked_array([array]),
        "not arrow": np.frombuffer(data, np.uint32),
    }


@pytest.mark.parametrize(
    "case",
    ["longer", "shorter", "nulls", "date type", "chunked", "not arrow"],
)
def test_learned_header_with_a_bad_payload_gets_the_full_paths_error(
    learned: tuple[pa.Array, dict[str, Any]], case: str
) -> None:
    array, meta = learned
    bad = _hostile_arrays(array)[case]
    assert _codec.fast_decode(bad, dict(meta)) is None
    with pytest.raises(PayloadError):
        at.decode(bad, dict(meta))


@pytest.mark.parametrize("container", [pa.float32(), pa.uint32(), pa.int32(), pa.uint8()])
def test_any_container_of_the_same_bytes_gives_the_same_view(
    learned: tuple[pa.Array, dict[str, Any]], container: pa.DataType
) -> None:
    """SPEC: the Arrow type only carries bytes. The encoder's own type (float32 here) is
    reshaped as it is; any other container is viewed as the dtype; both equal the full path."""
    array, meta = learned
    assert array.type == pa.float32()  # what the encoder sends for float32
    data = array.buffers()[1]
    other = pa.Array.from_buffers(container, data.size * 8 // container.bit_width, [None, data])
    fast = _codec.fast_decode(other, dict(meta))
    full = at.decode(other, dict(meta), writable=True)
    assert fast is not None
    assert not fast.flags.writeable
    assert (fast.dtype, fast.shape, fast.strides) == (full.dtype, full.shape, full.strides)
    np.testing.assert_array_equal(fast.view(np.uint32), full.view(np.uint32))


def test_another_learned_text_over_this_payload_is_viewed_as_that_text(
    learned: tuple[pa.Array, dict[str, Any]],
) -> None:
    """The cache answers for the text a message carries, never for the payload it came with."""
    array, meta = learned
    other = np.arange(30, dtype=np.float32).reshape(2, 3, 5)  # learned too, 120 bytes
    other_array, other_meta = at.encode(other)
    at.decode(other_array, other_meta)
    assert _codec.fast_decode(other_array, dict(other_meta)) is not None
    swapped = {**meta, _schema.KEY_TENSOR: other_meta[_schema.KEY_TENSOR]}
    assert _codec.fast_decode(array, swapped) is None
    with pytest.raises(PayloadError, match="holds 96 bytes but dtype and shape describe 120"):
        at.decode(array, swapped)
    assert _codec.fast_decode(other_array, dict(meta)) is None
    with pytest.raises(PayloadError, match="holds 120 bytes but dtype and shape describe 96"):
        at.decode(other_array, dict(meta))
    # The same 96 bytes under another learned header: that header's view, not the first's.
    same_size = np.arange(24, dtype=np.int32).reshape(4, 6).T
    same_array, same_meta = at.encode(same_size)
    at.decode(same_array, same_meta)
    relabelled = {**meta, _schema.KEY_TENSOR: same_meta[_schema.KEY_TENSOR]}
    y = _codec.fast_decode(array, relabelled)
    assert y is not None
    assert (y.dtype, y.shape, y.strides) == (np.int32, (6, 4), (4, 24))
    assert y.tobytes(order="A") == np.arange(24, dtype=np.float32).tobytes()
    x = _codec.fast_decode(array, dict(meta))
    assert x is not None
    assert (x.dtype, x.shape) == (np.float32, LEARNED_SHAPE)


def test_sliced_payload_and_mutable_buffer(learned: tuple[pa.Array, dict[str, Any]]) -> None:
    _, meta = learned
    wider = pa.Array.from_buffers(
        pa.uint32(), 26, [None, pa.py_buffer(np.arange(26, dtype=np.float32).copy())]
    )
    view = _codec.fast_decode(wider.slice(2, 24), dict(meta))
    assert view is not None
    np.testing.assert_array_equal(view.reshape(-1), np.arange(2, 26, dtype=np.float32))
    assert not view.flags.writeable  # over a mutable py_buffer: flagged read-only anyway


def test_header_cache_is_bounded_and_stays_correct() -> None:
    for n in range(1, _codec._FAST_DECODE.capacity + 40):
        x = np.full(n, n, dtype=np.int16)
        array, meta = at.encode(x)
        for _ in range(2):
            y = at.decode(array, dict(meta))
            assert y.shape == (n,)
            assert int(y[-1]) == n
    assert len(_codec._FAST_DECODE) <= _codec._FAST_DECODE.capacity


# --- the sending side -----------------------------------------------------------------------


class _Recorder(MockNode):
    def __init__(self) -> None:
        super().__init__([])
        self.sent: list[tuple[str, pa.Array, dict[str, Any]]] = []

    def send_output(self, output_id: str, data: Any, metadata: dict | None = None) -> None:
        self.sent.append((output_id, data, metadata or {}))


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "size1"])
def test_send_fast_path_sends_what_the_full_path_sends(
    framework: str, layout: str, tensors: Any
) -> None:
    if framework == "numpy":
        x: Any = _numpy_layouts(np.dtype(np.float32), tensors)[layout]
    else:
        x = _torch_layouts(torch.float32, tensors)[layout]
    node = _Recorder()
    for i in range(3):
        assert send(node, "out", x, {"i": i}) == "inline"
    full_array, full_meta = at.encode(x)
    dense = not _codec.plan(x).needs_copy
    for i, (_, array, meta) in enumerate(node.sent):
        assert meta == {**full_meta, "i": i, _schema.KEY_SEQ: i}  # numbered per output
        assert array.equals(full_array)
        if dense:  # the tensor's own memory, no copy
            assert array.buffers()[1].address == full_array.buffers()[1].address
    # Every message has a dict of its own: a receiver changing one cannot change the next.
    assert len({id(meta) for _, _, meta in node.sent}) == len(node.sent)
    for _, _, meta in node.sent:
        meta[_schema.KEY_TENSOR] = "numpy;uint8;1;0"
        meta[_schema.KEY_VERSION] = 1
        del meta[_schema.KEY_KIND]
    assert send(node, "out", x, {"i": 3}) == "inline"
    assert node.sent[-1][2] == {**full_meta, "i": 3, _schema.KEY_SEQ: 3}
    # The same without user metadata (the cached header's metadata, copied).
    for _ in range(3):
        assert send(node, "out", x) == "inline"
    plain = node.sent[-3:]
    assert [meta for _, _, meta in plain] == [
        {**full_meta, _schema.KEY_SEQ: i} for i in range(4, 7)
    ]
    assert len({id(meta) for _, _, meta in plain}) == 3
    plain[0][2].clear()
    plain[1][2][_schema.KEY_TENSOR] = "numpy;uint8;1;0"
    assert send(node, "out", x) == "inline"
    assert node.sent[-1][2] == {**full_meta, _schema.KEY_SEQ: 7}
    assert full_meta == at.encode(x)[1]


class _RawSample:
    """Like dora's sample: refuses to be sent while a view of it (a numpy array) is alive."""

    def __init__(self, node: _RawRecorder, output_id: str, nbytes: int, meta: dict) -> None:
        self.node, self.output_id, self.meta = node, output_id, dict(meta)
        self.buf = bytearray(nbytes)

    def __enter__(self) -> bytearray:
        self.refs = sys.getrefcount(self.buf) + 1  # the caller's name for it
        return self.buf

    def __exit__(self, *exc: object) -> None:
        if sys.getrefcount(self.buf) > self.refs:
            raise RuntimeError("Cannot send: buffer view(s) are still open")
        array = pa.array(np.frombuffer(bytes(self.buf), dtype=np.uint8))
        self.node.sent.append((self.output_id, array, self.meta))


class _RawRecorder(_Recorder):
    """Like a real dora node: ``send_output_raw`` hands out a writable sample."""

    def send_output_raw(self, output_id: str, nbytes: int, metadata: dict | None = None) -> Any:
        return _RawSample(self, output_id, nbytes, metadata or {})


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("big", [False, True], ids=["4 KiB", "4 MiB"])
def test_send_fast_path_compacts_into_raw_samples(framework: str, big: bool, tensors: Any) -> None:
    rows = 8192 if big else 8  # 4 MiB: compacted on torch's threads
    x: Any = tensors.random_torch((rows, 256), torch.float32)[:, ::2]  # NaN payloads too
    if framework == "numpy":
        x = x.numpy()
    node = _RawRecorder()
    for i in range(3):
        assert send(node, "out", x, {"i": i}) == "raw"
    full_array, full_meta = at.encode(x)
    for i, (_, array, meta) in enumerate(node.sent):
        assert meta == {**full_meta, "i": i, _schema.KEY_SEQ: i}  # numbered per output
        assert array.buffers()[1].to_pybytes() == full_array.buffers()[1].to_pybytes()
        y = Receiver().receive(array, dict(meta))
        assert type(y) is type(x)
        assert np.asarray(y).tobytes() == np.ascontiguousarray(np.asarray(x)).tobytes()


def test_send_fast_path_falls_back_inline_without_raw_samples() -> None:
    node = _Recorder()  # MockNode: send_output_raw raises NotImplementedError
    x = np.arange(4096, dtype=np.float32).reshape(64, 64)[:, ::2]
    assert [send(node, "out", x) for _ in range(3)] == ["inline"] * 3
    for _, array, meta in node.sent:
        np.testing.assert_array_equal(at.decode(array, meta), x)


def test_send_fast_path_checks_user_metadata_every_time() -> None:
    node = _Recorder()
    x = np.zeros(16, np.float32)
    send(node, "out", x, {"frame": 1})
    send(node, "out", x, {"frame": 2})
    # An at. key would override the cached header's metadata: refused every time.
    for key, value in [
        (_schema.KEY_TENSOR, "numpy;float32;4,4;0,1"),
        (_schema.KEY_TENSOR, "numpy;float32;16;0"),  # even the true header
        (_schema.KEY_VERSION, _schema.VERSION),
        (_schema.KEY_KIND, _schema.KIND_TENSOR),
        ("at.shape", 16),  # a version-1 key: still in the reserved at. namespace
    ]:
        with pytest.raises(MetadataError, match="reserved"):
            send(node, "out", x, {key: value})
        with pytest.raises(MetadataError, match="reserved"):
            send(node, "out", x, {"frame": 4, key: value})
    assert all(meta[_schema.KEY_TENSOR] == "numpy;float32;16;0" for _, _, meta in node.sent)
    with pytest.raises(MetadataError, match="must be bool, int, float, str"):
        send(node, "out", x, {"frame": object()})
    send(node, "out", x, {"frame": np.int64(3)})  # made plain, as on the full path
    assert node.sent[-1][2]["frame"] == 3
    assert type(node.sent[-1][2]["frame"]) is int


def test_send_fast_path_refuses_what_torch_numpy_refuses() -> None:
    node = _Recorder()
    x = torch.zeros(8)
    send(node, "out", x)
    send(node, "out", x)
    grad = torch.ones(8, requires_grad=True) * 2  # t.numpy() refuses: the full path detaches
    send(node, "out", grad)
    send(node, "out", grad)
    assert torch.equal(at.decode(node.sent[-1][1], node.sent[-1][2]), grad.detach())
    with pytest.raises(UnsupportedTensorError):
        send(node, "out", torch.zeros(2, 2).to_sparse())
    y = torch.zeros(8, dtype=torch.complex64).conj()  # a conjugate view: resolved, one copy
    send(node, "out", y)
    send(node, "out", y)
    decoded = at.decode(node.sent[-1][1], node.sent[-1][2])
    assert torch.equal(decoded, y.resolve_conj())


def _bytes_of(t: Any) -> Any:
    """A tensor's bits in logical order, comparable even with NaN payloads."""
    return t.contiguous().view(torch.uint8)


_TORCH_SEND_LAYOUTS = {
    "contiguous": lambda t: t,
    "transposed": lambda t: t.transpose(1, 2),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "offset": lambda t: t[1:],  # a view starting inside its storage
}


@pytest.mark.parametrize("layout", sorted(_TORCH_SEND_LAYOUTS))
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.uint8, torch.float16]
)
def test_torch_send_fast_path_sends_the_tensors_own_bytes(
    dtype: torch.dtype, layout: str, tensors: Any
) -> None:
    """Torch tensors go by their data pointer (no t.numpy()): the same message as encode."""
    node = _Recorder()
    sent = []
    for i in range(3):
        x = _TORCH_SEND_LAYOUTS[layout](tensors.random_torch((3, 4, 5, 6), dtype, i))
        assert send(node, "out", x) == "inline"
        sent.append((x, at.encode(x)))
    for i, ((x, (full_array, full_meta)), (_, array, meta)) in enumerate(
        zip(sent, node.sent, strict=True)
    ):
        assert meta == {**full_meta, _schema.KEY_SEQ: i}
        assert array.type == full_array.type
        assert array.buffers()[1].to_pybytes() == full_array.buffers()[1].to_pybytes()
        assert array.buffers()[1].address == x.data_ptr()  # no copy
        y = Receiver().receive(array, dict(meta))
        assert (y.dtype, y.shape, y.stride()) == (x.dtype, x.shape, x.stride())
        assert torch.equal(_bytes_of(y), _bytes_of(x))


def test_torch_send_fast_path_keeps_the_tensor_alive() -> None:
    node = _Recorder()
    send(node, "out", torch.arange(1024.0))
    send(node, "out", torch.arange(1024.0) * 3)  # nobody else holds this tensor
    gc.collect()
    for _ in range(100):  # reuse the freed memory if it were freed
        torch.full((1024,), -1.0)
    _, array, meta = node.sent[-1]
    assert torch.equal(at.decode(array, meta), torch.arange(1024.0) * 3)


@pytest.mark.parametrize("first", ["plain", "view"])
@pytest.mark.parametrize("view", ["neg", "conj"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "non_dense"])
def test_torch_send_fast_path_resolves_negative_and_conjugate_views_per_tensor(
    first: str, view: str, layout: str, tensors: Any
) -> None:
    """A negative or conjugate view has the layout of a plain tensor but other values: the
    fast path checks every tensor, and a view never teaches it a layout."""
    dtype = torch.complex64 if view == "conj" else torch.float32
    make = torch._neg_view if view == "neg" else torch.conj
    # non_dense: a view resolves into a dense copy, which must not teach its layout to the
    # strides of the view (the next plain tensor with them is not dense).
    select = (lambda t: t[:, :, ::2]) if layout == "non_dense" else _TORCH_SEND_LAYOUTS[layout]
    full = tensors.random_torch((3, 4, 10), dtype, 1)
    plain, viewed = select(full.clone()), make(select(full))
    assert viewed.stride() == plain.stride()
    assert viewed.is_neg() if view == "neg" else viewed.is_conj()
    order = [plain, viewed] * 2 if first == "plain" else [viewed, plain] * 2
    node = _Recorder()
    for x in order:
        send(node, "out", x)
    for x, (_, array, meta) in zip(order, node.sent, strict=True):
        y = at.decode(array, meta)
        assert torch.equal(_bytes_of(y), _bytes_of(x.resolve_neg().resolve_conj()))


def test_torch_send_fast_path_never_reads_a_zero_tensors_pointer() -> None:
    """A ZeroTensor view has a dense layout but no memory: its data_ptr is an offset from 0
    (reading it crashed the sender). Both paths refuse it with a typed error."""
    zeros = torch._efficientzerotensor((4, 3), dtype=torch.float32)[1:]
    assert zeros._is_zerotensor()
    assert zeros.stride() == (3, 1)
    node = _Recorder()
    with pytest.raises(UnsupportedTensorError, match="no CPU memory of its own"):
        send(node, "out", zeros)  # first: nothing learned from it
    send(node, "out", torch.ones(3, 3))  # the layout is learned
    with pytest.raises(UnsupportedTensorError, match="no CPU memory of its own"):
        send(node, "out", zeros)
    send(node, "out", torch.ones(3, 3) * 2)
    assert [m[_schema.KEY_TENSOR] for _, _, m in node.sent] == ["torch;float32;3,3;0,1"] * 2
    assert torch.equal(at.decode(node.sent[-1][1], node.sent[-1][2]), torch.full((3, 3), 2.0))


def test_torch_send_fast_path_refuses_storage_less_wrappers_with_a_typed_error() -> None:
    """functorch wrappers have no storage (data_ptr raises): refused like on the full path,
    before and after the layout is learned, and they teach the fast path nothing."""
    node = _Recorder()
    refused: list[Exception] = []

    def send_inside_grad(x: Any) -> Any:
        try:
            send(node, "out", x * 1)
        except UnsupportedTensorError as exc:
            refused.append(exc)
        return (x * x).sum()

    torch.func.grad(send_inside_grad)(torch.ones(3, 3))  # first: nothing learned
    send(node, "out", torch.ones(3, 3))
    assert _facts.FAST_SENDS.get(_fast_key(node, torch.ones(3, 3)), "unseen") is not None
    torch.func.grad(send_inside_grad)(torch.ones(3, 3))  # after learning
    assert len(refused) == 2
    assert all("no CPU memory of its own" in str(exc) for exc in refused)
    assert len(node.sent) == 1


def _fast_key(node: Any, x: Any) -> tuple[Any, ...]:
    return (id(node), "out", type(x), x.dtype, x.shape, x.stride())


def test_fast_decode_never_keeps_an_overlong_header(learned: tuple[pa.Array, Any]) -> None:
    array, meta = learned
    before = dict(_codec._FAST_DECODE)
    for i in range(3):
        text = _LEARNED_TEXT + " " * _schema.MAX_HEADER_CHARS + str(i)
        bad = {**meta, _schema.KEY_TENSOR: text}
        assert _codec.fast_decode(array, bad) is None
        with pytest.raises(MetadataError, match="characters; at most 4096"):
            at.decode(array, bad)
    assert _codec._FAST_DECODE == before
    assert all(len(key) <= _schema.MAX_HEADER_CHARS for key in _schema._HEADERS)


def test_torch_send_fast_path_never_reads_another_devices_pointer() -> None:
    node = _Recorder()
    send(node, "out", torch.zeros(8))
    send(node, "out", torch.zeros(8))
    meta_tensor = torch.empty(8, device="meta")  # same dtype, shape and strides
    with pytest.raises(at.ArrowTensorError):
        send(node, "out", meta_tensor)
    assert len(node.sent) == 2


def test_send_fast_path_skips_outputs_that_may_loan(monkeypatch: pytest.MonkeyPatch) -> None:
    node = _Recorder()
    x = np.zeros(16, np.float32)
    send(node, "out", x)
    state = _facts.state_of(node, "out")
    assert len(state.fast_keys()) == 1
    calls: list[Any] = []

    class Pool:
        def loaned_header(self, value: Any) -> None:
            calls.append(value)

        def owns(self, address: int) -> bool:
            return False

    monkeypatch.setattr(state, "pool", Pool())
    state.forget_fast()  # as state.shm_pool() does when it makes the pool
    send(node, "out", x)
    assert calls, "an output with a pool must ask the pool about every tensor"


# --- compaction ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8", "<c8", "<c16", "|u1", "|b1", "<i8"])
def test_compact_moves_bits_exactly(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_codec, "PARALLEL_COPY_BYTES", 0)
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, 64 * 48 * np.dtype(dtype).itemsize, dtype=np.uint8)
    if dtype == "|b1":
        raw &= 1
    source = raw.view(dtype).reshape(64, 48)[:, ::3]  # NaN payloads, -0.0, subnormals
    expected = np.ascontiguousarray(source)
    dest = np.empty(source.shape, source.dtype)
    _codec.compact(dest, source)
    assert dest.tobytes() == expected.tobytes()


def test_compact_takes_torch_only_where_it_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_codec, "PARALLEL_COPY_BYTES", 0)
    monkeypatch.setattr(_torch, "threads", lambda: 2)  # as on any multi-core machine
    used: list[str] = []
    real_copyto = np.copyto
    monkeypatch.setattr(np, "copyto", lambda d, s: used.append("numpy") or real_copyto(d, s))
    base = np.arange(64, dtype=np.float32).reshape(8, 8)
    cases = {
        "strided": (base[:, ::2], "torch"),
        "negative": (base[::-1, ::2], "numpy"),
        "byteswap": (base.astype(">f4")[:, ::2], "numpy"),
    }
    readonly = base[:, ::2]
    readonly.flags.writeable = False
    cases["read-only"] = (readonly, "numpy")
    for name, (source, expected) in cases.items():
        used.clear()
        dest = np.empty(source.shape, "<f4")
        _codec.compact(dest, source)
        assert (used[:1] or ["torch"])[0] == expected, name
        np.testing.assert_array_equal(dest, source.astype("<f4"))


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_fast_views_keep_the_received_buffer_alive(framework: str) -> None:
    import gc

    x: Any = np.arange(4096, dtype=np.float32).reshape(64, 64)
    if framework == "torch":
        x = torch.from_numpy(x.copy())
    array, meta = at.encode(x)
    at.decode(array, meta)
    received = pa.Array.from_buffers(
        pa.uint32(), 4096, [None, pa.py_buffer(bytes(array.buffers()[1]))]
    )
    y = _codec.fast_decode(received, dict(meta))
    assert y is not None
    del received
    gc.collect()
    _ = [bytearray(1 << 16) for _ in range(64)]  # reuse freed memory if it was freed
    expected = np.arange(4096, dtype=np.float32).reshape(64, 64)
    np.testing.assert_array_equal(np.asarray(y), expected)
