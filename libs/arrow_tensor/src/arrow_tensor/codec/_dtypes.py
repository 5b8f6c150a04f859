"""The one dtype table: wire names, widths and their numpy / torch counterparts.

Every other module asks this table; nothing else spells a dtype name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .._errors import MetadataError, UnsupportedTensorError
from ._memo import Memo


@dataclass(frozen=True)
class DType:
    """One wire dtype.

    ``name`` is the string on the wire, ``itemsize`` its width in bytes, ``numpy`` the
    numpy dtype with that exact bit layout (``None`` when numpy has none, as for bfloat16),
    ``torch`` the attribute name in the ``torch`` module (``None`` when torch has none).
    The numpy dtypes derived from these are built once per entry (the codec asks for them
    on every message).
    """

    name: str
    itemsize: int
    numpy: str | None
    torch: str | None

    @cached_property
    def storage(self) -> np.dtype:
        """The elements of the payload array (SPEC.md, Arrow storage): the dtype itself for
        the integer and float types Arrow shares with numpy, else the little-endian unsigned
        integer that carries one element (or half of one for 16 bytes)."""
        if self.name in _ARROW_NATIVE:
            return np.dtype(self.numpy).newbyteorder("<")
        return np.dtype(f"<u{min(self.itemsize, 8)}")

    @cached_property
    def numpy_dtype(self) -> np.dtype | None:
        """Little-endian numpy dtype for this wire dtype, or ``None``."""
        return None if self.numpy is None else np.dtype(self.numpy).newbyteorder("<")

    @cached_property
    def bits_view(self) -> np.dtype:
        """Same-width numpy dtype that moves the raw bits (the dtype itself where numpy has it)."""
        if self.numpy is not None:
            return np.dtype(self.numpy).newbyteorder("<")
        return np.dtype(f"<u{self.itemsize}")


# Travel as their own Arrow type: a receiver's ``to_numpy`` then gives the dtype itself,
# sparing a numpy ``view`` per message (costly in a node woken with cold caches).
_ARROW_NATIVE = frozenset(
    "uint8 int8 uint16 int16 uint32 int32 uint64 int64 float16 float32 float64".split()
)

_TABLE: tuple[DType, ...] = (
    DType("bool", 1, "bool", "bool"),
    DType("uint8", 1, "uint8", "uint8"),
    DType("int8", 1, "int8", "int8"),
    DType("uint16", 2, "uint16", "uint16"),
    DType("int16", 2, "int16", "int16"),
    DType("uint32", 4, "uint32", "uint32"),
    DType("int32", 4, "int32", "int32"),
    DType("uint64", 8, "uint64", "uint64"),
    DType("int64", 8, "int64", "int64"),
    DType("float16", 2, "float16", "float16"),
    DType("bfloat16", 2, None, "bfloat16"),
    DType("float32", 4, "float32", "float32"),
    DType("float64", 8, "float64", "float64"),
    DType("complex32", 4, None, "complex32"),
    DType("complex64", 8, "complex64", "complex64"),
    DType("complex128", 16, "complex128", "complex128"),
    DType("float8_e4m3fn", 1, None, "float8_e4m3fn"),
    DType("float8_e4m3fnuz", 1, None, "float8_e4m3fnuz"),
    DType("float8_e5m2", 1, None, "float8_e5m2"),
    DType("float8_e5m2fnuz", 1, None, "float8_e5m2fnuz"),
    DType("float8_e8m0fnu", 1, None, "float8_e8m0fnu"),
    DType("float4_e2m1fn_x2", 1, None, "float4_e2m1fn_x2"),
)

BY_NAME: dict[str, DType] = {d.name: d for d in _TABLE}
ALL: tuple[DType, ...] = _TABLE

# Accepted numpy dtypes seen so far. A numpy dtype's ``name`` is computed in Python on every
# access, more than the rest of planning a small tensor costs; few dtypes exist that pass.
_FROM_NUMPY: Memo[np.dtype, DType] = Memo(64)

_NUMPY_ALTERNATIVES = {
    "O": "object arrays hold Python references, not bytes: convert to a numeric dtype",
    "U": "encode text as bytes (np.frombuffer(s.encode(), np.uint8)) or send it in metadata",
    "S": "view fixed-width bytes as uint8 (arr.view(np.uint8))",
    "V": "view structured data as uint8 (arr.view(np.uint8)), field layout in metadata",
    "M": "convert datetimes to int64 (arr.astype('datetime64[ns]').view(np.int64))",
    "m": "convert timedeltas to int64 (arr.view(np.int64))",
}


def from_numpy(dtype: np.dtype) -> DType:
    """Wire dtype of a numpy dtype, byte order ignored; raises for what has no exact wire form."""
    entry = _FROM_NUMPY.get(dtype)
    if entry is not None:
        return entry
    entry = BY_NAME.get(dtype.name) if dtype.kind in "biufc" else None
    if entry is None or entry.numpy is None:
        hint = _NUMPY_ALTERNATIVES.get(dtype.kind, "use one of " + ", ".join(supported_names()))
        raise UnsupportedTensorError(
            f"numpy dtype {dtype.str!r} ({dtype.name}) cannot be encoded exactly; {hint}"
        )
    return _FROM_NUMPY.remember(dtype, entry)


def from_torch(dtype: Any) -> DType:
    """Wire dtype of a ``torch.dtype``; raises for quantized and other unsupported dtypes."""
    name = str(dtype).removeprefix("torch.")
    entry = BY_NAME.get(name)
    if entry is None or entry.torch is None:
        raise UnsupportedTensorError(
            f"torch dtype {dtype} has no wire form; quantized tensors must be dequantized "
            f"(t.dequantize()) or sent as int_repr() plus scale/zero_point in metadata; "
            f"supported: {', '.join(supported_names())}"
        )
    return entry


def torch_dtype(entry: DType) -> Any:
    """The ``torch.dtype`` for a wire dtype; raises when the installed torch lacks it."""
    import torch

    found = getattr(torch, entry.torch, None) if entry.torch else None
    if found is None:
        raise UnsupportedTensorError(
            f"dtype {entry.name!r} is not available in the installed torch {torch.__version__}"
        )
    return found


def lookup(name: object) -> DType:
    """Wire dtype by name, for the decoder: a clear error for anything unknown."""
    if not isinstance(name, str):
        raise MetadataError(f"dtype must be a str, got {type(name).__name__} {name!r}")
    entry = BY_NAME.get(name)
    if entry is None:
        raise MetadataError(
            f"unknown dtype {name[:64]!r}; expected one of {', '.join(supported_names())}"
        )
    return entry


def supported_names() -> list[str]:
    """Every wire dtype name, in table order."""
    return [d.name for d in _TABLE]
