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
from arrow_tensor import _dtypes, _schema


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


@pytest.mark.parametrize("checksum", [False, True])
def test_metadata_is_flat_namespaced_and_dora_safe(torch_dtype, checksum: bool, tensors) -> None:
    x = tensors.random_torch((2, 3, 4), torch_dtype).permute(2, 0, 1)
    _, meta = at.encode(x, checksum=checksum)
    assert all(key.startswith("at.") for key in meta)
    assert "timestamp" not in meta
    assert all(_dora_safe(v) for v in meta.values()), meta
    assert all(type(v) is int for v in meta["at.shape"] + meta["at.perm"])
    assert ("at.checksum" in meta) is checksum


def test_golden_contiguous_message() -> None:
    array, meta = at.encode(np.array([[1, 2, 3], [4, 5, 6]], dtype="<i2"))
    assert meta == {
        "at.version": 1,
        "at.kind": "tensor",
        "at.framework": "numpy",
        "at.dtype": "int16",
        "at.shape": [2, 3],
        "at.perm": [0, 1],
    }
    assert array.type == pa.uint16()
    assert array.buffers()[1].to_pybytes()[: array.nbytes] == bytes.fromhex(
        "0100 0200 0300 0400 0500 0600".replace(" ", "")
    )


def test_golden_transposed_torch_message() -> None:
    """SPEC example: a transposed matrix travels as it lies in memory with perm [1, 0]."""
    base = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float32)
    array, meta = at.encode(base.t(), checksum=True)
    assert meta["at.framework"] == "torch"
    assert meta["at.shape"] == [3, 2]
    assert meta["at.perm"] == [1, 0]
    payload = array.buffers()[1].to_pybytes()[: array.nbytes]
    assert payload == np.array([1, 2, 3, 4, 5, 6], "<f4").tobytes()
    header = b"arrow_tensor/1;float32;[3,2];[1,0]"
    assert meta["at.checksum"] == "xxh3_64:" + xxhash.xxh3_64(header + payload).hexdigest()


def test_golden_channels_last_perm() -> None:
    x = torch.zeros(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert at.encode(x)[1]["at.perm"] == [0, 2, 3, 1]


def test_golden_zero_d_checksum() -> None:
    _array, meta = at.encode(np.array(-3, dtype=np.int8), checksum=True)
    assert meta["at.shape"] == []
    assert meta["at.perm"] == []
    expected = xxhash.xxh3_64(b"arrow_tensor/1;int8;[];[]" + b"\xfd").hexdigest()
    assert meta["at.checksum"] == f"xxh3_64:{expected}"


def test_complex128_travels_as_two_uint64() -> None:
    x = np.array([1 + 2j, 3 - 4j], dtype="<c16")
    array, _ = at.encode(x)
    assert array.type == pa.uint64()
    assert len(array) == 4
    assert array.buffers()[1].to_pybytes()[: array.nbytes] == x.tobytes()


def test_big_endian_goes_little_endian_on_the_wire() -> None:
    x = np.array([1, 256], dtype=">u2")
    array, meta = at.encode(x)
    assert meta["at.dtype"] == "uint16"
    assert array.buffers()[1].to_pybytes()[: array.nbytes] == b"\x01\x00\x00\x01"


def test_a_foreign_decoder_following_the_spec(tensors) -> None:
    """Decode a permuted tensor with nothing but the rules of SPEC.md and compare."""
    x = tensors.random_torch((2, 5, 3, 4), torch.float64, 1).permute(0, 3, 1, 2)
    array, meta = at.encode(x)
    shape, perm = meta["at.shape"], meta["at.perm"]
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
    assert _schema.parse_header(_schema.check_envelope(meta)) == header
    assert header.describe() == "arrow_tensor/1;bfloat16;[2,0,3];[2,0,1]"
    assert header.physical_shape == (3, 2, 0)
    assert header.nbytes == 0


def test_tuples_are_accepted_like_lists() -> None:
    array, meta = at.encode(np.arange(6.0).reshape(2, 3))
    meta = {**meta, "at.shape": (2, 3), "at.perm": (0, 1)}
    np.testing.assert_array_equal(at.decode(array, meta), np.arange(6.0).reshape(2, 3))


def test_error_messages_are_bounded() -> None:
    array, meta = at.encode(np.zeros(3))
    with pytest.raises(at.MetadataError) as info:
        at.decode(array, {**meta, "at.shape": ["x" * 10_000]})
    assert len(str(info.value)) < 300
    assert re.search(r"'at.shape' must be a list of int, got list \['x+\.\.\.", str(info.value))


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("at.shape", [True, 4]),
        ("at.shape", [3.0, 4]),
        ("at.perm", [0.0, 1]),
        ("at.perm", (0, True)),
    ],
)
def test_header_cache_never_serves_what_validation_refuses(key: str, bad: list) -> None:
    array, meta = at.encode(np.zeros((3, 4), dtype=np.float32))
    assert at.decode(array, meta).shape == (3, 4)  # the valid header is now cached
    with pytest.raises(at.MetadataError, match=re.escape(key)):
        at.decode(array, {**meta, key: bad})
