"""Layout analysis on shapes and element strides, shared by every framework.

Note [Layouts on the wire]
A tensor travels as the bytes of a C-ordered array of *physical* shape
``[shape[p] for p in perm]``; the receiver views those bytes with that shape and
transposes by the inverse permutation. A tensor whose strides are a permutation of a
contiguous layout (transposed, channels_last, a CHW view of an HWC image) is therefore sent
as it lies in memory, without a copy, and comes back with the same strides. Anything else
(steps, negative strides, broadcast dims, overlapping views) is compacted in one copy into
the dense layout whose dimension order is closest to the source's: dims that really address
memory keep their order of decreasing stride, broadcast and size-1 dims keep their slot.
Strides of size-1 dims address no memory and are not carried.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._memo import Memo


def memory_order(shape: Sequence[int], strides: Sequence[int]) -> list[int]:
    """Dimension order, outermost first, for laying a tensor out densely.

    Dims of size > 1 with a non-zero stride are ordered by decreasing ``|stride|``
    (ties keep their logical order); broadcast and size-1 dims stay at their own index.
    """
    real = [i for i, (n, s) in enumerate(zip(shape, strides, strict=True)) if n > 1 and s != 0]
    ordered = iter(sorted(real, key=lambda i: -abs(strides[i])))
    real_set = set(real)
    return [next(ordered) if i in real_set else i for i in range(len(shape))]


def is_dense(
    shape: Sequence[int], strides: Sequence[int], perm: Sequence[int], unit: int = 1
) -> bool:
    """True when the memory is exactly the C-order array of the permuted shape."""
    if 0 in shape:
        return True
    expected = unit
    for i in reversed(perm):
        if shape[i] == 1:
            continue
        if strides[i] != expected:
            return False
        expected *= shape[i]
    return True


_ANALYSED: Memo[tuple[tuple[int, ...], tuple[int, ...], int], tuple[tuple[int, ...], bool]]
_ANALYSED = Memo(256)


def analyse(
    shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int
) -> tuple[tuple[int, ...], bool]:
    """``(memory_order, is_dense)`` of byte ``strides``, remembered for the layouts seen last.

    A stream sends the same few layouts over and over: a lookup instead of the analysis.
    """
    key = (shape, strides, itemsize)
    found = _ANALYSED.get(key)
    if found is None:
        perm = memory_order(shape, strides)
        found = _ANALYSED.remember(key, (tuple(perm), is_dense(shape, strides, perm, itemsize)))
    return found


def inverse(perm: Sequence[int]) -> list[int]:
    """The inverse permutation."""
    inv = [0] * len(perm)
    for position, dim in enumerate(perm):
        inv[dim] = position
    return inv


def is_identity(perm: Sequence[int]) -> bool:
    """True for ``[0, 1, ..., n-1]``."""
    return all(i == p for i, p in enumerate(perm))


def dense_strides(shape: Sequence[int], perm: Sequence[int]) -> list[int]:
    """Element strides of the dense layout of ``shape`` in dimension order ``perm``."""
    strides = [0] * len(shape)
    step = 1
    for i in reversed(perm):
        strides[i] = step
        step *= max(shape[i], 1)
    return strides
