"""``CudaBackend`` for CuPy arrays, over CuPy's runtime API."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..._errors import CudaUnavailableError, UnsupportedTensorError
from ...codec import _dtypes
from ...codec._schema import TensorHeader
from ._device import ArrayInfo, DeviceId, DeviceSpan, Export
from ._runtime import Runtime


class CupyCudaBackend:
    """``CudaBackend`` for CuPy arrays, over CuPy's runtime API."""

    name = "cuda"

    def __init__(self) -> None:
        import cupy

        self.cupy = cupy
        self.rt = cupy.cuda.runtime

    def info(self, x: Any) -> ArrayInfo:
        """Facts of a cupy array (strides in bytes -> elements)."""
        entry = _dtypes.from_numpy(x.dtype)
        item = x.dtype.itemsize
        return ArrayInfo(entry, tuple(x.shape), tuple(s // item for s in x.strides), "cupy")

    def compact(self, x: Any, perm: Sequence[int]) -> Any:
        """One device copy, dims in order ``perm``."""
        inverse = [0] * len(perm)
        for i, p in enumerate(perm):
            inverse[p] = i
        dense = self.cupy.ascontiguousarray(x.transpose(list(perm)))
        return dense.transpose(inverse)

    def export(self, x: Any) -> Export:
        """``cuIpcGetMemHandle`` of the block base; event recorded on the current stream."""
        ordinal = x.device.id
        rt = Runtime.get()
        with self.cupy.cuda.Device(ordinal), _typed(self.cupy):
            low = x.data.ptr + sum(
                (n - 1) * s for n, s in zip(x.shape, x.strides, strict=True) if s < 0 and n
            )
            base, size = rt.address_range(low, ordinal)
            handle = rt.ipc_get(base, ordinal)
            event = self.cupy.cuda.Event(block=False, disable_timing=True, interprocess=True)
            event.record()
            event_handle = bytes(self.rt.ipcGetEventHandle(event.ptr))
            device = self._device(ordinal)
        return Export(handle, low - base, size, event_handle, device, keepalive=(x, event))

    def _device(self, ordinal: int) -> DeviceId:
        # From the driver: CuPy's properties carry the UUID as a C string, cut at a 0 byte.
        return Runtime.get().device(ordinal)

    def local_device(self, uuid: str, pci_bus_id: str) -> int | None:
        """Match by UUID first, PCI bus id second."""
        devices = [self._device(i) for i in range(Runtime.get().device_count())]
        for dev in devices:
            if dev.uuid == uuid:
                return dev.ordinal
        for dev in devices:
            if pci_bus_id and dev.pci_bus_id == pci_bus_id.lower():
                return dev.ordinal
        return None

    def open_handle(self, handle: bytes, ordinal: int) -> tuple[int, int]:
        """``cuIpcOpenMemHandle`` in the primary context CuPy uses for ``ordinal``."""
        return Runtime.get().open_range(handle, ordinal)

    def close_handle(self, base: int, ordinal: int) -> None:
        """``cuIpcCloseMemHandle``."""
        Runtime.get().ipc_close(base, ordinal)

    def wait_event(self, event: bytes, ordinal: int) -> None:
        """Open the producer's event, make the current stream wait, drop our handle to it."""
        with self.cupy.cuda.Device(ordinal), _typed(self.cupy):
            ev = self.rt.ipcOpenEventHandle(event)
            try:
                self.rt.streamWaitEvent(self.cupy.cuda.get_current_stream().ptr, ev, 0)
            finally:
                self.rt.eventDestroy(ev)

    def synchronize(self, ordinal: int) -> None:
        """Every stream of ``ordinal`` idle (see ``TorchCudaBackend.synchronize``)."""
        with self.cupy.cuda.Device(ordinal), _typed(self.cupy):
            self.cupy.cuda.Device(ordinal).synchronize()

    def build(self, span: DeviceSpan, header: TensorHeader) -> Any:
        """A cupy array over the mapped bytes (``UnownedMemory`` keeps ``owner`` alive)."""
        entry = header.dtype
        if entry.numpy is None:
            raise UnsupportedTensorError(f"cupy has no dtype {entry.name}; decode it with torch")
        cp = self.cupy
        mem = cp.cuda.UnownedMemory(span.ptr, span.nbytes, span.owner, span.ordinal)
        flat = cp.ndarray((span.nbytes,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))
        physical = flat.view(entry.numpy_dtype).reshape(header.physical_shape)
        return physical.transpose(header.inverse_perm)

    def to_host(self, ptr: int, nbytes: int, ordinal: int) -> np.ndarray:
        """Device-to-host copy on the current stream (ordered after the event wait)."""
        out = np.empty(nbytes, dtype=np.uint8)
        with self.cupy.cuda.Device(ordinal), _typed(self.cupy):
            stream = self.cupy.cuda.get_current_stream()
            kind = self.rt.memcpyDeviceToHost
            self.rt.memcpyAsync(out.ctypes.data, ptr, nbytes, kind, stream.ptr)
            stream.synchronize()
        return out


@contextlib.contextmanager
def _typed(cupy: Any) -> Iterator[None]:
    """CuPy's own CUDA errors as ``CudaUnavailableError`` (typed, with the call's message)."""
    try:
        yield
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise CudaUnavailableError(f"CUDA refused a call of CuPy's: {exc}") from exc
