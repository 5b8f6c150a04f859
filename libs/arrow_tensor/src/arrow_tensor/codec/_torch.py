"""Everything that touches torch; imported only when a torch tensor is seen or wanted."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .._errors import UnsupportedTensorError
from . import _dtypes, _schema

_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BYTES = pa.uint8()  # made once: decoding asks for it on every message
# Wire dtypes that an Arrow array can carry to torch through DLPack as themselves, sparing
# a ``.view(dtype)`` per message (bool, complex and the unsigned types wider than a byte,
# which older torch cannot import, go as bytes).
_DLPACK_TYPES = {
    d.name: pa.from_numpy_dtype(np.dtype(d.numpy))
    for d in _dtypes.ALL
    if d.numpy is not None and (np.dtype(d.numpy).kind in "if" or d.name == "uint8")
}


def is_tensor(x: object) -> bool:
    """True for a torch.Tensor (subclasses such as nn.Parameter included)."""
    return isinstance(x, torch.Tensor)


def to_numpy_bits(t: Any) -> tuple[np.ndarray, _dtypes.DType]:
    """A numpy view sharing ``t``'s memory and strides, holding the same bits, and its wire dtype.

    Views that hold pending math (conjugate, negative bits) are resolved first, one copy.
    """
    # The common case in one torch call: each costs microseconds, tens of them in a node
    # woken by a message with cold caches. ``numpy()`` itself refuses what the checks below
    # look for (autograd, other devices and layouts, conjugate or negative views, dtypes
    # numpy lacks); those go the long way to get their specific error or resolution.
    try:
        bits = t.numpy()
    except (RuntimeError, TypeError, ValueError):
        return _to_numpy_bits_checked(t)
    entry = _dtypes.from_numpy(bits.dtype)
    return (bits if bits.dtype == entry.bits_view else bits.view(entry.bits_view)), entry


def _to_numpy_bits_checked(t: Any) -> tuple[np.ndarray, _dtypes.DType]:
    """``to_numpy_bits`` with every check spelled out."""
    if not (
        t.is_cpu
        and t.layout is torch.strided
        and not t.is_quantized
        and not getattr(t, "is_nested", False)
        and t.dim() <= _schema.MAX_NDIM
    ):
        _refuse_unsupported(t)
    entry = _dtypes.from_torch(t.dtype)
    t = t.detach()
    if t.is_conj():
        t = private_copy(t) if t.dtype == torch.complex32 else t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if entry.numpy is None:
        t = t.view(_SAME_WIDTH_INT[entry.itemsize])
    try:
        return t.numpy().view(entry.bits_view), entry
    except RuntimeError as exc:  # no memory to send: ZeroTensor, functorch wrappers, ...
        raise UnsupportedTensorError(
            f"this tensor has no CPU memory of its own to send ({str(exc)[:160]}); "
            "send a materialized copy, e.g. t.clone() or torch.zeros_like(t)"
        ) from None


def _refuse_unsupported(t: Any) -> None:
    """Raise the error that says why ``t`` (not a plain CPU strided tensor) cannot be sent."""
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
    if t.device.type == "meta":
        raise UnsupportedTensorError(
            "meta tensors hold no data; send shape and dtype in metadata, or materialize it "
            "on the CPU (torch.empty_like(t, device='cpu')) first"
        )
    if t.device.type != "cpu":
        raise UnsupportedTensorError(
            f"tensor on device {t.device} is not supported by the CPU codec; "
            f"move it with t.cpu() first"
        )
    if t.dim() > _schema.MAX_NDIM:  # checked before t.numpy(), which raises a bare ValueError
        raise UnsupportedTensorError(f"{t.dim()} dimensions; at most {_schema.MAX_NDIM}")


def from_buffer(
    buf: pa.Buffer, entry: _dtypes.DType, shape: tuple[int, ...], strides: tuple[int, ...]
) -> Any:
    """A tensor viewing ``buf`` (no copy) with the given shape and element strides."""
    # as_strided checks the view against the storage's size; one call instead of view+permute.
    typed = _DLPACK_TYPES.get(entry.name)
    if typed is not None and buf.size:
        raw = pa.Array.from_buffers(typed, buf.size // entry.itemsize, [None, buf])
        return torch.from_dlpack(raw).as_strided(shape, strides)
    dtype = _dtypes.torch_dtype(entry)
    if buf.size == 0:
        # Viewed, not allocated, as that dtype: allocating complex32 warns.
        return torch.empty(0, dtype=torch.uint8).view(dtype).as_strided(shape, strides)
    raw = pa.Array.from_buffers(_BYTES, buf.size, [None, buf])
    return torch.from_dlpack(raw).view(dtype).as_strided(shape, strides)


def private_copy(t: Any) -> Any:
    """A writable copy with the same strides (for dense layouts) and no shared memory."""
    # Allocating complex32 warns ("experimental"); copy its bits as same-width ints instead.
    if t.dtype == torch.complex32:
        out = torch.empty_like(t, dtype=torch.int32, memory_format=torch.preserve_format)
        return out.view(t.dtype).copy_(t)  # copy_ also resolves a conjugate bit
    out = torch.empty_like(t, memory_format=torch.preserve_format)
    out.copy_(t)
    return out


# --- the fast paths' torch calls (Note [The fast path] in _tensor) ------------------------

_NUMPY_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def threads() -> int:
    """torch's intra-op threads (its copy kernel splits large copies over them)."""
    return torch.get_num_threads()


def copy_bits(dest: np.ndarray, source: np.ndarray) -> bool:
    """Copy ``source`` into ``dest`` (same shape, same dtype, both writable) with torch's
    threaded kernel, both viewed as same-width signed integers so that bits move and no value
    is converted. False, having copied nothing, when torch cannot view them (element widths
    other than 1, 2, 4 or 8 bytes, negative strides)."""
    width = _NUMPY_SIGNED.get(source.dtype.itemsize)
    if width is None:
        return False
    try:
        bits = torch.from_numpy(source.view(width))
    except ValueError:  # negative strides
        return False
    torch.from_numpy(dest.view(width)).copy_(bits)
    return True


def _pick_readonly_importer() -> Callable[[np.ndarray], Any]:
    """The cheapest call that makes a tensor over a read-only numpy array without a warning.

    ``torch.from_dlpack`` is a Python function that probes devices and keyword arguments on
    every call; where the direct importer takes numpy's DLPack 1.0 capsule (which carries
    the read-only flag) and shares its memory, that is used instead.
    """
    direct = getattr(torch._C, "_from_dlpack", None)
    probe = np.arange(4, dtype=np.float32)
    probe.flags.writeable = False
    if direct is not None:
        try:
            t = direct(probe.__dlpack__(max_version=(1, 0)))
            if t.data_ptr() == probe.ctypes.data and tuple(t.shape) == (4,):
                return lambda a: direct(a.__dlpack__(max_version=(1, 0)))
        except Exception:  # TypeError, BufferError, RuntimeError across numpy/torch pairs
            pass
    return torch.from_dlpack


from_readonly_numpy = _pick_readonly_importer()
"""A tensor over a read-only numpy array's memory: zero copy, no warning, same strides."""


@functools.cache
def takes_readonly_numpy(dtype: np.dtype) -> bool:
    """Whether ``from_readonly_numpy`` imports arrays of ``dtype`` (NumPy >= 2.1 exports
    read-only arrays as DLPack 1.0; older pairs refuse them, or lack the wide unsigned
    types): messages it cannot take keep the full path's pyarrow route."""
    probe = np.zeros(2, dtype)
    probe.flags.writeable = False
    try:
        return tuple(from_readonly_numpy(probe).shape) == (2,)
    except Exception:  # BufferError, TypeError, RuntimeError across versions
        return False
