"""Structured payloads: nested dicts / lists / tuples of tensors and scalars in one message."""

from __future__ import annotations

import json
import math
import warnings
from collections import namedtuple
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
from arrow_tensor.codec import _dtypes, _tree
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")


def _bits(x: Any) -> bytes:
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x).view(np.uint8).tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32 copies warn that ComplexHalf is experimental
        t = x.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same(a: Any, b: Any, path: str = "value") -> None:
    """Same structure, same container and scalar types, same tensors bit for bit."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype.newbyteorder("=") or a.dtype == b.dtype, path
        assert a.shape == b.shape, path
        assert _bits(a.astype(a.dtype.newbyteorder("="))) == _bits(b), path
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert _bits(a) == _bits(b), path
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def roundtrip(x: Any, **kw: Any) -> Any:
    array, meta = at.encode(x, checksum=True)
    return at.decode(array, meta, verify=True, **kw)


DETECTOR_OUTPUT = {
    "boxes": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4),
    "scores": torch.tensor([[0.9, 0.5, -0.0], [float("nan"), float("inf"), 1e-45]]),
    "labels": torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int64),
}


@pytest.mark.parametrize(
    "value",
    [
        DETECTOR_OUTPUT,
        [np.arange(6, dtype=np.int16).reshape(2, 3).T, torch.ones(2, 2, dtype=torch.bfloat16)],
        (np.float64([-0.0, np.nan]), "text", None, True, 7, 2.5, -(2**70)),
        {"z": 1, "a": {"nested": (torch.zeros(0, 3),)}, "m": [[], {}, ()]},
        {"empty": {}},
        [],
        (),
        {"scalar0d": np.array(3.5, dtype=np.float32), "t0d": torch.tensor(7, dtype=torch.int8)},
    ],
    ids=["detector", "layouts", "scalars", "nested-empty", "empty-dict", "list", "tuple", "0d"],
)
def test_roundtrip_preserves_structure_types_and_bits(value: Any) -> None:
    assert_same(value, roundtrip(value))


@pytest.mark.parametrize("name", [d.name for d in _dtypes.ALL])
def test_every_dtype_as_a_leaf(name: str) -> None:
    entry = _dtypes.BY_NAME[name]
    dtype = getattr(torch, entry.torch or "", None)
    if dtype is None:
        pytest.skip(f"torch {torch.__version__} lacks {name}")
    raw = torch.arange(24, dtype=torch.uint8).reshape(2, 12)
    if entry.itemsize > 1:
        raw = torch.arange(24 * entry.itemsize, dtype=torch.uint8).reshape(2, 12 * entry.itemsize)
    if name == "bool":
        raw = raw % 2  # bool bytes are 0 or 1 on the wire
    leaf = raw.view(dtype)
    value = {"x": leaf, "xt": leaf.t(), "pad": np.uint8([1])}
    out = roundtrip(value)
    assert_same(value, out)
    assert out["xt"].stride() == leaf.t().stride()


def test_leaves_are_aligned_zero_copy_read_only_views() -> None:
    value = {"a": np.arange(3, dtype=np.uint8), "b": np.arange(5.0), "c": np.ones((2, 3)).T}
    array, meta = at.encode(value)
    out = at.decode(array, meta)
    base = array.buffers()[1].address
    for key, leaf in out.items():
        ptr = leaf.__array_interface__["data"][0]
        assert (ptr - base) % _tree.ALIGNMENT == 0, key
        assert base <= ptr < base + array.buffers()[1].size, key
        assert not leaf.flags.writeable, key
    assert out["c"].strides == value["c"].strides


def test_writable_gives_private_copies() -> None:
    value = {"n": np.arange(4.0), "t": torch.arange(4.0).reshape(2, 2).t()}
    array, meta = at.encode(value)
    out = at.decode(array, meta, writable=True)
    out["n"][0] = 99.0
    out["t"][0, 0] = 99.0
    again = at.decode(array, meta)
    assert again["n"][0] == 0.0
    assert again["t"][0, 0] == 0.0
    assert out["t"].stride() == value["t"].stride()


def test_metadata_is_flat_and_dora_safe() -> None:
    _, meta = at.encode(DETECTOR_OUTPUT)
    for key, v in meta.items():
        assert key.startswith("at."), key
        if isinstance(v, list):
            assert len({type(e) for e in v}) <= 1, key
            assert all(isinstance(e, (int, str)) for e in v), key
        else:
            assert isinstance(v, (int, str)), key
    assert meta["at.kind"] == "tree"


def test_thousands_of_leaves() -> None:
    value = {f"k{i}": np.full((i % 5,), i, dtype=np.float32) for i in range(3000)}
    value["list"] = [torch.tensor([i]) for i in range(1000)]
    array, meta = at.encode(value)
    out = at.decode(array, meta)
    assert_same(value, out)
    assert len(meta["at.leaf.offset"]) == 4000


def test_user_keys_beside_tree_metadata_are_ignored() -> None:
    array, meta = at.encode({"a": np.arange(3)})
    meta.update({"frame_id": 3, "timestamp": "x"})
    assert at.decode(array, meta)["a"].tolist() == [0, 1, 2]


def test_uint8_storage_is_accepted() -> None:
    # A raw-sample transport delivers the same bytes as a uint8 array.
    array, meta = at.encode({"a": np.arange(5, dtype=np.int32)})
    raw = pa.Array.from_buffers(pa.uint8(), len(array) * 8, [None, array.buffers()[1]])
    assert at.decode(raw, meta, verify=False)["a"].tolist() == [0, 1, 2, 3, 4]


Point = namedtuple("Point", "x y")


@pytest.mark.parametrize(
    ("value", "path", "fragment"),
    [
        ({"outputs": {"boxes": [1, 2, object()]}}, 'value["outputs"]["boxes"][2]', "object"),
        ({1: np.zeros(1)}, "value", "dict keys must be str"),
        ([{"a": {(1, 2): 3}}], 'value[0]["a"]', "dict keys must be str"),
        ({"p": Point(1, 2)}, 'value["p"]', "_asdict"),
        ({"s": np.float32(1.0)}, 'value["s"]', "np.asarray"),
        ((b"bytes",), "value[0]", "bytes"),
        ({"u": np.array(["a"])}, 'value["u"]', "cannot be encoded"),
    ],
)
def test_unsupported_values_name_their_path(value: Any, path: str, fragment: str) -> None:
    with pytest.raises(at.UnsupportedTensorError) as info:
        at.encode(value)
    assert str(info.value).startswith(path + ":")
    assert fragment in str(info.value)


def test_nesting_depth_is_bounded() -> None:
    deep: Any = 1
    for _ in range(_tree.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(at.UnsupportedTensorError, match="nesting deeper"):
        at.encode(deep)


def _sample() -> tuple[pa.Array, dict[str, Any]]:
    return at.encode({"a": np.arange(4, dtype=np.int64), "b": [np.ones(3, np.float32), 5]})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"at.leaf.offset": [0, 8]}, "multiple of 64"),
        ({"at.leaf.offset": [64, 0]}, "previous segment"),
        ({"at.leaf.offset": [0, 4096]}, "inside the"),
        ({"at.leaf.offset": [0, -64]}, "previous segment"),
        ({"at.leaf.shape": [400, 3]}, "inside the"),
        ({"at.leaf.shape": [4, 3, 1]}, "one per tensor leaf"),
        ({"at.leaf.ndim": [1, -1]}, "one per tensor leaf|ndim"),
        ({"at.leaf.ndim": [1, 1, 0]}, "one per tensor leaf"),
        ({"at.leaf.dtype": ["int64", "float128"]}, "unknown dtype"),
        ({"at.leaf.dtype": ["int64"]}, "list of 2 str"),
        ({"at.leaf.framework": ["numpy", "jax"]}, "framework"),
        # CUDA descriptors' frameworks are no host leaves (they used to come back as numpy)
        ({"at.leaf.framework": ["numpy", "cupy"]}, "host memory decodes to one of"),
        ({"at.leaf.framework": ["pyarrow.cuda", "numpy"]}, "header names 'pyarrow.cuda'"),
        ({"at.leaf.dtype": ["int64", "bfloat16"], "at.leaf.framework": ["numpy"] * 2}, "no numpy"),
        # Python ints past what dora carries (str() of 10**5000 raises ValueError untyped)
        ({"at.leaf.shape": [10**5000, 3]}, "leaf 0: shape or perm entries outside int64"),
        ({"at.leaf.perm": [0, 10**20]}, "leaf 1: shape or perm entries outside int64"),
        ({"at.leaf.shape": [4, -3]}, r"^leaf 1 \(its at.leaf.\* entries read as\) 'numpy"),
        ({"at.tree": "not json"}, "not valid JSON"),
        ({"at.tree": '{"a": 1}'}, "tagged list"),
        ({"at.tree": '["d","a",["t",0],"b",["l",["t",0],5]]'}, "tensor reference"),
        ({"at.tree": '["d","a",["t",0]]'}, "references 1 tensor leaves"),
        ({"at.tree": '["d","a",["t",0],"b",["l",["t",1],["t",2]]]'}, "not in the leaf table"),
        ({"at.tree": '["d","a",["t",0],"a",["l",["t",1],5]]'}, "unique str"),
        ({"at.tree": '["d","a"]'}, "without a value"),
        ({"at.tree": '["x",1]'}, "unknown tag"),
        ({"at.tree": "[" * 100_000 + "]" * 100_000}, "not valid JSON|tagged list"),
        ({"at.nbytes": 8}, "bytes"),
        ({"at.tree": 5}, "must be str"),
    ],
)
def test_hostile_metadata_is_rejected(change: dict[str, Any], match: str) -> None:
    array, meta = _sample()
    meta.update(change)
    with pytest.raises(at.ArrowTensorError, match=match):
        at.decode(array, meta)


def test_checksum_covers_bytes_skeleton_and_headers() -> None:
    value = {"a": np.arange(4, dtype=np.int64), "s": 5}
    array, meta = at.encode(value, checksum=True)
    words = np.frombuffer(array.buffers()[1], dtype=np.uint64).copy()
    words[1] ^= 1
    tampered = pa.array(words)
    with pytest.raises(at.ChecksumError):
        at.decode(tampered, meta, verify=True)
    with pytest.raises(at.ChecksumError):
        at.decode(array, {**meta, "at.tree": meta["at.tree"].replace("5", "6")}, verify=True)
    with pytest.raises(at.ChecksumError):
        at.decode(array, {**meta, "at.leaf.dtype": ["uint64"]}, verify=True)
    with pytest.raises(at.ChecksumError, match="no checksum"):
        at.decode(*at.encode(value), verify=True)


def test_padding_is_zeroed() -> None:
    array, _ = at.encode([np.full(3, 0xFF, np.uint8), np.full(3, 0xFF, np.uint8)])
    raw = np.frombuffer(array.buffers()[1], dtype=np.uint8)
    assert raw[3:64].tolist() == [0] * 61
    assert raw[67:].tolist() == [0] * (len(raw) - 67)


def test_skeleton_is_compact_json() -> None:
    _, meta = at.encode({"k": (1, None, [np.zeros(1)])})
    assert json.loads(meta["at.tree"]) == ["d", "k", ["u", 1, None, ["l", ["t", 0]]]]


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True),
    st.text(max_size=8),
)
_arrays = st.sampled_from(["float32", "int64", "uint8", "bool", "complex64"]).flatmap(
    lambda dt: st.lists(st.integers(0, 3), max_size=3).map(
        lambda shape: np.arange(math.prod(shape)).astype(dt).reshape(shape)
    )
)
_trees = st.recursive(
    st.one_of(_scalars, _arrays),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=5), children, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.lists(_trees, max_size=3), st.dictionaries(st.text(), _trees, max_size=3)))
def test_random_structures_roundtrip(value: Any) -> None:
    assert_same(value, roundtrip(value))
