"""The thin layer that touches device memory, behind one narrow interface.

Note [Why a backend interface]
Everything in ``_cuda_ipc`` (descriptors, offsets, the handle cache, lifetimes, fallback
decisions) is plain bookkeeping over three facts the device reports: *which allocation* a
pointer lies in (its IPC handle, base and size), *when* the producer's kernels are done (an
interprocess event) and *how to build* a framework array over a pointer whose life we
control. ``CudaBackend`` is exactly that surface. Two implementations exist:

* ``TorchCudaBackend`` / ``CupyCudaBackend`` over the real CUDA stack. The producer side
  prefers primitives that PyTorch and CuPy test heavily: ``UntypedStorage._share_cuda_``
  (the caching allocator's own base/offset of a block and an interprocess event recorded on
  the current stream, see Note [CUDA IPC and the caching allocator] in
  ``torch/multiprocessing/reductions.py``), ``torch.cuda.Event.from_ipc_handle``,
  ``cupy.cuda.runtime.ipc*``. Two calls have no framework wrapper and go through ctypes:
  ``cudaIpcOpenMemHandle``/``cudaIpcCloseMemHandle`` for torch receivers and
  ``cuMemGetAddressRange`` to learn a block's base and size.
* ``HostStandIn``: host memory in owner-only ``/dev/shm`` blocks that several "tensors" share,
  like the caching allocator packs small tensors into one ``cudaMalloc`` block. Its handles
  open in another process for real, so the whole transport above it is tested on CPU,
  including across processes. It is a test double: messages it writes say so
  (``at.cuda.backend = "standin"``) and a real receiver never opens them as GPU memory.

Nothing here is imported by ``import arrow_tensor``; torch and cupy are imported on use.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import mmap
import os
import secrets
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from . import _dtypes
from ._errors import CudaUnavailableError, UnsupportedTensorError

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

    def build(
        self,
        framework: str,
        ptr: int,
        nbytes: int,
        owner: object,
        entry: _dtypes.DType,
        physical: tuple[int, ...],
        inverse: Sequence[int],
        ordinal: int,
    ) -> Any:
        """A zero-copy array over ``[ptr, ptr + nbytes)`` that keeps ``owner`` alive."""
        ...

    def to_host(self, ptr: int, nbytes: int, ordinal: int) -> np.ndarray:
        """A private host copy (uint8) of ``nbytes`` device bytes."""
        ...


# --------------------------------------------------------------------------------------------
# Host stand-in: real cross-process memory, no GPU.

STANDIN_UUID = "STANDIN-00000000-0000-0000-0000-000000000000"
STANDIN_PREFIX = "at-standin-"
_STANDIN_BLOCK = 1 << 20
_STANDIN_ALIGN = 512  # PyTorch's caching allocator rounds small tensors to 512 bytes


class _Block:
    """One owner-only shared-memory block, the stand-in for a ``cudaMalloc`` allocation."""

    def __init__(self, size: int) -> None:
        self.name = f"{STANDIN_PREFIX}{os.getpid()}-{secrets.token_hex(12)}"
        self.size = size
        fd = os.open(f"/dev/shm/{self.name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self.map, dtype=np.uint8)
        self.used = 0

    def unlink(self) -> None:
        try:
            os.unlink(f"/dev/shm/{self.name}")
        except FileNotFoundError:
            pass


class StandInArray:
    """A "device array" of the stand-in: a numpy view into a shared block.

    Indexing, ``transpose`` and ``T`` give views in the same block, with the same layouts a
    CUDA tensor can have (offsets inside the block, permutations, steps, negative strides).
    """

    def __init__(self, view: np.ndarray, block: _Block) -> None:
        self.view = view
        self.block = block

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape."""
        return self.view.shape

    @property
    def dtype(self) -> np.dtype:
        """numpy dtype."""
        return self.view.dtype

    @property
    def offset(self) -> int:
        """Byte offset of element ``[0, ..., 0]`` inside its block."""
        return self.view.__array_interface__["data"][0] - self.block.array.ctypes.data

    def __getitem__(self, key: Any) -> StandInArray:
        # A trailing Ellipsis keeps integer indexing a 0-d view, never a numpy scalar copy.
        return StandInArray(self.view[(*np.index_exp[key], Ellipsis)], self.block)

    def transpose(self, *axes: int) -> StandInArray:
        """A permuted view, no copy."""
        return StandInArray(self.view.transpose(*axes), self.block)

    @property
    def T(self) -> StandInArray:
        """Reversed dims, no copy."""
        return self.transpose()

    def numpy(self) -> np.ndarray:
        """A host copy with the same layout class."""
        return np.array(self.view, order="K", copy=True)


class StandInAllocator:
    """Packs arrays into shared blocks, several per block, like a caching allocator."""

    def __init__(self, block_size: int = _STANDIN_BLOCK) -> None:
        self.block_size = block_size
        self.blocks: list[_Block] = []
        self._lock = threading.Lock()

    def empty(self, shape: Sequence[int], dtype: Any) -> StandInArray:
        """An uninitialised C-contiguous array, packed after the previous ones if it fits."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        rounded = max(_STANDIN_ALIGN, -(-nbytes // _STANDIN_ALIGN) * _STANDIN_ALIGN)
        with self._lock:
            block = self.blocks[-1] if self.blocks else None
            if block is None or block.used + rounded > block.size:
                block = _Block(max(self.block_size, rounded))
                self.blocks.append(block)
            start = block.used
            block.used += rounded
        raw = block.array[start : start + nbytes]
        return StandInArray(raw.view(dt).reshape(tuple(shape)), block)

    def asarray(self, host: np.ndarray) -> StandInArray:
        """Copy a host array into the pool (C order)."""
        out = self.empty(host.shape, host.dtype)
        out.view[...] = host
        return out

    def stack(self, arrays: Sequence[StandInArray]) -> StandInArray:
        """``torch.stack``: one new array, packed like any other allocation."""
        host = np.stack([a.view for a in arrays])
        return self.asarray(host)

    def close(self) -> None:
        """Unlink every block (mappings stay valid until their views die)."""
        for block in self.blocks:
            block.unlink()


class _HostOwner:
    """Keeps a stand-in mapping referenced while any numpy view built on it lives."""

    def __init__(self, ptr: int, nbytes: int, owner: object) -> None:
        self.owner = owner
        self.__array_interface__ = {
            "data": (ptr, True),
            "shape": (nbytes,),
            "typestr": "|u1",
            "version": 3,
        }


class HostStandIn:
    """``CudaBackend`` over host shared memory; counts opens, closes and event waits."""

    name = "standin"
    ipc_problem: str | None = None
    """Set by tests to play a device without legacy IPC (e.g. expandable segments)."""

    def __init__(self, allocator: StandInAllocator | None = None) -> None:
        self.allocator = allocator or StandInAllocator()
        self.device = DeviceId(STANDIN_UUID, "0000:00:00.0", 0)
        self.opened: dict[int, mmap.mmap] = {}
        self.opens = 0
        self.closes = 0
        self.waited: list[bytes] = []
        self._events = itertools.count(1)

    def info(self, x: Any) -> ArrayInfo:
        """Facts of a ``StandInArray``."""
        if not isinstance(x, StandInArray):
            raise UnsupportedTensorError(f"stand-in backend got {type(x).__name__}")
        entry = _dtypes.from_numpy(x.dtype)
        strides = tuple(s // x.dtype.itemsize for s in x.view.strides)
        return ArrayInfo(entry, tuple(x.shape), strides, "numpy")

    def compact(self, x: Any, perm: Sequence[int]) -> StandInArray:
        """One copy into a fresh allocation of this pool, dims in order ``perm``."""
        physical = x.view.transpose(list(perm))
        out = self.allocator.empty(physical.shape, physical.dtype.newbyteorder("="))
        out.view[...] = physical
        inverse = [0] * len(perm)
        for i, p in enumerate(perm):
            inverse[p] = i
        return out.transpose(*inverse)

    def export(self, x: Any) -> Export:
        """Handle = block name, offset = lowest byte of the (dense) array in the block."""
        view = x.view
        low = view.__array_interface__["data"][0] + sum(
            (n - 1) * s for n, s in zip(view.shape, view.strides, strict=True) if s < 0 and n
        )
        offset = low - x.block.array.ctypes.data
        token = next(self._events).to_bytes(8, "little")
        return Export(
            _pad(x.block.name.encode()),
            offset,
            x.block.size,
            _pad(b"standin-event" + token),
            self.device,
            keepalive=x,
        )

    def local_device(self, uuid: str, pci_bus_id: str) -> int | None:
        """Only the stand-in device exists."""
        return 0 if uuid == STANDIN_UUID else None

    def open_handle(self, handle: bytes, ordinal: int) -> tuple[int, int]:
        """Map a block read-only by name, after checking the name is one of ours."""
        name = handle.rstrip(b"\0").decode("ascii", "replace")
        if not name.startswith(STANDIN_PREFIX) or "/" in name:
            raise CudaUnavailableError(f"stand-in handle {name[:40]!r} names no stand-in block")
        try:
            fd = os.open(f"/dev/shm/{name}", os.O_RDONLY)
        except FileNotFoundError as exc:
            raise CudaUnavailableError(
                f"stand-in block {name!r} is gone (its producer released or exited)"
            ) from exc
        try:
            size = os.fstat(fd).st_size
            mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        probe = np.frombuffer(mapping, dtype=np.uint8)
        base = probe.ctypes.data
        del probe
        self.opened[base] = mapping
        self.opens += 1
        return base, size

    def close_handle(self, base: int, ordinal: int) -> None:
        """Unmap."""
        self.opened.pop(base).close()
        self.closes += 1

    def wait_event(self, event: bytes, ordinal: int) -> None:
        """Host memory is coherent; record the wait so tests can check it happened."""
        self.waited.append(event)

    def synchronize(self, ordinal: int) -> None:
        """Nothing runs asynchronously on the host."""

    def build(
        self,
        framework: str,
        ptr: int,
        nbytes: int,
        owner: object,
        entry: _dtypes.DType,
        physical: tuple[int, ...],
        inverse: Sequence[int],
        ordinal: int,
    ) -> np.ndarray:
        """A read-only numpy view whose base chain keeps ``owner`` alive."""
        raw = np.asarray(_HostOwner(ptr, nbytes, owner))
        out = raw.view(entry.bits_view).reshape(physical).transpose(list(inverse))
        out.flags.writeable = False
        return out

    def to_host(self, ptr: int, nbytes: int, ordinal: int) -> np.ndarray:
        """A private copy."""
        return np.array(np.asarray(_HostOwner(ptr, nbytes, None)), copy=True)


def _pad(raw: bytes) -> bytes:
    if len(raw) > IPC_HANDLE_SIZE:
        raise ValueError(f"handle of {len(raw)} bytes exceeds {IPC_HANDLE_SIZE}")
    return raw.ljust(IPC_HANDLE_SIZE, b"\0")


# --------------------------------------------------------------------------------------------
# The real CUDA stack. Nothing below runs on a machine without a GPU.


class _IpcHandle(ctypes.Structure):
    """``cudaIpcMemHandle_t`` / ``cudaIpcEventHandle_t``: 64 opaque bytes, passed by value."""

    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_SIZE)]


class _Cudart:
    """The few CUDA runtime/driver entry points no framework exposes, through ctypes."""

    _instance: _Cudart | None = None

    def __init__(self) -> None:
        self.rt = _load(("libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0", "libcudart.so"))
        self.drv = _load(("libcuda.so.1", "libcuda.so"))

    @classmethod
    def get(cls) -> _Cudart:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            self.rt.cudaGetErrorString.restype = ctypes.c_char_p
            msg = self.rt.cudaGetErrorString(code).decode()
            raise CudaUnavailableError(f"{what} failed with CUDA error {code}: {msg}")

    def set_device(self, ordinal: int) -> None:
        self._check(self.rt.cudaSetDevice(ctypes.c_int(ordinal)), "cudaSetDevice")

    def ipc_open(self, handle: bytes) -> int:
        ptr = ctypes.c_void_p()
        raw = _IpcHandle.from_buffer_copy(handle)
        # cudaIpcMemLazyEnablePeerAccess = 1
        self._check(
            self.rt.cudaIpcOpenMemHandle(ctypes.byref(ptr), raw, ctypes.c_uint(1)),
            "cudaIpcOpenMemHandle",
        )
        return int(ptr.value or 0)

    def ipc_close(self, ptr: int) -> None:
        self._check(self.rt.cudaIpcCloseMemHandle(ctypes.c_void_p(ptr)), "cudaIpcCloseMemHandle")

    def device_count(self) -> int:
        count = ctypes.c_int()
        self._check(self.rt.cudaGetDeviceCount(ctypes.byref(count)), "cudaGetDeviceCount")
        return count.value

    def device(self, ordinal: int) -> DeviceId:
        """UUID (driver ``cuDeviceGetUuid``) and PCI bus id of runtime device ``ordinal``."""
        dev = ctypes.c_int()
        if self.drv.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(ordinal)) != 0:
            raise CudaUnavailableError(f"no CUDA device {ordinal}")
        raw = (ctypes.c_ubyte * 16)()
        if self.drv.cuDeviceGetUuid(raw, dev) != 0:
            raise CudaUnavailableError(f"cuDeviceGetUuid failed for device {ordinal}")
        h = bytes(raw).hex()
        uuid = f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        pci = ctypes.create_string_buffer(32)
        self._check(
            self.rt.cudaDeviceGetPCIBusId(pci, ctypes.c_int(32), ctypes.c_int(ordinal)),
            "cudaDeviceGetPCIBusId",
        )
        return DeviceId(uuid, pci.value.decode().lower(), ordinal)

    def ipc_get(self, base: int) -> bytes:
        raw = _IpcHandle()
        self._check(
            self.rt.cudaIpcGetMemHandle(ctypes.byref(raw), ctypes.c_void_p(base)),
            "cudaIpcGetMemHandle",
        )
        return ctypes.string_at(ctypes.addressof(raw), IPC_HANDLE_SIZE)

    def event_synchronize(self, event: bytes) -> None:
        ev = ctypes.c_void_p()
        raw = _IpcHandle.from_buffer_copy(event)
        self._check(self.rt.cudaIpcOpenEventHandle(ctypes.byref(ev), raw), "cudaIpcOpenEventHandle")
        try:
            self._check(self.rt.cudaEventSynchronize(ev), "cudaEventSynchronize")
        finally:
            self.rt.cudaEventDestroy(ev)

    def address_range(self, ptr: int) -> tuple[int, int]:
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        code = self.drv.cuMemGetAddressRange_v2(
            ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)
        )
        if code != 0:
            raise CudaUnavailableError(f"cuMemGetAddressRange failed with CUresult {code}")
        return int(base.value), int(size.value)


def _load(names: Sequence[str]) -> ctypes.CDLL:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise CudaUnavailableError(f"none of {list(names)} could be loaded: no CUDA runtime here")


class _CaiOwner:
    """``__cuda_array_interface__`` over bytes whose life ``owner`` controls.

    torch and cupy keep this object referenced for as long as any tensor or view built on it
    lives, so a ``weakref.finalize`` on ``owner`` fires exactly after the last one is freed.
    """

    def __init__(self, ptr: int, nbytes: int, owner: object) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {
            "data": (ptr, False),
            "shape": (nbytes,),
            "typestr": "|u1",
            "version": 2,
        }


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
        """Through PyTorch's own IPC sharing (block base, offset, interprocess event)."""
        storage = x.untyped_storage()
        try:
            (_dev, handle, _size, storage_offset, rc_handle, rc_offset, event, sync) = (
                storage._share_cuda_()
            )
        except RuntimeError as exc:
            raise CudaUnavailableError(
                f"PyTorch cannot share this CUDA memory over legacy IPC ({exc}); "
                f"memory received from another process must be cloned before re-sending"
            ) from exc
        if not isinstance(handle, bytes) or len(handle) != IPC_HANDLE_SIZE:
            raise CudaUnavailableError(
                "this allocation has no legacy CUDA IPC handle (PyTorch expandable segments "
                "or another VMM allocator); use the host path"
            )
        ordinal = x.device.index
        _base, size = _Cudart.get().address_range(x.data_ptr())
        offset = storage_offset + x.storage_offset() * x.element_size()
        release_counter = self.torch.UntypedStorage._release_ipc_counter

        def on_release() -> None:
            # _share_cuda_ set PyTorch's own counter to 1 and parked the block in its limbo;
            # our receivers never touch that counter, so the producer returns it here.
            release_counter(rc_handle, rc_offset, device=ordinal)

        return Export(
            handle,
            offset,
            size,
            event if sync else NO_EVENT,
            self._device(ordinal),
            keepalive=x,
            on_release=on_release,
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
        """``cudaIpcOpenMemHandle`` after making sure CUDA is initialised on ``ordinal``."""
        self.torch.cuda.init()
        with self.torch.cuda.device(ordinal):
            rt = _Cudart.get()
            ptr = rt.ipc_open(handle)
            return rt.address_range(ptr)

    def close_handle(self, base: int, ordinal: int) -> None:
        """``cudaIpcCloseMemHandle``."""
        with self.torch.cuda.device(ordinal):
            _Cudart.get().ipc_close(base)

    def wait_event(self, event: bytes, ordinal: int) -> None:
        """``torch.cuda.Event.from_ipc_handle`` waited on by the current stream."""
        device = self.torch.device("cuda", ordinal)
        ev = self.torch.cuda.Event.from_ipc_handle(device, event)
        ev.wait(self.torch.cuda.current_stream(device))

    def synchronize(self, ordinal: int) -> None:
        """Current stream idle: nothing of ours still reads the producer's memory."""
        self.torch.cuda.current_stream(ordinal).synchronize()

    def build(
        self,
        framework: str,
        ptr: int,
        nbytes: int,
        owner: object,
        entry: _dtypes.DType,
        physical: tuple[int, ...],
        inverse: Sequence[int],
        ordinal: int,
    ) -> Any:
        """A torch (or cupy) array over the mapped bytes, reinterpreted via a byte view."""
        if framework == "cupy":
            return CupyCudaBackend().build(
                framework, ptr, nbytes, owner, entry, physical, inverse, ordinal
            )
        torch = self.torch
        dtype = _dtypes.torch_dtype(entry)
        # torch increfs the __cuda_array_interface__ object and decrefs it in the storage's
        # deleter, so ``owner`` lives exactly as long as the last view (no copy: same device).
        with torch.cuda.device(ordinal):
            raw = torch.as_tensor(_CaiOwner(ptr, nbytes, owner), device=f"cuda:{ordinal}")
        return raw.view(dtype).view(physical).permute(list(inverse))

    def to_host(self, ptr: int, nbytes: int, ordinal: int) -> np.ndarray:
        """Device-to-host copy."""
        with self.torch.cuda.device(ordinal):
            raw = self.torch.as_tensor(_CaiOwner(ptr, nbytes, None), device=f"cuda:{ordinal}")
            return raw.cpu().numpy()


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
            base, size = _Cudart.get().address_range(low)
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
            return _Cudart.get().address_range(ptr)

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

    def build(
        self,
        framework: str,
        ptr: int,
        nbytes: int,
        owner: object,
        entry: _dtypes.DType,
        physical: tuple[int, ...],
        inverse: Sequence[int],
        ordinal: int,
    ) -> Any:
        """A cupy array over the mapped bytes (``UnownedMemory`` keeps ``owner`` alive)."""
        if framework == "torch":
            return TorchCudaBackend().build(
                framework, ptr, nbytes, owner, entry, physical, inverse, ordinal
            )
        if entry.numpy is None:
            raise UnsupportedTensorError(f"cupy has no dtype {entry.name}; decode it with torch")
        cp = self.cupy
        mem = cp.cuda.UnownedMemory(ptr, nbytes, owner, ordinal)
        flat = cp.ndarray((nbytes,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))
        return flat.view(entry.numpy_dtype).reshape(physical).transpose(list(inverse))

    def to_host(self, ptr: int, nbytes: int, ordinal: int) -> np.ndarray:
        """Device-to-host copy."""
        out = np.empty(nbytes, dtype=np.uint8)
        with self.cupy.cuda.Device(ordinal):
            self.rt.memcpy(out.ctypes.data, ptr, nbytes, self.rt.memcpyDeviceToHost)
        return out


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
        self.rt = _Cudart.get()

    def info(self, x: Any) -> ArrayInfo:
        """A CudaBuffer is a 1-D uint8 array."""
        return ArrayInfo(_dtypes.BY_NAME["uint8"], (x.size,), (1,), "pyarrow.cuda")

    def compact(self, x: Any, perm: Sequence[int]) -> Any:
        """A CudaBuffer is always dense."""
        return x

    def export(self, x: Any) -> Export:
        """Base and size from the driver, handle of the base, offset of the buffer in it."""
        ordinal = x.context.device_number
        self.rt.set_device(ordinal)
        base, size = self.rt.address_range(x.address)
        x.context.synchronize()
        return Export(
            self.rt.ipc_get(base), x.address - base, size, NO_EVENT, self.rt.device(ordinal), x
        )

    def local_device(self, uuid: str, pci_bus_id: str) -> int | None:
        """Match by UUID first, PCI bus id second."""
        devices = [self.rt.device(i) for i in range(self.rt.device_count())]
        for dev in devices:
            if dev.uuid == uuid or (pci_bus_id and dev.pci_bus_id == pci_bus_id.lower()):
                return dev.ordinal
        return None

    def open_handle(self, handle: bytes, ordinal: int) -> tuple[int, int]:
        """``cudaIpcOpenMemHandle``."""
        self.rt.set_device(ordinal)
        return self.rt.address_range(self.rt.ipc_open(handle))

    def close_handle(self, base: int, ordinal: int) -> None:
        """``cudaIpcCloseMemHandle``."""
        self.rt.set_device(ordinal)
        self.rt.ipc_close(base)

    def wait_event(self, event: bytes, ordinal: int) -> None:
        """Arrow has no streams: block the host until the producer's event completed."""
        self.rt.set_device(ordinal)
        self.rt.event_synchronize(event)

    def synchronize(self, ordinal: int) -> None:
        """Arrow's copies are synchronous: nothing to wait for."""

    def build(
        self,
        framework: str,
        ptr: int,
        nbytes: int,
        owner: object,
        entry: _dtypes.DType,
        physical: tuple[int, ...],
        inverse: Sequence[int],
        ordinal: int,
    ) -> Any:
        """A ``CudaBuffer`` over the tensor's bytes (dense, in its dimension order)."""
        return self.pacuda.Context(ordinal).foreign_buffer(ptr, nbytes, base=owner)

    def to_host(self, ptr: int, nbytes: int, ordinal: int) -> np.ndarray:
        """Device-to-host copy."""
        buf = self.pacuda.Context(ordinal).foreign_buffer(ptr, nbytes)
        return np.frombuffer(buf.copy_to_host(), dtype=np.uint8).copy()


# --------------------------------------------------------------------------------------------
# Which backend, for which value.

_STANDIN: list[HostStandIn] = []


def standin() -> HostStandIn:
    """The process-wide host stand-in (created on first use)."""
    if not _STANDIN:
        _STANDIN.append(HostStandIn())
    return _STANDIN[0]


def sweep_standin() -> list[str]:
    """Unlink stand-in blocks whose creating process is gone (after a SIGKILL in a test)."""
    from ._slots import pid_alive

    removed = []
    for name in os.listdir("/dev/shm"):
        if not name.startswith(STANDIN_PREFIX):
            continue
        pid = name[len(STANDIN_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{name}")
            removed.append(name)
    return removed


def _close_standin() -> None:
    for device in _STANDIN:
        device.allocator.close()


# Registered at import, before _cuda_ipc registers its own exit hook, so it runs after it:
# in-flight stand-in memory stays until receivers released it or the linger ran out.
atexit.register(_close_standin)


def is_device_array(x: object) -> bool:
    """True for what the CUDA transport encodes: torch CUDA tensors, cupy arrays, stand-ins.

    Checked without importing any framework that is not already imported.
    """
    if isinstance(x, StandInArray):
        return True
    if sys.modules.get("torch") is not None and isinstance(x, sys.modules["torch"].Tensor):
        return x.device.type == "cuda"
    if sys.modules.get("cupy") is not None and isinstance(x, sys.modules["cupy"].ndarray):
        return True
    return _is_cuda_buffer(x)


def _is_cuda_buffer(x: object) -> bool:
    module = sys.modules.get("pyarrow.cuda")
    return module is not None and isinstance(x, module.CudaBuffer)


def backend_for_array(x: object) -> CudaBackend:
    """The backend that exports ``x``."""
    if isinstance(x, StandInArray):
        return standin()
    if _is_cuda_buffer(x):
        return PyarrowCudaBackend()
    if sys.modules.get("torch") is not None and isinstance(x, sys.modules["torch"].Tensor):
        return TorchCudaBackend()
    return CupyCudaBackend()


def backend_for_receiver(name: str, framework: str) -> CudaBackend:
    """The backend that opens a descriptor written by backend ``name`` for ``framework``.

    A ``pyarrow.cuda`` message is rebuilt as a ``CudaBuffer`` where pyarrow has CUDA, else
    as a 1-D uint8 torch tensor of the same bytes.
    """
    if name == "standin":
        return standin()
    try:
        if framework == "pyarrow.cuda" and pyarrow_cuda() is not None:
            return PyarrowCudaBackend()
        if framework == "cupy":
            return CupyCudaBackend()
        return TorchCudaBackend()
    except ImportError as exc:
        raise CudaUnavailableError(
            f"this message holds CUDA memory ({framework}) but {exc.name} is not installed "
            f"here; send through the host path (ARROW_TENSOR_TRANSPORT=host on the producer)"
        ) from exc


def pyarrow_cuda() -> Any | None:
    """``pyarrow.cuda`` where pyarrow is built with CUDA (conda-forge), else None.

    PyPI wheels of pyarrow are built without CUDA: ``import pyarrow.cuda`` raises there.
    """
    try:
        import pyarrow.cuda as pacuda
    except ImportError:
        return None
    return pacuda
