"""The few CUDA runtime / driver entry points no framework exposes, through ctypes.

Nothing here runs on a machine without a GPU; nothing is loaded until a backend asks.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from ..._errors import CudaUnavailableError
from ._device import IPC_HANDLE_SIZE, DeviceId


class _IpcHandle(ctypes.Structure):
    """``cudaIpcMemHandle_t`` / ``cudaIpcEventHandle_t``: 64 opaque bytes, passed by value."""

    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_SIZE)]


class Runtime:
    """The few CUDA runtime/driver entry points no framework exposes, through ctypes."""

    _instance: Runtime | None = None

    def __init__(self) -> None:
        self.rt = _load(("libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0", "libcudart.so"))
        self.drv = _load(("libcuda.so.1", "libcuda.so"))

    @classmethod
    def get(cls) -> Runtime:
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


class CaiOwner:
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
