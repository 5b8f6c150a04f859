"""Layout analysis (_layout): memory order, density, permutations; exhaustive and by property."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from arrow_tensor.codec import _layout
from hypothesis import given
from hypothesis import strategies as st


def _dims(max_dims: int = 5) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, 5), min_size=0, max_size=max_dims)


@pytest.mark.parametrize(
    ("shape", "strides", "perm", "dense"),
    [
        ((3, 4), (4, 1), [0, 1], True),
        ((3, 4), (1, 3), [1, 0], True),
        ((2, 3, 4, 5), (60, 1, 15, 3), [0, 2, 3, 1], True),  # channels_last
        ((1, 3, 4, 5), (60, 1, 15, 3), [0, 2, 3, 1], True),  # N = 1
        ((2, 1, 4, 5), (20, 1, 5, 1), [0, 1, 2, 3], True),  # C = 1
        ((3, 1, 4), (4, 99, 1), [0, 1, 2], True),  # size-1 stride is ignored
        ((3, 4), (8, 2), [0, 1], False),  # stepped
        ((3, 4), (0, 1), [0, 1], False),  # broadcast
        ((3, 4), (-4, 1), [0, 1], False),  # negative
        ((2, 2), (1, 1), [0, 1], False),  # overlapping
        ((0, 4), (7, 3), [0, 1], True),  # empty: nothing addressed
        ((), (), [], True),
    ],
)
def test_memory_order_and_density(shape, strides, perm, dense) -> None:
    assert _layout.memory_order(shape, strides) == perm
    assert _layout.is_dense(shape, strides, perm) is dense


def test_is_dense_counts_strides_in_units() -> None:
    """numpy strides are in bytes: with unit=itemsize a contiguous float32 array is dense.
    (is_dense used to ignore ``unit``, so every multi-byte tensor was copied on encode.)"""
    a = np.zeros((3, 4), np.float32).T
    perm = _layout.memory_order(a.shape, a.strides)
    assert _layout.is_dense(a.shape, a.strides, perm, unit=4)
    assert not _layout.is_dense(a.shape, a.strides, perm, unit=1)
    assert not _layout.is_dense((3, 4), (4, 1), [0, 1], unit=4)


@pytest.mark.parametrize("ndim", [0, 1, 2, 3, 4])
def test_inverse_exhaustive(ndim: int) -> None:
    for perm in itertools.permutations(range(ndim)):
        inv = _layout.inverse(perm)
        assert [perm[i] for i in inv] == list(range(ndim))
        assert _layout.inverse(inv) == list(perm)
        assert _layout.is_identity(perm) == (list(perm) == list(range(ndim)))


@given(shape=_dims(), data=st.data())
def test_dense_strides_are_dense_and_recovered(shape: list[int], data: st.DataObject) -> None:
    perm = data.draw(st.permutations(range(len(shape))))
    strides = _layout.dense_strides(shape, perm)
    assert _layout.is_dense(shape, strides, _layout.memory_order(shape, strides))
    # The order is recovered for dims that address memory (size > 1).
    order = _layout.memory_order(shape, strides)
    assert [d for d in order if shape[d] > 1] == [d for d in perm if shape[d] > 1]


@given(shape=_dims(), data=st.data())
def test_numpy_agrees_on_density(shape: list[int], data: st.DataObject) -> None:
    perm = data.draw(st.permutations(range(len(shape))))
    physical = np.zeros(tuple(shape[p] for p in perm), np.int16)
    a = physical.transpose(_layout.inverse(perm))
    order = _layout.memory_order(a.shape, a.strides)
    assert _layout.is_dense(a.shape, a.strides, order, unit=2)
    steps = data.draw(st.lists(st.integers(1, 3), min_size=len(shape), max_size=len(shape)))
    sliced = a[(*(slice(None, None, s) for s in steps), ...)]
    order = _layout.memory_order(sliced.shape, sliced.strides)
    # A slice is dense iff numpy would not need to copy to make it contiguous in some order.
    dense = _layout.is_dense(sliced.shape, sliced.strides, order, unit=2)
    compact = np.array(sliced.transpose(order), order="C", copy=True).transpose(
        _layout.inverse(order)
    )
    same_strides = all(
        n <= 1 or s1 == s2
        for n, s1, s2 in zip(sliced.shape, sliced.strides, compact.strides, strict=True)
    )
    assert dense == (sliced.size == 0 or same_strides)
