"""Properties over random shapes, permutations, slices and dtypes: exact, zero-copy round trips."""

from __future__ import annotations

from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import torch
from arrow_tensor.codec import _dtypes, _layout, _schema
from hypothesis import given
from hypothesis import strategies as st

TORCH_DTYPES = [
    getattr(torch, e.torch) for e in _dtypes.ALL if getattr(torch, e.torch or "", None) is not None
]
NUMPY_DTYPES = [np.dtype(e.numpy).newbyteorder(o) for e in _dtypes.ALL if e.numpy for o in "<>"]

shapes = st.lists(st.integers(0, 6), min_size=0, max_size=5)


@st.composite
def layouts(draw: st.DrawFn, negative: bool) -> tuple[list[int], list[int], tuple[slice, ...]]:
    """(shape of the dense base in memory order, its permutation, a slice to apply)."""
    shape = draw(shapes)
    perm = draw(st.permutations(range(len(shape))))
    steps = st.integers(-3, 3).filter(bool) if negative else st.integers(1, 3)
    index = tuple(
        slice(draw(st.integers(0, 1)), None, draw(steps)) if draw(st.booleans()) else slice(None)
        for _ in shape
    )
    return shape, perm, index


def _sliced(x: Any, index: tuple[slice, ...]) -> Any:
    """Apply ``index``; a negative step starts ``start`` elements from the end."""
    fixed = [s if (s.step or 1) > 0 else slice(-1 - s.start, None, s.step) for s in index]
    return x[(*fixed, ...)]


@given(layout=layouts(negative=False), dtype=st.sampled_from(TORCH_DTYPES), seed=st.integers(0, 9))
def test_torch_round_trip(layout, dtype: torch.dtype, seed: int, tensors) -> None:
    physical_shape, perm, index = layout
    physical = [physical_shape[p] for p in perm]
    x = tensors.random_torch(tuple(physical), dtype, seed).permute(_layout.inverse(perm))
    sliced = any(s != slice(None) for s in index)
    x = x[index]
    array, meta = at.encode(x, checksum=True)
    y = at.decode(array, meta, verify=True)
    tensors.assert_same_torch(y, x)
    if x.numel() and not sliced:
        assert tensors.buffer_address(array) == x.data_ptr()
        assert tensors.big_strides(y.shape, y.stride()) == tensors.big_strides(x.shape, x.stride())
    if y.numel():
        assert y.data_ptr() == tensors.buffer_address(array)
    tensors.assert_same_torch(at.decode(array, meta, writable=True), x)


@given(layout=layouts(negative=True), dtype=st.sampled_from(NUMPY_DTYPES), seed=st.integers(0, 9))
def test_numpy_round_trip(layout, dtype: np.dtype, seed: int, tensors) -> None:
    physical_shape, perm, index = layout
    physical = [physical_shape[p] for p in perm]
    x = tensors.random_numpy(tuple(physical), dtype, seed).transpose(_layout.inverse(perm))
    sliced = any(s != slice(None) for s in index)
    x = _sliced(x, index)
    array, meta = at.encode(x, checksum=True)
    y = at.decode(array, meta, verify=True)
    tensors.assert_same_numpy(y, x)
    assert not y.flags.writeable
    payload = np.frombuffer(array.buffers()[1], np.uint8)
    if x.size and not sliced:
        assert tensors.big_strides(y.shape, y.strides) == tensors.big_strides(x.shape, x.strides)
        if dtype.isnative:
            assert tensors.buffer_address(array) == x.ctypes.data
    reversed_dims = [(s.step or 1) < 0 for s, n in zip(index, x.shape, strict=True) if n > 1]
    if x.size and (not dtype.isnative or any(reversed_dims)):
        assert not np.shares_memory(payload, x)  # compacted in a copy; the source untouched
    if y.size:
        assert np.shares_memory(y, payload)
    w = at.decode(array, meta, writable=True)
    assert w.flags.writeable
    assert not np.shares_memory(w, payload)
    tensors.assert_same_numpy(w, x)


@given(
    dtype=st.sampled_from([d for d in NUMPY_DTYPES if d.isnative]),
    shape=shapes,
    storage=st.sampled_from([pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()]),
    pad=st.integers(0, 9),
)
def test_any_storage_and_offset(dtype, shape, storage, pad: int, tensors) -> None:
    """A receiver may get the bytes in any uint container, at any element offset."""
    x = tensors.random_numpy(tuple(shape), dtype, 1)
    array, meta = at.encode(x)
    width = storage.bit_width // 8
    raw = array.buffers()[1].to_pybytes()[: array.nbytes]
    if len(raw) % width:
        return
    data = b"\xab" * (pad * width) + raw + b"\xcd" * width
    padded = pa.Array.from_buffers(storage, len(data) // width, [None, pa.py_buffer(data)])
    received = padded.slice(pad, len(raw) // width)
    tensors.assert_same_numpy(at.decode(received, meta), x)


@given(
    shape=st.lists(st.integers(-(2**65), 2**65), max_size=6),
    perm=st.lists(st.integers(-2, 7), max_size=7),
    dtype=st.sampled_from([*_dtypes.BY_NAME, "float128", ""]),
    framework=st.sampled_from(["numpy", "torch", "jax"]),
    nbytes=st.integers(0, 64),
)
def test_hostile_headers_only_raise_our_errors(shape, perm, dtype, framework, nbytes) -> None:
    """Any header over any small buffer: a tensor of exactly that buffer, or our error."""
    meta = {
        _schema.KEY_VERSION: _schema.VERSION,
        _schema.KEY_KIND: _schema.KIND_TENSOR,
        _schema.KEY_TENSOR: _schema.pack(framework, dtype, shape, perm),
    }
    array = pa.array(np.arange(nbytes, dtype=np.uint8))
    try:
        y = at.decode(array, meta)
    except at.ArrowTensorError:
        return
    assert list(y.shape) == shape
    nb = y.numel() * y.element_size() if isinstance(y, torch.Tensor) else y.nbytes
    assert nb == nbytes


_FIELD = st.text(alphabet="0123456789,+- _\u0662\uff12", max_size=10)


@st.composite
def header_texts(draw: st.DrawFn) -> str:
    """``at.tensor`` texts near the valid ones: fields from the right alphabets, or anything."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=40))
    fields = [
        draw(st.sampled_from(["numpy", "torch", "numpy", "torch", "jax", "", "numpy "])),
        draw(st.sampled_from([*_dtypes.BY_NAME, "float128", "<f4", ""])),
        draw(st.one_of(_FIELD, st.lists(st.integers(0, 4), max_size=3).map(_dims))),
        draw(st.one_of(_FIELD, st.permutations(range(draw(st.integers(0, 3)))).map(_dims))),
    ]
    count = draw(st.sampled_from([4, 4, 4, 3, 5]))  # mostly the right number of fields
    return ";".join(fields[:count] + [""] * (count - 4))


def _bits(y: Any) -> bytes:
    if isinstance(y, torch.Tensor):
        return y.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(y).tobytes()


def _dims(values: list[int]) -> str:
    return ",".join(map(str, values))


@given(text=header_texts(), nbytes=st.integers(0, 64))
def test_hostile_header_texts_only_raise_our_errors(text: str, nbytes: int) -> None:
    """Any ``at.tensor`` text over any small buffer: exactly that tensor, or our error.

    A text is accepted only in its one canonical form, so one header has one text (the key
    of the fast path's cache) and the decoded tensor is the one that text names.
    """
    meta = {
        _schema.KEY_VERSION: _schema.VERSION,
        _schema.KEY_KIND: _schema.KIND_TENSOR,
        _schema.KEY_TENSOR: text,
    }
    array = pa.array(np.arange(nbytes, dtype=np.uint8))
    outcomes = []
    for _ in range(2):  # the second time through the fast path's cache
        try:
            y = at.decode(array, dict(meta))
        except at.ArrowTensorError as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
            continue
        header = _schema.parse_text(text)
        assert header.text == text
        assert tuple(y.shape) == header.shape
        nb = y.numel() * y.element_size() if isinstance(y, torch.Tensor) else y.nbytes
        assert nb == nbytes == header.nbytes
        outcomes.append(_bits(y))
    assert outcomes[0] == outcomes[1]
