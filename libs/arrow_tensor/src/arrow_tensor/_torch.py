"""Everything that touches torch; imported only when a torch tensor is seen or wanted."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from . import _dtypes
from ._errors import UnsupportedTensorError

_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def is_tensor(x: object) -> bool:
    """True for a torch.Tensor (subclasses such as nn.Parameter included)."""
    return isinstance(x, torch.Tensor)


def to_numpy_bits(t: Any) -> tuple[np.ndarray, _dtypes.DType]:
    """A numpy view sharing ``t``'s memory and strides, holding the same bits, and its wire dtype.

    Views that hold pending math (conjugate, negative bits) are resolved first, one copy.
    """
    if t.layout is not torch.strided:
        raise UnsupportedTensorError(
            f"torch layout {t.layout} is not supported; convert with t.to_dense() first"
        )
    if t.is_quantized:
        raise UnsupportedTensorError(
            "quantized tensors are not supported; send t.dequantize(), or t.int_repr() "
            "with q_scale()/q_zero_point() in metadata"
        )
    if getattr(t, "is_nested", False):
        raise UnsupportedTensorError(
            "nested tensors are not supported; send t.unbind() as a list (structured payload)"
        )
    if t.device.type != "cpu":
        raise UnsupportedTensorError(
            f"tensor on device {t.device} is not supported by the CPU codec; "
            f"move it with t.cpu() first"
        )
    entry = _dtypes.from_torch(t.dtype)
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if entry.numpy is None:
        t = t.view(_SAME_WIDTH_INT[entry.itemsize])
    return t.numpy().view(entry.bits_view), entry


def from_buffer(
    buf: pa.Buffer, entry: _dtypes.DType, physical: tuple[int, ...], inverse: list[int]
) -> Any:
    """A tensor viewing ``buf`` (no copy) with the given physical shape, then permuted."""
    dtype = _dtypes.torch_dtype(entry)
    if buf.size == 0:
        return torch.empty(physical, dtype=dtype).permute(inverse)
    raw = pa.Array.from_buffers(pa.uint8(), buf.size, [None, buf])
    return torch.from_dlpack(raw).view(dtype).view(physical).permute(inverse)


def private_copy(t: Any) -> Any:
    """A writable copy with the same strides (for dense layouts) and no shared memory."""
    out = torch.empty_like(t, memory_format=torch.preserve_format)
    out.copy_(t)
    return out
