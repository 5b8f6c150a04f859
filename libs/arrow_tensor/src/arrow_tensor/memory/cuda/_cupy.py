"""``CudaBackend`` for CuPy arrays, over CuPy's runtime API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..._errors import UnsupportedTensorError
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
        """``cudaIpcGetMemHandle`` of the block base; event recorded on the current stream."""
        with self.cupy.cuda.Device(x.device.id):
            low = x.data.ptr + sum(
                (n - 1) * s for n, s in zip(x.shape, x.strides, strict=True) if s < 0 and n
            )
            base, size = Runtime.get().address_range(low)
            handle = bytes(self.rt.ipcGetMemHandle(base))
            event = self.cupy.cuda.Event(block=False, disable_timing=True, interprocess=True)
            event.record()
            event_handle = bytes(self.rt.ipcGetEventHandle(event.ptr))
        return Export(
            handle,
            low - base,
            size,
            event_handle,
            self._device(x.device.id),
            keepalive=(x, event),
        )

    def _device(self, ordinal: int) -> DeviceId:
        props = self.rt.getDeviceProperties(ordinal)
        raw = props.get("uuid", b"")
        hexed = raw.hex() if isinstance(raw, bytes) else str(raw)
        uuid = (
            f"GPU-{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:32]}"
            if len(hexed) == 32
            else f"GPU-{hexed}"
        )
        pci = self.rt.deviceGetPCIBusId(ordinal).lower()
        return DeviceId(uuid, pci, ordinal)

    def local_device(self, uuid: str, pci_bus_id: str) -> int | None:
        """Match by UUID first, PCI bus id second."""
        devices = [self._device(i) for i in range(self.rt.getDeviceCount())]
        for dev in devices:
            if dev.uuid == uuid:
                return dev.ordinal
        for dev in devices:
            if pci_bus_id and dev.pci_bus_id == pci_bus_id.lower():
                return dev.ordinal
        return None

    def open_handle(self, handle: bytes, ordinal: int) -> tuple[int, int]:
        """``cudaIpcOpenMemHandle`` on ``ordinal``."""
        with self.cupy.cuda.Device(ordinal):
            ptr = self.rt.ipcOpenMemHandle(handle)
            return Runtime.get().address_range(ptr)

    def close_handle(self, base: int, ordinal: int) -> None:
        """``cudaIpcCloseMemHandle``."""
        with self.cupy.cuda.Device(ordinal):
            self.rt.ipcCloseMemHandle(base)

    def wait_event(self, event: bytes, ordinal: int) -> None:
        """Open the producer's event, make the current stream wait, drop our handle to it."""
        with self.cupy.cuda.Device(ordinal):
            ev = self.rt.ipcOpenEventHandle(event)
            try:
                self.rt.streamWaitEvent(self.cupy.cuda.get_current_stream().ptr, ev, 0)
            finally:
                self.rt.eventDestroy(ev)

    def synchronize(self, ordinal: int) -> None:
        """Current stream idle."""
        with self.cupy.cuda.Device(ordinal):
            self.cupy.cuda.get_current_stream().synchronize()

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
        """Device-to-host copy."""
        out = np.empty(nbytes, dtype=np.uint8)
        with self.cupy.cuda.Device(ordinal):
            self.rt.memcpy(out.ctypes.data, ptr, nbytes, self.rt.memcpyDeviceToHost)
        return out
