"""The wire metadata: what keys and value types encode writes, and SPEC.md conformance."""

from __future__ import annotations

import re
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
import torch
import xxhash
from arrow_tensor.codec import _dtypes, _schema
from lookalikes import Spoof


def _dora_safe(value: Any) -> bool:
    """What dora 1.1 carries with its type: bool, int64, float, str, homogeneous lists."""
    if isinstance(value, bool | float | str):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    if isinstance(value, list):
        kinds = {type(v) for v in value}
        return len(kinds) <= 1 and kinds <= {int, float, str} and all(map(_dora_safe, value))
    return False


_DIMS = r"(?:0|[1-9][0-9]{0,18})(?:,(?:0|[1-9][0-9]{0,18}))*"
_HEADER = re.compile(rf"(numpy|torch);([a-z0-9_]+);((?:{_DIMS})?);((?:{_DIMS})?)")
"""SPEC.md's at.tensor grammar, written out independently of the library."""


@pytest.mark.parametrize("checksum", [False, True])
def test_metadata_is_flat_namespaced_and_dora_safe(torch_dtype, checksum: bool, tensors) -> None:
    x = tensors.random_torch((2, 3, 4), torch_dtype).permute(2, 0, 1)
    _, meta = at.encode(x, checksum=checksum)
    assert all(key.startswith("at.") for key in meta)
    assert "timestamp" not in meta
    assert all(_dora_safe(v) for v in meta.values()), meta
    expected = {"at.version", "at.kind", "at.tensor"} | ({"at.checksum"} if checksum else set())
    assert set(meta) == expected
    assert type(meta["at.version"]) is int
    assert meta["at.version"] == 2
    assert type(meta["at.kind"]) is str
    assert meta["at.kind"] == "tensor"
    text = meta["at.tensor"]
    assert type(text) is str
    assert len(text) <= _schema.MAX_HEADER_CHARS
    assert text.isascii()
    dtype = str(torch_dtype).removeprefix("torch.")
    assert text == f"torch;{dtype};4,2,3;1,2,0"
    assert _HEADER.fullmatch(text), text
    assert ("at.checksum" in meta) is checksum


def test_golden_contiguous_message() -> None:
    array, meta = at.encode(np.array([[1, 2, 3], [4, 5, 6]], dtype="<i2"))
    assert meta == {"at.version": 2, "at.kind": "tensor", "at.tensor": "numpy;int16;2,3;0,1"}
    assert [type(v) for v in meta.values()] == [int, str, str]
    assert array.type == pa.int16()  # the dtype's own Arrow type, where Arrow has it
    assert array.buffers()[1].to_pybytes()[: array.nbytes] == bytes.fromhex(
        "0100 0200 0300 0400 0500 0600".replace(" ", "")
    )


def test_golden_transposed_torch_message() -> None:
    """SPEC example: a transposed matrix travels as it lies in memory with perm [1, 0]."""
    base = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float32)
    array, meta = at.encode(base.t(), checksum=True)
    payload = array.buffers()[1].to_pybytes()[: array.nbytes]
    assert payload == np.array([1, 2, 3, 4, 5, 6], "<f4").tobytes()
    header = b"arrow_tensor/2;float32;[3,2];[1,0]"
    checksum = "xxh3_64:" + xxhash.xxh3_64(header + payload).hexdigest()
    assert meta == {
        "at.version": 2,
        "at.kind": "tensor",
        "at.tensor": "torch;float32;3,2;1,0",
        "at.checksum": checksum,
    }


def test_golden_channels_last_perm() -> None:
    x = torch.zeros(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert at.encode(x)[1]["at.tensor"] == "torch;float32;2,3,4,5;0,2,3,1"


def test_golden_zero_d_checksum() -> None:
    array, meta = at.encode(np.array(-3, dtype=np.int8), checksum=True)
    expected = xxhash.xxh3_64(b"arrow_tensor/2;int8;[];[]" + b"\xfd").hexdigest()
    assert meta == {
        "at.version": 2,
        "at.kind": "tensor",
        "at.tensor": "numpy;int8;;",
        "at.checksum": f"xxh3_64:{expected}",
    }
    y = at.decode(array, meta, verify=True)
    assert y.shape == ()
    assert y == -3


def test_complex128_travels_as_two_uint64() -> None:
    x = np.array([1 + 2j, 3 - 4j], dtype="<c16")
    array, _ = at.encode(x)
    assert array.type == pa.uint64()
    assert len(array) == 4
    assert array.buffers()[1].to_pybytes()[: array.nbytes] == x.tobytes()


def test_big_endian_goes_little_endian_on_the_wire() -> None:
    x = np.array([1, 256], dtype=">u2")
    array, meta = at.encode(x)
    assert meta["at.tensor"] == "numpy;uint16;2;0"
    assert array.buffers()[1].to_pybytes()[: array.nbytes] == b"\x01\x00\x00\x01"


def test_a_foreign_decoder_following_the_spec(tensors) -> None:
    """Decode a permuted tensor with nothing but the rules of SPEC.md and compare."""
    x = tensors.random_torch((2, 5, 3, 4), torch.float64, 1).permute(0, 3, 1, 2)
    array, meta = at.encode(x)
    assert meta["at.version"] == 2
    framework, dtype, shape_text, perm_text = meta["at.tensor"].split(";")
    assert (framework, dtype) == ("torch", "float64")
    shape = [int(v) for v in shape_text.split(",")]
    perm = [int(v) for v in perm_text.split(",")]
    physical = [shape[p] for p in perm]
    raw = np.frombuffer(array.buffers()[1], "<f8", count=int(np.prod(shape))).reshape(physical)
    inverse = [perm.index(d) for d in range(len(perm))]
    np.testing.assert_array_equal(raw.transpose(inverse), x.numpy())


def test_every_table_dtype_is_in_the_spec() -> None:
    spec = __import__("pathlib").Path(at.__file__).parents[2].joinpath("SPEC.md").read_text()
    for entry in _dtypes.ALL:
        assert f"`{entry.name}`" in spec, entry.name


def test_dtype_table_is_consistent() -> None:
    names = [d.name for d in _dtypes.ALL]
    assert len(names) == len(set(names))
    for entry in _dtypes.ALL:
        assert entry.storage.itemsize in (1, 2, 4, 8)
        assert entry.bits_view.itemsize == entry.itemsize
        if entry.numpy is not None:
            assert np.dtype(entry.numpy).itemsize == entry.itemsize
            assert _dtypes.from_numpy(np.dtype(entry.numpy)) is entry
        found = getattr(torch, entry.torch or "", None)
        if found is not None:
            assert torch.empty(0, dtype=torch.uint8).view(found).element_size() == entry.itemsize
            assert _dtypes.from_torch(found) is entry


def test_header_round_trip_and_describe() -> None:
    header = _schema.TensorHeader(_dtypes.BY_NAME["bfloat16"], (2, 0, 3), (2, 0, 1), "torch")
    meta = header.to_metadata()
    assert meta == {"at.version": 2, "at.kind": "tensor", "at.tensor": "torch;bfloat16;2,0,3;2,0,1"}
    assert header.text == "torch;bfloat16;2,0,3;2,0,1"
    assert _schema.pack("torch", "bfloat16", (2, 0, 3), [2, 0, 1]) == header.text
    assert _schema.parse_header(_schema.check_envelope(meta)) == header
    assert _schema.parse_text(header.text) == header
    assert header.describe() == "arrow_tensor/2;bfloat16;[2,0,3];[2,0,1]"
    assert header.physical_shape == (3, 2, 0)
    assert header.nbytes == 0


@pytest.mark.parametrize(
    ("text", "shape", "perm"),
    [
        ("numpy;int8;;", (), ()),
        ("numpy;int8;0;0", (0,), (0,)),
        ("numpy;int8;7;0", (7,), (0,)),
        ("torch;float32;3,2;1,0", (3, 2), (1, 0)),
        ("torch;float32;2,3,4,5;0,2,3,1", (2, 3, 4, 5), (0, 2, 3, 1)),
        ("numpy;int8;0,4611686018427387904;1,0", (0, 2**62), (1, 0)),
        (
            _schema.pack("numpy", "int8", [1] * 64, range(63, -1, -1)),
            (1,) * 64,
            tuple(range(63, -1, -1)),
        ),
    ],
)
def test_parse_text_reads_the_canonical_spelling(text: str, shape: tuple, perm: tuple) -> None:
    header = _schema.parse_text(text)
    assert header.framework == text.split(";")[0]
    assert header.dtype is _dtypes.BY_NAME[text.split(";")[1]]
    assert header.shape == shape
    assert header.perm == perm
    assert all(type(v) is int for v in header.shape + header.perm)
    assert header.text == text  # one spelling per header: it reads back unchanged
    assert header.to_metadata()["at.tensor"] == text


def test_header_of_is_memoized_by_exact_text() -> None:
    text = "numpy;uint8;5,7;1,0"
    first = _schema.header_of(text)
    assert _schema.header_of("".join(text)) is first  # an equal str, another object
    assert _schema.parse_header({"at.tensor": text}) is first
    assert first == _schema.parse_text(text)


def test_str_subclasses_are_accepted_like_str() -> None:
    """Was: tuples accepted like lists. A str subclass is read (not memoized) like its text."""

    class Text(str):
        pass

    array, meta = at.encode(np.arange(6.0).reshape(2, 3))
    text = "numpy;float64;3,2;1,0"
    _schema._HEADERS.pop(text, None)  # as if never seen (the memo is only a cache)
    header = _schema.parse_header({"at.tensor": Text(text)})
    assert header == _schema.parse_text(text)
    assert text not in _schema._HEADERS  # a subclass is never a memo key
    assert header.text == text
    assert type(header.text) is str
    meta = {**meta, "at.tensor": Text(meta["at.tensor"])}
    np.testing.assert_array_equal(at.decode(array, meta), np.arange(6.0).reshape(2, 3))
    y = at.decode(array, {**meta, "at.tensor": Text(text)})
    np.testing.assert_array_equal(y, np.arange(6.0).reshape(3, 2, order="F"))


def test_error_messages_are_bounded() -> None:
    array, meta = at.encode(np.zeros(3))
    with pytest.raises(at.MetadataError) as info:
        at.decode(array, {**meta, "at.tensor": ["x" * 10_000]})
    assert len(str(info.value)) < 300
    assert re.search(r"'at.tensor' must be str, got list \['x+\.\.\.", str(info.value))
    with pytest.raises(at.MetadataError) as info:
        at.decode(array, {**meta, "at.tensor": "numpy;float64;" + "x" * 10_000 + ";0"})
    assert str(info.value) == "'at.tensor' has 10016 characters; at most 4096 are allowed"
    # Under the limit, each hostile field is echoed in part only.
    for text in (
        "numpy;float64;" + "x" * 4000 + ";0",
        "numpy;float64;3;" + "9," * 2000,
        "numpy;" + "x" * 4000 + ";3;0",
        "x" * 4000 + ";float64;3;0",
        "numpy;float64;3;0;" + "x" * 4000,
    ):
        with pytest.raises(at.MetadataError, match=r"^'at\.tensor' ") as info:
            at.decode(array, {**meta, "at.tensor": text})
        assert len(str(info.value)) < 800, str(info.value)
        assert "x" * 200 not in str(info.value)


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (_schema.pack("numpy", "float32", [True, 4], [0, 1]), "the shape must be decimal"),
        (_schema.pack("numpy", "float32", [3.0, 4], [0, 1]), "got '3.0,4'"),
        (_schema.pack("numpy", "float32", [3, 4], [0.0, 1]), "the perm must be decimal"),
        (_schema.pack("numpy", "float32", (3, 4), (0, True)), "got '0,True'"),
        ("numpy;float32;03,4;0,1", "got '03,4'"),
        ("numpy;float32;+3,4;0,1", "got '+3,4'"),
        ("numpy;float32;\u0663,4;0,1", "got '\u0663,4'"),
        ("numpy;float32;3,4;0,01", "got '0,01'"),
        (Spoof("numpy;float32;3,-4;0,1"), "the shape must be decimal integers"),
        (Spoof("numpy;float32;3,4;0,1;"), "got 5 field(s) in str"),
        (Spoof("numpy;float32;3,4;1,1"), "the perm must be a permutation of 0..1"),
    ],
)
def test_header_cache_never_serves_what_validation_refuses(bad: str, fragment: str) -> None:
    """Texts that read as the cached header's numbers, or compare equal to its text."""
    array, meta = at.encode(np.zeros((3, 4), dtype=np.float32))
    assert meta["at.tensor"] == "numpy;float32;3,4;0,1"
    assert at.decode(array, meta).shape == (3, 4)  # the valid header is now cached
    assert _schema.header_of(meta["at.tensor"]) is _schema.parse_header(meta)
    for _ in range(2):  # refused again once seen
        with pytest.raises(at.MetadataError, match=re.escape(fragment)) as info:
            at.decode(array, {**meta, "at.tensor": bad})
        assert str(info.value).startswith("'at.tensor' ")
        with pytest.raises(at.MetadataError, match=re.escape(fragment)):
            _schema.parse_header({"at.tensor": bad})
    assert str(bad) not in _schema._HEADERS
