"""``CudaBackend`` for torch CUDA tensors (it also opens any CUDA descriptor for torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..._errors import CudaUnavailableError, UnsupportedTensorError
from ...codec import _dtypes
from ...codec._schema import TensorHeader
from ._device import ArrayInfo, DeviceId, DeviceSpan, Export
from ._runtime import CaiOwner, Runtime
from ._sharing import export_from_share


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
        """Through PyTorch's own IPC sharing (Note [Sharing through PyTorch's allocator])."""
        torch = self.torch
        ordinal = x.device.index
        # Everything that can fail before the share goes first: once _share_cuda_ took
        # torch's counter, only export_from_share (which releases it on failure) may raise.
        device, runtime = self._device(ordinal), Runtime.get()
        release_counter = torch.UntypedStorage._release_ipc_counter
        with torch.cuda.device(ordinal):  # the driver call runs in the tensor's own context
            try:
                share = x.untyped_storage()._share_cuda_()
            except RuntimeError as exc:  # cudaMallocAsync, memory not from the allocator...
                raise CudaUnavailableError(
                    f"PyTorch cannot share this CUDA memory over legacy IPC "
                    f"({str(exc).splitlines()[0][:200]}); memory received from another "
                    f"process must be cloned before re-sending"
                ) from None
            return export_from_share(
                share,
                first_element_bytes=x.storage_offset() * x.element_size(),
                data_ptr=x.data_ptr(),
                address_range=lambda ptr: runtime.address_range(ptr, ordinal),
                release=lambda handle, offset: release_counter(handle, offset, device=ordinal),
                device=device,
                keepalive=x,
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
        rt = Runtime.get()
        ptr = rt.ipc_open(handle, ordinal)
        return rt.address_range(ptr, ordinal)

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
