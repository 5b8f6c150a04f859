"""``CudaBackend`` for torch CUDA tensors (it also opens any CUDA descriptor for torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..._errors import UnsupportedTensorError
from ...codec import _dtypes
from ...codec._schema import TensorHeader
from ._device import ArrayInfo, DeviceId, DeviceSpan, Export
from ._runtime import CaiOwner, Runtime


class TorchCudaBackend:
    """``CudaBackend`` for torch CUDA tensors (also opens any CUDA descriptor for torch)."""

    name = "cuda"

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def info(self, x: Any) -> ArrayInfo:
        """Facts of a CUDA tensor; refuses layouts without a wire form."""
        t = x
        if t.layout is not self.torch.strided or t.is_quantized or t.is_nested:
            raise UnsupportedTensorError(
                f"torch layout {t.layout} / quantized / nested CUDA tensors are not supported; "
                f"convert to a dense strided tensor first"
            )
        entry = _dtypes.from_torch(t.dtype)
        pending = bool(t.is_conj() or t.is_neg())
        return ArrayInfo(entry, tuple(t.shape), tuple(t.stride()), "torch", pending)

    def compact(self, x: Any, perm: Sequence[int]) -> Any:
        """One device copy into a fresh dense tensor laid out in order ``perm``."""
        t = x.detach()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        inverse = [0] * len(perm)
        for i, p in enumerate(perm):
            inverse[p] = i
        return t.permute(list(perm)).contiguous().permute(inverse)

    def export(self, x: Any) -> Export:
        """The driver's handle of the allocation ``x`` lies in, and an event of ours.

        Not ``UntypedStorage._share_cuda_``: that wraps the storage in PyTorch's own
        reference counting on every call (a counter slot and one of at most 1,000 events
        per share, kept until the storage dies, and the block parked in "limbo" while a
        counter is up), which a buffer sent over and over would pile up. The slots of the
        in-flight table already keep ``x`` alive until every receiver released it, so the
        caching allocator cannot reuse the memory under a reader; an allocation the legacy
        API cannot share (expandable segments, ``cudaMallocAsync`` pools, VMM) makes
        ``cuIpcGetMemHandle`` refuse, and the value takes the host path.
        """
        torch = self.torch
        ordinal = x.device.index
        rt = Runtime.get()
        ptr = x.data_ptr()
        with torch.cuda.device(ordinal):
            base, size = rt.address_range(ptr, ordinal)
            handle = rt.ipc_get(base, ordinal)
            # Recorded on the current stream: receivers wait for what was queued before.
            event = torch.cuda.Event(interprocess=True)
            event.record()
            event_handle = bytes(event.ipc_handle())
        return Export(
            handle, ptr - base, size, event_handle, self._device(ordinal), keepalive=(x, event)
        )

    def _device(self, ordinal: int) -> DeviceId:
        props = self.torch.cuda.get_device_properties(ordinal)
        uuid = str(getattr(props, "uuid", ""))
        pci = "{:04x}:{:02x}:{:02x}.0".format(
            getattr(props, "pci_domain_id", 0),
            getattr(props, "pci_bus_id", 0),
            getattr(props, "pci_device_id", 0),
        )
        return DeviceId(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}", pci, ordinal)

    def local_device(self, uuid: str, pci_bus_id: str) -> int | None:
        """Match by UUID first, PCI bus id second."""
        if not self.torch.cuda.is_available():
            return None
        devices = [self._device(i) for i in range(self.torch.cuda.device_count())]
        for dev in devices:
            if dev.uuid == uuid:
                return dev.ordinal
        for dev in devices:
            if pci_bus_id and dev.pci_bus_id == pci_bus_id:
                return dev.ordinal
        return None

    def open_handle(self, handle: bytes, ordinal: int) -> tuple[int, int]:
        """``cuIpcOpenMemHandle`` in the primary context torch uses for ``ordinal``."""
        self.torch.cuda.init()
        return Runtime.get().open_range(handle, ordinal)

    def close_handle(self, base: int, ordinal: int) -> None:
        """``cuIpcCloseMemHandle``."""
        Runtime.get().ipc_close(base, ordinal)

    def wait_event(self, event: bytes, ordinal: int) -> None:
        """``torch.cuda.Event.from_ipc_handle`` waited on by the current stream."""
        device = self.torch.device("cuda", ordinal)
        ev = self.torch.cuda.Event.from_ipc_handle(device, event)
        ev.wait(self.torch.cuda.current_stream(device))

    def synchronize(self, ordinal: int) -> None:
        """Every stream of ``ordinal`` idle: no kernel of this process, on whatever stream
        the user ran it, still reads the producer's memory."""
        self.torch.cuda.synchronize(ordinal)

    def build(self, span: DeviceSpan, header: TensorHeader) -> Any:
        """A torch tensor over the mapped bytes, reinterpreted via a byte view."""
        torch = self.torch
        dtype = _dtypes.torch_dtype(header.dtype)
        # torch increfs the __cuda_array_interface__ object and decrefs it in the storage's
        # deleter, so ``owner`` lives exactly as long as the last view (no copy: same device).
        with torch.cuda.device(span.ordinal):
            owner = CaiOwner(span.ptr, span.nbytes, span.owner)
            raw = torch.as_tensor(owner, device=f"cuda:{span.ordinal}")
        return raw.view(dtype).view(header.physical_shape).permute(header.inverse_perm)

    def to_host(self, ptr: int, nbytes: int, ordinal: int) -> np.ndarray:
        """Device-to-host copy."""
        with self.torch.cuda.device(ordinal):
            raw = self.torch.as_tensor(CaiOwner(ptr, nbytes, None), device=f"cuda:{ordinal}")
            return raw.cpu().numpy()
