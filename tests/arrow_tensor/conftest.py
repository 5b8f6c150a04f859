"""Shared fixtures for the codec tests: dtype matrices, random tensors, bit-exact comparison.

Test modules receive the dtype matrices through the ``torch_dtype`` / ``numpy_dtype``
arguments (parametrized in ``pytest_generate_tests``) and the helpers through the ``tensors``
fixture, so no test module imports this file.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from arrow_tensor.codec import _dtypes

# Every wire dtype the installed torch has, and every one numpy has, plus numpy's big-endian
# variants of the multi-byte ones (decoded to native order with the same values).
TORCH_DTYPES = [
    getattr(torch, e.torch) for e in _dtypes.ALL if getattr(torch, e.torch or "", None) is not None
]
NUMPY_NATIVE = [np.dtype(e.numpy) for e in _dtypes.ALL if e.numpy is not None]
NUMPY_DTYPES = NUMPY_NATIVE + [d.newbyteorder(">") for d in NUMPY_NATIVE if d.itemsize > 1]
COMPLEX_TORCH = [d for d in TORCH_DTYPES if d.is_complex]
FLOAT_TORCH = [d for d in TORCH_DTYPES if d.is_complex or d.is_floating_point]

_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def torch_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype (``torch.float32`` -> ``float32``)."""
    return str(dtype).removeprefix("torch.")


def numpy_id(dtype: np.dtype) -> str:
    """Readable test id: ``float32`` or ``>float32`` for big-endian."""
    return (">" if dtype.byteorder == ">" else "") + dtype.name


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize the ``torch_dtype``, ``numpy_dtype``, ``complex_dtype``, ``float_dtype`` args."""
    if "torch_dtype" in metafunc.fixturenames:
        metafunc.parametrize("torch_dtype", TORCH_DTYPES, ids=torch_name)
    if "numpy_dtype" in metafunc.fixturenames:
        metafunc.parametrize("numpy_dtype", NUMPY_DTYPES, ids=numpy_id)
    if "complex_dtype" in metafunc.fixturenames:
        metafunc.parametrize("complex_dtype", COMPLEX_TORCH, ids=torch_name)
    if "float_dtype" in metafunc.fixturenames:
        metafunc.parametrize("float_dtype", FLOAT_TORCH, ids=torch_name)


def random_bytes(nbytes: int, seed: int, boolean: bool = False) -> np.ndarray:
    """``nbytes`` random bytes (so floats include NaN payloads, -0.0, infinities, subnormals)."""
    raw = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return raw & 1 if boolean else raw


def random_torch(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A contiguous tensor of random bits, built by viewing bytes (never allocating the dtype,
    since allocating complex32 warns)."""
    width = _dtypes.BY_NAME[torch_name(dtype)].itemsize
    raw = random_bytes(math.prod(shape) * width, seed, boolean=dtype == torch.bool)
    flat = torch.from_numpy(raw) if raw.size else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def random_numpy(shape: tuple[int, ...], dtype: np.dtype, seed: int = 0) -> np.ndarray:
    """A C-contiguous array of random bits in ``dtype`` (any byte order)."""
    raw = random_bytes(math.prod(shape) * dtype.itemsize, seed, boolean=dtype.kind == "b")
    return raw.view(dtype).reshape(shape)


def plain_torch(t: torch.Tensor) -> torch.Tensor:
    """``t`` without conjugate/negative bits or autograd, its values unchanged, no warnings."""
    t = t.detach()
    if t.is_conj():
        if t.dtype == torch.complex32:
            out = torch.empty(t.shape, dtype=torch.int32).view(torch.complex32)
            t = out.copy_(t)
        else:
            t = t.resolve_conj()
    return t.resolve_neg() if t.is_neg() else t


def torch_bits(t: torch.Tensor) -> torch.Tensor:
    """The logical elements of ``t`` as signed ints of the same width, C order, 1-D."""
    t = plain_torch(t)
    if t.element_size() == 16:
        t = torch.view_as_real(t)
    return t.view(_SIGNED[t.element_size()]).contiguous().reshape(-1)


def numpy_bits(a: np.ndarray) -> np.ndarray:
    """The logical elements of ``a`` as native unsigned ints per component, C order, 1-D."""
    width = a.dtype.itemsize // 2 if a.dtype.kind == "c" else a.dtype.itemsize
    order = ">" if a.dtype.byteorder == ">" else "<"
    flat = np.ascontiguousarray(a).reshape(-1)
    return flat.view(f"{order}u{width}").astype(f"=u{width}")


def big_strides(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(dim, stride) of the dims of size > 1: the strides a dense decode must reproduce."""
    return tuple((i, s) for i, (n, s) in enumerate(zip(shape, strides, strict=True)) if n > 1)


def assert_same_torch(y: Any, x: torch.Tensor) -> None:
    """``y`` is a torch tensor with ``x``'s dtype, shape and bits."""
    assert type(y) is torch.Tensor
    assert y.dtype == x.dtype
    assert y.shape == x.shape
    assert not y.is_conj()
    assert not y.is_neg()
    assert torch.equal(torch_bits(y), torch_bits(x))


def assert_same_numpy(y: Any, x: np.ndarray) -> None:
    """``y`` is a native-order numpy array with ``x``'s dtype, shape and bits."""
    assert type(y) is np.ndarray
    assert y.dtype == x.dtype.newbyteorder("=")
    assert y.dtype.isnative
    assert y.shape == x.shape
    np.testing.assert_array_equal(numpy_bits(y), numpy_bits(x))


def buffer_address(array: pa.Array) -> int:
    """Address of the first payload byte of an encoded array (its offset included)."""
    return array.buffers()[1].address + array.offset * array.type.bit_width // 8


def numpy_span(a: np.ndarray) -> tuple[int, int]:
    """[low, high) byte addresses ``a`` can touch (empty for zero-size arrays)."""
    base = a.ctypes.data
    if a.size == 0:
        return base, base
    low = base + sum((n - 1) * s for n, s in zip(a.shape, a.strides, strict=True) if s < 0)
    high = base + sum((n - 1) * s for n, s in zip(a.shape, a.strides, strict=True) if s > 0)
    return low, high + a.itemsize


def torch_storage_span(t: torch.Tensor) -> tuple[int, int]:
    """[low, high) byte addresses of ``t``'s whole storage."""
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


@pytest.fixture(scope="session")
def tensors() -> SimpleNamespace:
    """The helpers above, for test modules (which do not import conftest)."""
    return SimpleNamespace(
        random_torch=random_torch,
        random_numpy=random_numpy,
        random_bytes=random_bytes,
        plain_torch=plain_torch,
        torch_bits=torch_bits,
        numpy_bits=numpy_bits,
        big_strides=big_strides,
        assert_same_torch=assert_same_torch,
        assert_same_numpy=assert_same_numpy,
        buffer_address=buffer_address,
        numpy_span=numpy_span,
        torch_storage_span=torch_storage_span,
        torch_dtypes=TORCH_DTYPES,
        numpy_dtypes=NUMPY_DTYPES,
    )
