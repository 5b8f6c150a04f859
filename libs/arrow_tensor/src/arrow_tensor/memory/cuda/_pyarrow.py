"""``CudaBackend`` for ``pyarrow.cuda.CudaBuffer`` (a pyarrow built with CUDA)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..._errors import CudaUnavailableError
from ...codec import _dtypes
from ...codec._schema import TensorHeader
from ._device import NO_EVENT, ArrayInfo, DeviceSpan, Export
from ._runtime import Runtime


def pyarrow_cuda() -> Any | None:
    """``pyarrow.cuda`` where pyarrow is built with CUDA (conda-forge), else None.

    PyPI wheels of pyarrow are built without CUDA: ``import pyarrow.cuda`` raises there.
    """
    try:
        import pyarrow.cuda as pacuda
    except ImportError:
        return None
    return pacuda


class PyarrowCudaBackend:
    """``CudaBackend`` for ``pyarrow.cuda.CudaBuffer`` (conda-forge pyarrow built with CUDA).

    ``CudaBuffer.export_for_ipc`` exports the *base* of the allocation and drops the
    buffer's offset inside it (dora-rs/dora#978's second cause); we carry that offset
    ourselves. Arrow's CUDA API has no streams, so the producer synchronizes its context
    instead of recording an event and the receiver waits on events from the host.
    """

    name = "cuda"

    def __init__(self) -> None:
        self.pacuda = pyarrow_cuda()
        if self.pacuda is None:
            raise CudaUnavailableError(
                "pyarrow here is built without CUDA (PyPI wheels are); use the conda-forge "
                "pyarrow, or send torch / cupy device arrays"
            )
        self.rt = Runtime.get()

    def info(self, x: Any) -> ArrayInfo:
        """A CudaBuffer is a 1-D uint8 array."""
        return ArrayInfo(_dtypes.BY_NAME["uint8"], (x.size,), (1,), "pyarrow.cuda")

    def compact(self, x: Any, perm: Sequence[int]) -> Any:
        """A CudaBuffer is always dense."""
        return x

    def export(self, x: Any) -> Export:
        """Base and size from the driver, handle of the base, offset of the buffer in it."""
        ordinal = x.context.device_number
        base, size = self.rt.address_range(x.address, ordinal)
        x.context.synchronize()
        handle = self.rt.ipc_get(base, ordinal)
        return Export(handle, x.address - base, size, NO_EVENT, self.rt.device(ordinal), x)

    def local_device(self, uuid: str, pci_bus_id: str) -> int | None:
        """Match by UUID first, PCI bus id second."""
        devices = [self.rt.device(i) for i in range(self.rt.device_count())]
        for dev in devices:
            if dev.uuid == uuid or (pci_bus_id and dev.pci_bus_id == pci_bus_id.lower()):
                return dev.ordinal
        return None

    def open_handle(self, handle: bytes, ordinal: int) -> tuple[int, int]:
        """``cuIpcOpenMemHandle``."""
        return self.rt.open_range(handle, ordinal)

    def close_handle(self, base: int, ordinal: int) -> None:
        """``cuIpcCloseMemHandle``."""
        self.rt.ipc_close(base, ordinal)

    def wait_event(self, event: bytes, ordinal: int) -> None:
        """Arrow has no streams: block the host until the producer's event completed."""
        self.rt.event_synchronize(event, ordinal)

    def synchronize(self, ordinal: int) -> None:
        """Arrow's copies are synchronous: nothing to wait for."""

    def build(self, span: DeviceSpan, header: TensorHeader) -> Any:
        """A ``CudaBuffer`` over the tensor's bytes (dense, in its dimension order)."""
        context = self.pacuda.Context(span.ordinal)
        return context.foreign_buffer(span.ptr, span.nbytes, base=span.owner)

    def to_host(self, ptr: int, nbytes: int, ordinal: int) -> np.ndarray:
        """Device-to-host copy."""
        buf = self.pacuda.Context(ordinal).foreign_buffer(ptr, nbytes)
        return np.frombuffer(buf.copy_to_host(), dtype=np.uint8).copy()
