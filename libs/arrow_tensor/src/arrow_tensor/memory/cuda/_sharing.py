"""What PyTorch's ``UntypedStorage._share_cuda_()`` returns, read exactly.

Note [Sharing through PyTorch's allocator]
``_share_cuda_()`` returns ``(device, handle, storage_size_bytes, storage_offset_bytes,
ref_counter_handle, ref_counter_offset, event_handle, event_sync_required)``:

- ``handle`` names the caching allocator's *segment* (the ``cudaMalloc`` block the storage
  was carved from). Up to torch 2.4 it is the raw 64-byte ``cudaIpcMemHandle_t``. From 2.5
  it is versioned: a version byte, a type byte, a payload. Type ``c`` (``cudaMalloc``):
  the 64-byte handle of the segment, 66 bytes in all. Type ``e`` (expandable segments): a
  header and POSIX file descriptors or fabric handles, which legacy IPC cannot open.
- ``storage_offset_bytes`` is the storage's offset inside that segment; a tensor's first
  element is ``storage_offset_bytes + tensor.storage_offset() * element_size`` into it.
- The call takes a slot of torch's shared reference counters and sets it to 1; while it is
  above 0, the block stays in torch's "limbo" when the producer frees it, and each call
  holds one of at most 1,000 interprocess events. ``_release_ipc_counter(handle, offset)``
  decrements it: the producer must call it exactly once per share, on every path (our
  receivers never touch torch's counter), once no receiver reads the memory any more.
- ``event_handle`` is an interprocess event recorded on the producer's current stream at
  the call; with ``event_sync_required`` False (1,000 events in use, ROCm) torch
  synchronized the stream instead and the event is not to be waited on.

``export_from_share`` turns that tuple into an ``Export`` and releases the counter if
anything fails after it was taken. The host stand-in produces the same tuples (every
handle format), so the CPU suite runs this reader for real.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..._errors import CudaUnavailableError
from ._device import IPC_HANDLE_SIZE, NO_EVENT, DeviceId, Export

MALLOC = b"c"
"""Type byte of a versioned handle naming a ``cudaMalloc`` segment."""
EXPANDABLE = b"e"
"""Type byte of a versioned handle naming an expandable segment (no legacy IPC)."""
VERSIONED_BYTES = 2 + IPC_HANDLE_SIZE
"""Length of a versioned ``c`` handle: version byte, type byte, the 64-byte handle."""


def legacy_handle(handle: object) -> bytes:
    """The 64-byte ``cudaIpcMemHandle_t`` inside a ``_share_cuda_`` handle.

    Raises
    ------
    CudaUnavailableError
        For expandable segments, an unknown format, or no handle at all; the value then
        takes the host path.
    """
    if not isinstance(handle, bytes):
        raise CudaUnavailableError(
            f"PyTorch returned no IPC handle for this storage (got {type(handle).__name__})"
        )
    if len(handle) == IPC_HANDLE_SIZE:  # torch <= 2.4: the raw handle
        return handle
    kind = handle[1:2]
    if kind == EXPANDABLE:
        raise CudaUnavailableError(
            "this tensor lives in a PyTorch expandable segment, which legacy CUDA IPC cannot "
            "open (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)"
        )
    if kind == MALLOC and len(handle) == VERSIONED_BYTES:
        return handle[2:]
    raise CudaUnavailableError(
        f"PyTorch returned an IPC handle this version does not read: {len(handle)} bytes, "
        f"version {handle[0] if handle else '-'}, type {kind!r}"
    )


def export_from_share(
    share: tuple[Any, ...],
    *,
    first_element_bytes: int,
    data_ptr: int,
    address_range: Callable[[int], tuple[int, int]],
    release: Callable[[Any, int], None],
    device: DeviceId,
    keepalive: Any,
) -> Export:
    """The ``Export`` of a tensor from what ``_share_cuda_`` returned for its storage.

    Parameters
    ----------
    share:
        The 8-tuple (see Note [Sharing through PyTorch's allocator]).
    first_element_bytes:
        ``tensor.storage_offset() * tensor.element_size()``.
    data_ptr:
        The address of the tensor's first element (for the allocation's size).
    address_range:
        ``ptr -> (base, size)`` of the allocation holding ``ptr``.
    release:
        ``(ref_counter_handle, ref_counter_offset) -> None``: gives torch's counter back.
    device, keepalive:
        The device, and what keeps the memory allocated while receivers read it.

    Raises
    ------
    CudaUnavailableError
        When the memory cannot be shared; torch's counter is released first.
    """
    _dev, handle, _size, storage_offset, rc_handle, rc_offset, event, sync = share

    def on_release() -> None:
        if rc_handle is not None:
            release(rc_handle, rc_offset)

    try:
        raw = legacy_handle(handle)
        _base, size = address_range(data_ptr)
    except BaseException:
        on_release()  # else the block stays in torch's limbo and holds one of its events
        raise
    return Export(
        raw,
        storage_offset + first_element_bytes,
        size,
        event if sync and isinstance(event, bytes) else NO_EVENT,
        device,
        keepalive=keepalive,
        on_release=on_release,
    )
