"""Hostile and malformed input: the exact error type, and a message naming what was received.

Never a crash of another type, a view outside the buffer, a huge allocation or a silently
wrong tensor.
"""

from __future__ import annotations

import re
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
import torch


@pytest.fixture
def message() -> tuple[pa.Array, dict[str, Any]]:
    """A valid float32 [3, 4] numpy message (48 payload bytes)."""
    return at.encode(np.arange(12, dtype=np.float32).reshape(3, 4))


def _with(meta: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(meta)
    for key, value in changes.items():
        key = "at." + key
        if value is _DROP:
            del out[key]
        else:
            out[key] = value
    return out


_DROP = object()


def test_every_error_is_an_arrow_tensor_value_error() -> None:
    for cls in (
        at.ChecksumError,
        at.MetadataError,
        at.NotATensorMessageError,
        at.PayloadError,
        at.UnsupportedTensorError,
        at.VersionError,
    ):
        assert issubclass(cls, at.ArrowTensorError)
    assert issubclass(at.ArrowTensorError, ValueError)


# --- metadata ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["kind", "framework", "dtype", "shape", "perm"])
def test_missing_key(message, key: str) -> None:
    array, meta = message
    with pytest.raises(at.MetadataError, match=re.escape(f"metadata lacks 'at.{key}'")):
        at.decode(array, _with(meta, **{key: _DROP}))


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("version", True, "'at.version' must be int, got bool True"),
        ("version", 1.0, "'at.version' must be int, got float 1.0"),
        ("version", "1", "'at.version' must be int, got str '1'"),
        ("kind", 1, "'at.kind' must be str, got int 1"),
        ("framework", "jax", "'at.framework' must be one of ('numpy', 'torch'"),
        ("framework", "jax", "got 'jax'"),
        ("framework", None, "'at.framework' must be str, got NoneType None"),
        ("dtype", 5, "'at.dtype' must be str, got int 5"),
        ("shape", "[3, 4]", "'at.shape' must be list/tuple, got str '[3, 4]'"),
        ("shape", [3.0, 4], "'at.shape' must be a list of int, got list [3.0, 4]"),
        ("shape", [True, 4], "'at.shape' must be a list of int, got list [True, 4]"),
        ("shape", [np.int64(3), 4], "'at.shape' must be a list of int"),
        ("shape", 12, "'at.shape' must be list/tuple, got int 12"),
        ("perm", [0, 1.0], "'at.perm' must be a list of int, got list [0, 1.0]"),
        ("perm", [False, True], "'at.perm' must be a list of int, got list [False, True]"),
    ],
)
def test_wrong_types(message, key: str, value: Any, fragment: str) -> None:
    array, meta = message
    with pytest.raises(at.MetadataError, match=re.escape(fragment)):
        at.decode(array, _with(meta, **{key: value}))


@pytest.mark.parametrize(
    ("shape", "perm", "error", "fragment"),
    [
        ([3, -4], [0, 1], at.MetadataError, "'at.shape' has a negative dimension: [3, -4]"),
        ([-3, -4], [0, 1], at.MetadataError, "negative dimension"),
        ([2**40], [0], at.PayloadError, "payload holds 48 bytes but dtype and shape describe"),
        ([2**20, 2**20], [0, 1], at.PayloadError, f"describe {4 * 2**40} bytes"),
        ([2**31, 2**31, 2**31], [0, 1, 2], at.MetadataError, "spans more than 2**62 bytes"),
        ([2**64], [0], at.MetadataError, "spans more than 2**62 bytes"),
        ([2**61], [0], at.MetadataError, "spans more than 2**62 bytes"),  # x 4 bytes
        ([0, 2**62], [0, 1], at.MetadataError, "spans more than 2**62 bytes"),
        ([0, 2**63 - 1], [1, 0], at.MetadataError, "spans more than 2**62 bytes"),
        ([0, 2**70], [0, 1], at.MetadataError, "spans more than 2**62 bytes"),
        ([2, 6], [0, 1], None, None),
        ([6, 2], [1, 0], None, None),
        ([12], [0], None, None),
        ([3, 4], [0, 0], at.MetadataError, "must be a permutation of 0..1 for shape [3, 4]"),
        ([3, 4], [1, 2], at.MetadataError, "got [1, 2]"),
        ([3, 4], [0], at.MetadataError, "got [0]"),
        ([3, 4], [0, 1, 2], at.MetadataError, "got [0, 1, 2]"),
        ([3, 4], [-1, 0], at.MetadataError, "got [-1, 0]"),
        ([1] * 65, list(range(65)), at.MetadataError, "'at.shape' has 65 entries; at most 64"),
        ([12], list(range(65)), at.MetadataError, "'at.perm' has 65 entries; at most 64"),
    ],
)
def test_shape_and_perm(message, shape, perm, error, fragment) -> None:
    array, meta = message
    bad = _with(meta, shape=shape, perm=perm)
    if error is None:
        assert at.decode(array, bad).shape == tuple(shape)
        return
    with pytest.raises(error, match=re.escape(fragment)):
        at.decode(array, bad)


def test_zero_size_with_huge_dims_is_refused_not_crashed() -> None:
    """numpy/torch size every dimension of an empty tensor: without the bound, decode raised a
    bare numpy ValueError ("array is too big") or torch RuntimeError."""
    empty = pa.array([], pa.uint8())
    for framework in ("numpy", "torch"):
        meta = at.encode(np.zeros((0, 1), np.float64))[1] | {"at.framework": framework}
        for shape in ([0, 2**61], [0, 2**40, 2**40]):
            bad = meta | {"at.shape": shape, "at.perm": list(range(len(shape)))}
            with pytest.raises(at.MetadataError, match="spans more than"):
                at.decode(empty, bad)
    ok = at.encode(np.zeros((0, 1), np.float64))[1] | {"at.shape": [0, 2**58]}
    assert at.decode(empty, ok).shape == (0, 2**58)


def test_64_dims_are_allowed() -> None:
    x = np.arange(2, dtype=np.int16).reshape((2,) + (1,) * 63)
    y = at.decode(*at.encode(x))
    assert y.shape == x.shape
    np.testing.assert_array_equal(y, x)


def test_encode_refuses_over_64_dims_never_reaches_wire() -> None:
    # numpy itself caps at 64 dims; torch does not.
    t = torch.zeros((1,) * 65)
    with pytest.raises(at.UnsupportedTensorError, match="65 dimensions; at most 64"):
        at.encode(t)


@pytest.mark.parametrize("dtype", ["float128", "Float32", "", "torch.float32", "f4", "x" * 5000])
def test_unknown_dtype(message, dtype: str) -> None:
    array, meta = message
    with pytest.raises(at.MetadataError, match="unknown dtype") as info:
        at.decode(array, _with(meta, dtype=dtype))
    assert repr(dtype[:64]) in str(info.value)
    assert "float32" in str(info.value)  # names what is expected
    assert len(str(info.value)) < 1000  # a hostile name is not echoed in full


def test_numpy_message_with_torch_only_dtype(message) -> None:
    array, meta = message
    bad = _with(meta, dtype="bfloat16", shape=[24], perm=[0])
    with pytest.raises(at.MetadataError, match="'bfloat16' has no numpy form"):
        at.decode(array, bad)


def test_dtype_change_is_seen_as_size_mismatch(message) -> None:
    array, meta = message
    with pytest.raises(at.PayloadError, match="48 bytes but dtype and shape describe 96"):
        at.decode(array, _with(meta, dtype="float64"))


@pytest.mark.parametrize("version", [0, 2, 99, -1, 2**62])
def test_unknown_version(message, version: int) -> None:
    array, meta = message
    with pytest.raises(
        at.VersionError, match=f"version {version} is not supported.*reads version 1"
    ):
        at.decode(array, _with(meta, version=version))


@pytest.mark.parametrize("kind", ["matrix", "Tensor", "", "x" * 500])
def test_unknown_kind(message, kind: str) -> None:
    array, meta = message
    with pytest.raises(at.MetadataError, match="unknown message kind") as info:
        at.decode(array, _with(meta, kind=kind))
    assert repr(kind[:40]) in str(info.value)
    assert "'tensor'" in str(info.value)


@pytest.mark.parametrize(
    "meta",
    [
        {"shape": [3, 4], "dtype": "float32"},
        {"timestamp": 123},
        {},
        {"ARROW:extension:name": "arrow.fixed_shape_tensor"},
        {1: "a", "b": 2},  # non-str keys (not from dora, but must not crash the message)
    ],
)
def test_another_librarys_message(message, meta) -> None:
    array, _ = message
    with pytest.raises(at.NotATensorMessageError, match="not an arrow_tensor message"):
        at.decode(array, meta)


@pytest.mark.parametrize("meta", [None, [("at.version", 1)], "at.version", 1])
def test_metadata_not_a_mapping(message, meta) -> None:
    array, _ = message
    with pytest.raises(
        at.MetadataError, match=f"metadata must be a dict.*got {type(meta).__name__}"
    ):
        at.decode(array, meta)


def test_foreign_keys_are_ignored(message) -> None:
    array, meta = message
    extra = {"timestamp": 1_700_000_000, "user": "x", "shape": [9], "dtype": "int8", "at.future": 1}
    y = at.decode(array, {**extra, **meta})
    np.testing.assert_array_equal(y, np.arange(12, dtype=np.float32).reshape(3, 4))
    checked = at.encode(np.arange(3.0), checksum=True)
    at.decode(checked[0], {**checked[1], "timestamp": 5, "frame": 7}, verify=True)


def test_metadata_is_not_mutated(message) -> None:
    array, meta = message
    before = {k: (list(v) if isinstance(v, list) else v) for k, v in meta.items()}
    at.decode(array, meta, writable=True)
    assert meta == before


# --- payload ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (pa.array(np.zeros(12, np.float32)), "uint8/uint16/uint32/uint64, got type float"),
        (pa.array(np.zeros(12, np.int32)), "got type int32"),
        (pa.array(["a"] * 48), "got type string"),
        (pa.array([b"x" * 48]), "got type binary"),
        (pa.array([True] * 384), "got type bool"),
        (pa.array([[1] * 48], pa.list_(pa.uint8())), "got type list<item: uint8>"),
        (pa.array(np.zeros(48, np.uint8)).cast(pa.uint8()).dictionary_encode(), "dictionary"),
    ],
)
def test_wrong_arrow_type(message, array, fragment: str) -> None:
    _, meta = message
    with pytest.raises(at.PayloadError, match=re.escape(fragment)):
        at.decode(array, meta)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (np.zeros(48, np.uint8), "expected a pyarrow.Array, got ndarray"),
        (None, "expected a pyarrow.Array, got NoneType"),
        (b"x" * 48, "expected a pyarrow.Array, got bytes"),
        (pa.py_buffer(b"x" * 48), "expected a pyarrow.Array, got Buffer"),
        (pa.chunked_array([np.zeros(24, np.uint8)] * 2), "got a ChunkedArray of 2 chunks"),
        (torch.zeros(48, dtype=torch.uint8), "expected a pyarrow.Array, got Tensor"),
    ],
)
def test_not_an_arrow_array(message, value, fragment: str) -> None:
    _, meta = message
    with pytest.raises(at.PayloadError, match=re.escape(fragment)):
        at.decode(value, meta)


def test_array_with_nulls(message) -> None:
    _, meta = message
    arr = pa.array([1] * 47 + [None], pa.uint8())
    with pytest.raises(at.PayloadError, match="payload array has 1 nulls; expected none"):
        at.decode(arr, meta)


@pytest.mark.parametrize(
    ("words", "storage"), [(11, pa.uint32()), (13, pa.uint32()), (47, pa.uint8())]
)
def test_buffer_size_mismatch(message, words: int, storage) -> None:
    _, meta = message
    width = storage.bit_width // 8
    arr = pa.array(np.zeros(words, f"<u{width}"), storage)
    with pytest.raises(
        at.PayloadError, match=f"payload holds {words * width} bytes but .* describe 48 bytes"
    ):
        at.decode(arr, meta)


def test_sliced_array_reads_only_its_slice(message) -> None:
    array, meta = message
    words = array.to_numpy()
    big = pa.array(np.concatenate([np.full(5, 0xDEADBEEF, np.uint32), words, words]))
    y = at.decode(big.slice(5, 12), meta)
    np.testing.assert_array_equal(y, np.arange(12, dtype=np.float32).reshape(3, 4))
    with pytest.raises(at.PayloadError, match="holds 52 bytes"):
        at.decode(big.slice(5, 13), meta)


def test_empty_array_for_empty_tensor() -> None:
    array, meta = at.encode(np.zeros((3, 0), np.float32))
    assert len(array) == 0
    assert at.decode(pa.array([], pa.uint64()), meta).shape == (3, 0)
    with pytest.raises(at.PayloadError, match="holds 1 bytes but dtype and shape describe 0"):
        at.decode(pa.array([0], pa.uint8()), meta)


# --- checksums ------------------------------------------------------------------------------


@pytest.fixture
def checked() -> tuple[pa.Array, dict[str, Any]]:
    return at.encode(np.arange(12, dtype=np.int32).reshape(3, 4), checksum=True)


def _flipped(array: pa.Array, index: int) -> pa.Array:
    data = bytearray(array.buffers()[1].to_pybytes()[: array.nbytes])
    data[index] ^= 0x01
    return pa.Array.from_buffers(array.type, len(array), [None, pa.py_buffer(bytes(data))])


def test_checksum_passes(checked) -> None:
    array, meta = checked
    assert re.fullmatch(r"xxh3_64:[0-9a-f]{16}", meta["at.checksum"])
    np.testing.assert_array_equal(at.decode(array, meta, verify=True), np.arange(12).reshape(3, 4))


@pytest.mark.parametrize("index", [0, 1, 23, 47])
def test_checksum_catches_one_flipped_byte(checked, index: int) -> None:
    array, meta = checked
    with pytest.raises(at.ChecksumError, match="checksum mismatch: message says xxh3_64:"):
        at.decode(_flipped(array, index), meta, verify=True)
    assert at.decode(_flipped(array, index), meta).shape == (3, 4)  # verify=False trusts it


@pytest.mark.parametrize(
    "change",
    [
        {"at.shape": [2, 6]},
        {"at.shape": [4, 3]},
        {"at.shape": [12], "at.perm": [0]},
        {"at.shape": [3, 4, 1], "at.perm": [0, 1, 2]},
        {"at.dtype": "float32"},
        {"at.dtype": "uint32"},
        {"at.perm": [1, 0]},
    ],
)
def test_checksum_catches_changed_header(checked, change) -> None:
    array, meta = checked
    with pytest.raises(at.ChecksumError, match="dtype, shape, layout or bytes changed"):
        at.decode(array, {**meta, **change}, verify=True)


def test_verify_without_checksum(message) -> None:
    array, meta = message
    with pytest.raises(at.ChecksumError, match="carries no checksum; encode with checksum=True"):
        at.decode(array, meta, verify=True)


@pytest.mark.parametrize("value", [12345, "md5:abc", "", ["xxh3_64:0"], True])
def test_malformed_checksum(checked, value) -> None:
    array, meta = checked
    with pytest.raises(at.MetadataError, match="checksum must be a str 'xxh3_64:<hex>'"):
        at.decode(array, {**meta, "at.checksum": value}, verify=True)


def test_checksum_of_wrong_value(checked) -> None:
    array, meta = checked
    with pytest.raises(at.ChecksumError, match="message says xxh3_64:0000000000000000"):
        at.decode(array, {**meta, "at.checksum": "xxh3_64:0000000000000000"}, verify=True)


# --- what encode refuses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.array([object(), 1], dtype=object), "object arrays hold Python references"),
        (np.array(["ab", "c"]), "encode text as bytes"),
        (np.array([b"ab"]), "view fixed-width bytes as uint8"),
        (np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]), "view structured data as uint8"),
        (np.zeros(2, dtype="V4"), "view structured data as uint8"),
        (np.array(["2024-01-01"], dtype="datetime64[s]"), "convert datetimes to int64"),
        (np.array([1], dtype="timedelta64[ms]"), "convert timedeltas to int64"),
        (np.zeros(2, dtype=np.longdouble), "use one of bool, uint8"),
        (np.zeros(2, dtype=np.clongdouble), "use one of bool, uint8"),
    ],
)
def test_numpy_dtypes_without_wire_form(array: np.ndarray, fragment: str) -> None:
    with pytest.raises(at.UnsupportedTensorError, match=re.escape(fragment)) as info:
        at.encode(array)
    assert repr(array.dtype.str) in str(info.value)  # names what was received


def test_masked_array_is_refused_not_stripped() -> None:
    """Encoding a MaskedArray used to drop its mask silently."""
    masked = np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])
    with pytest.raises(at.UnsupportedTensorError, match=r"masked array .* mask would be lost"):
        at.encode(masked)


def _sparse() -> torch.Tensor:
    return torch.eye(3).to_sparse()


def _quantized() -> torch.Tensor:
    with pytest.warns(UserWarning, match="quantize"):
        return torch.quantize_per_tensor(torch.rand(3), 0.1, 0, torch.quint8)


def _nested() -> torch.Tensor:
    with pytest.warns(UserWarning, match="nested"):
        return torch.nested.nested_tensor([torch.rand(2), torch.rand(3)])


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (_sparse, "torch layout torch.sparse_coo is not supported; convert with t.to_dense()"),
        (lambda: torch.eye(3).to_sparse().coalesce(), "sparse_coo"),
        (_quantized, "send t.dequantize(), or t.int_repr()"),
        (_nested, "nested tensors are not supported; send t.unbind()"),
        (lambda: torch.empty(3, device="meta"), "meta tensors hold no data"),
    ],
)
def test_torch_tensors_without_wire_form(make, fragment: str) -> None:
    t = make()
    with pytest.raises(at.UnsupportedTensorError, match=re.escape(fragment)):
        at.encode(t)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (np.float32(1.5), "got a numpy scalar numpy.float32; wrap it as a 0-d array"),
        (np.int64(3), "numpy scalar numpy.int64"),
        (np.bool_(True), "numpy scalar numpy.bool"),
        (1.5, "expected a torch.Tensor or numpy.ndarray, got builtins.float"),
        (3, "got builtins.int"),
        (True, "got builtins.bool"),
        ("text", "got builtins.str"),
        (b"bytes", "got builtins.bytes"),
        (None, "got builtins.NoneType"),
        (pa.array([1, 2]), "convert it to numpy (np.asarray) or torch (torch.from_dlpack)"),
        (memoryview(b"ab"), "got builtins.memoryview"),
    ],
)
def test_encode_non_tensors(value: Any, fragment: str) -> None:
    with pytest.raises(at.UnsupportedTensorError, match=re.escape(fragment)):
        at.encode(value)


def test_unsupported_is_also_a_type_error() -> None:
    with pytest.raises(TypeError):
        at.encode("text")


# --- torch side of a message ------------------------------------------------------------------


def test_torch_message_with_huge_but_consistent_header_is_bounded(message) -> None:
    array, meta = message
    bad = {**meta, "at.framework": "torch", "at.shape": [2**20, 2**20], "at.perm": [1, 0]}
    with pytest.raises(at.PayloadError, match="48 bytes but dtype and shape describe"):
        at.decode(array, bad)


def test_bool_payload_decodes_only_its_bytes() -> None:
    array, meta = at.encode(np.array([True, False, True]))
    assert meta["at.dtype"] == "bool"
    np.testing.assert_array_equal(at.decode(array, meta), [True, False, True])
    torch_meta = {**meta, "at.framework": "torch"}
    assert at.decode(array, torch_meta).tolist() == [True, False, True]


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("bad_byte", [2, 255])
def test_bool_bytes_other_than_0_1_are_refused(framework: str, bad_byte: int) -> None:
    x = np.array([True, False, True]) if framework == "numpy" else torch.tensor([True, False])
    _, meta = at.encode(x)
    raw = np.zeros(len(x), dtype=np.uint8)
    raw[-1] = bad_byte
    with pytest.raises(at.PayloadError, match="bool payload holds bytes other than 0 and 1"):
        at.decode(pa.array(raw), meta)


@pytest.mark.parametrize("framework", ["cupy", "pyarrow.cuda"])
def test_tensor_message_claiming_a_device_framework(message, framework: str) -> None:
    array, meta = message
    with pytest.raises(at.MetadataError, match=re.escape(repr(framework))):
        at.decode(array, _with(meta, framework=framework))
