"""The narrow interface between the CUDA transport and device memory, and its data types.

Note [Why a backend interface]
Everything in ``_ipc`` and ``_receive`` (descriptors, offsets, the handle cache, lifetimes,
fallback decisions) is plain bookkeeping over three facts the device reports: *which
allocation* a pointer lies in (its IPC handle, base and size), *when* the producer's
kernels are done (an interprocess event) and *how to build* a framework array over a
pointer whose life we control. ``CudaBackend`` is exactly that surface. Two kinds of
implementation exist:

* ``TorchCudaBackend`` (``_torch``), ``CupyCudaBackend`` (``_cupy``) and
  ``PyarrowCudaBackend`` (``_pyarrow``) over the real CUDA stack. A tensor is shared by the
  driver's handle of the allocation it lies in (``cuMemGetAddressRange``,
  ``cuIpcGetMemHandle``: a caching allocator's block, see Note [CUDA IPC and the caching
  allocator] in ``torch/multiprocessing/reductions.py``) and an interprocess event of the
  framework's recorded on the current stream; handles are opened and closed through the
  driver too (``_runtime``, Note [The driver API, not a second runtime]).
* ``HostStandIn`` (``_standin``): host memory in owner-only ``/dev/shm`` blocks that several
  "tensors" share, as the caching allocator packs small tensors into one ``cudaMalloc``
  block. Its handles open in another process for real, so the whole transport above it is
  tested on CPU, across processes too. It is a test double: messages it writes say so
  (``at.cuda.backend = "standin"``) and a real receiver never opens them as GPU memory.

torch and cupy are imported only when a backend of theirs is made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ...codec import _dtypes
from ...codec._schema import TensorHeader

IPC_HANDLE_SIZE = 64
NO_EVENT = bytes(IPC_HANDLE_SIZE)


@dataclass(frozen=True)
class DeviceId:
    """A device named robustly across processes (``CUDA_VISIBLE_DEVICES`` may differ)."""

    uuid: str
    pci_bus_id: str
    ordinal: int


@dataclass
class Export:
    """What a producer shares for one dense array: its block, where it starts, its event.

    ``keepalive`` holds whatever keeps the memory allocated (the array itself) and
    ``on_release`` runs once when every receiver has released it.
    """

    handle: bytes
    offset: int
    alloc_size: int
    event: bytes
    device: DeviceId
    keepalive: Any
    on_release: Callable[[], None] | None = None


@dataclass(frozen=True)
class DeviceSpan:
    """Bytes ``[ptr, ptr + nbytes)`` of device ``ordinal``, alive while ``owner`` is."""

    ptr: int
    nbytes: int
    ordinal: int
    owner: object = None


@dataclass(frozen=True)
class ArrayInfo:
    """Framework-neutral facts about an array, in elements (strides) and bytes (ptr)."""

    entry: _dtypes.DType
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    framework: str
    pending_math: bool = False
    """The memory does not hold the values yet (torch conjugate / negative views)."""


class CudaBackend(Protocol):
    """The narrow interface between the transport and device memory.

    Producer: ``info``, ``compact``, ``export``. Receiver: ``local_device``, ``open_handle``,
    ``close_handle``, ``wait_event``, ``build``, ``to_host``, ``synchronize``.
    """

    name: str

    def info(self, x: Any) -> ArrayInfo:
        """dtype, shape, element strides and framework name of a device array."""
        ...

    def compact(self, x: Any, perm: Sequence[int]) -> Any:
        """A new dense array on the same device, dims laid out in order ``perm``, one copy."""
        ...

    def export(self, x: Any) -> Export:
        """Share a dense array: handle of its allocation, byte offset of its first element."""
        ...

    def local_device(self, uuid: str, pci_bus_id: str) -> int | None:
        """This process's ordinal of the device named by ``uuid`` (or PCI bus id), or None."""
        ...

    def open_handle(self, handle: bytes, ordinal: int) -> tuple[int, int]:
        """Map an allocation; returns (base address, size in bytes) of the whole block."""
        ...

    def close_handle(self, base: int, ordinal: int) -> None:
        """Unmap an allocation opened by ``open_handle``."""
        ...

    def wait_event(self, event: bytes, ordinal: int) -> None:
        """Make the current stream of ``ordinal`` wait for the producer's event."""
        ...

    def synchronize(self, ordinal: int) -> None:
        """Wait until this process's current stream on ``ordinal`` is idle."""
        ...

    def build(self, span: DeviceSpan, header: TensorHeader) -> Any:
        """A zero-copy array of ``header``'s framework, dtype and layout over ``span``.

        The bytes are the dense C-ordered array of ``header.physical_shape``; the result is
        its transpose by ``header.inverse_perm``, and it keeps ``span.owner`` alive.
        """
        ...

    def to_host(self, ptr: int, nbytes: int, ordinal: int) -> np.ndarray:
        """A private host copy (uint8) of ``nbytes`` device bytes."""
        ...
