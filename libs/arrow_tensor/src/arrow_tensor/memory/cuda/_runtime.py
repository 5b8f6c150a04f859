"""The CUDA driver API entry points legacy IPC needs that no framework exposes, via ctypes.

Note [The driver API, not a second runtime]
Opening an IPC handle, closing it and asking which allocation a pointer lies in go to the
CUDA *driver* (``libcuda.so.1``, one per machine, the one every runtime sits on), never to
a ``libcudart`` of our choosing: a process whose torch ships CUDA 13 would otherwise load a
second runtime beside it, and a CuPy-only process may have none under the name we guess.
Driver calls also leave the runtime's sticky "last error" alone, so a refused call of ours
never resurfaces as an error of an unrelated kernel in torch. Every call runs with the
primary context of the device it is about current (the context torch, CuPy and the
runtime use for that device), pushed for the call and popped after, so a pointer of
device 1 is never looked up under device 0. A failed call raises ``CudaUnavailableError``
with the driver's name and text for the error.

Nothing here runs on a machine without a GPU; nothing is loaded until a backend asks.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from ..._errors import CudaUnavailableError
from ._device import IPC_HANDLE_SIZE, DeviceId

CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1


class _IpcHandle(ctypes.Structure):
    """``CUipcMemHandle`` / ``CUipcEventHandle``: 64 opaque bytes, passed by value."""

    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_SIZE)]


class Runtime:
    """The driver calls of legacy CUDA IPC (see Note [The driver API, not a second runtime]).

    ``lib`` is the loaded driver library (tests pass a stand-in with the same functions).
    """

    _instance: Runtime | None = None
    _lock = threading.Lock()

    def __init__(self, lib: Any = None) -> None:
        self.lib = lib if lib is not None else _load(("libcuda.so.1", "libcuda.so"))
        self._contexts: dict[int, tuple[Any, Any]] = {}
        self._check(self.lib.cuInit(ctypes.c_uint(0)), "cuInit")

    @classmethod
    def get(cls) -> Runtime:
        """The process's driver, loaded on first use."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _check(self, code: int, what: str) -> None:
        if code == 0:
            return
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        with contextlib.suppress(Exception):
            self.lib.cuGetErrorName(code, ctypes.byref(name))
            self.lib.cuGetErrorString(code, ctypes.byref(text))
        label = (name.value or b"CUDA_ERROR").decode(errors="replace")
        detail = (text.value or b"").decode(errors="replace")
        raise CudaUnavailableError(f"{what} failed: {label} ({code}) {detail}".rstrip())

    @contextlib.contextmanager
    def context(self, ordinal: int) -> Iterator[None]:
        """Device ``ordinal``'s primary context, current for the duration of the block."""
        ctx = self._primary(ordinal)
        self._check(self.lib.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
        try:
            yield
        finally:
            popped = ctypes.c_void_p()
            self.lib.cuCtxPopCurrent_v2(ctypes.byref(popped))

    def _primary(self, ordinal: int) -> Any:
        found = self._contexts.get(ordinal)
        if found is None:
            dev = ctypes.c_int()
            self._check(
                self.lib.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(ordinal)), "cuDeviceGet"
            )
            ctx = ctypes.c_void_p()
            self._check(
                self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev),
                "cuDevicePrimaryCtxRetain",
            )
            found = self._contexts[ordinal] = (ctx, dev)  # retained for the process's life
        return found[0]

    def open_range(self, handle: bytes, ordinal: int) -> tuple[int, int]:
        """``ipc_open`` and the (base, size) of what it mapped; closed again if that fails."""
        ptr = self.ipc_open(handle, ordinal)
        try:
            return self.address_range(ptr, ordinal)
        except BaseException:
            with contextlib.suppress(Exception):
                self.ipc_close(ptr, ordinal)
            raise

    def ipc_open(self, handle: bytes, ordinal: int) -> int:
        """``cuIpcOpenMemHandle``: the base address of the allocation ``handle`` names."""
        ptr = ctypes.c_uint64()
        raw = _IpcHandle.from_buffer_copy(handle)
        with self.context(ordinal):
            self._check(
                self.lib.cuIpcOpenMemHandle_v2(
                    ctypes.byref(ptr), raw, ctypes.c_uint(CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
                ),
                "cuIpcOpenMemHandle",
            )
        return int(ptr.value)

    def ipc_close(self, ptr: int, ordinal: int) -> None:
        """``cuIpcCloseMemHandle`` of an address ``ipc_open`` returned."""
        with self.context(ordinal):
            self._check(self.lib.cuIpcCloseMemHandle(ctypes.c_uint64(ptr)), "cuIpcCloseMemHandle")

    def ipc_get(self, base: int, ordinal: int) -> bytes:
        """``cuIpcGetMemHandle`` of the allocation starting at ``base``."""
        raw = _IpcHandle()
        with self.context(ordinal):
            self._check(
                self.lib.cuIpcGetMemHandle(ctypes.byref(raw), ctypes.c_uint64(base)),
                "cuIpcGetMemHandle",
            )
        return ctypes.string_at(ctypes.addressof(raw), IPC_HANDLE_SIZE)

    def address_range(self, ptr: int, ordinal: int) -> tuple[int, int]:
        """(base, size) of the allocation holding ``ptr`` on device ``ordinal``."""
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        with self.context(ordinal):
            self._check(
                self.lib.cuMemGetAddressRange_v2(
                    ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)
                ),
                "cuMemGetAddressRange",
            )
        return int(base.value), int(size.value)

    def event_synchronize(self, event: bytes, ordinal: int) -> None:
        """Block the host until the interprocess event ``event`` completed."""
        ev = ctypes.c_void_p()
        raw = _IpcHandle.from_buffer_copy(event)
        with self.context(ordinal):
            self._check(
                self.lib.cuIpcOpenEventHandle(ctypes.byref(ev), raw), "cuIpcOpenEventHandle"
            )
            try:
                self._check(self.lib.cuEventSynchronize(ev), "cuEventSynchronize")
            finally:
                self.lib.cuEventDestroy_v2(ev)

    def device_count(self) -> int:
        """Devices visible to this process."""
        count = ctypes.c_int()
        self._check(self.lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        return count.value

    def device(self, ordinal: int) -> DeviceId:
        """UUID and PCI bus id of device ``ordinal``."""
        dev = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(ordinal)), "cuDeviceGet")
        raw = (ctypes.c_ubyte * 16)()
        # _v2 (CUDA 11.4+) names a MIG instance as the runtime does; v1 its parent GPU.
        get_uuid = getattr(self.lib, "cuDeviceGetUuid_v2", None) or self.lib.cuDeviceGetUuid
        self._check(get_uuid(raw, dev), "cuDeviceGetUuid")
        h = bytes(raw).hex()
        uuid = f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        pci = ctypes.create_string_buffer(32)
        self._check(self.lib.cuDeviceGetPCIBusId(pci, ctypes.c_int(32), dev), "cuDeviceGetPCIBusId")
        return DeviceId(uuid, pci.value.decode().lower(), ordinal)


def _load(names: Sequence[str]) -> ctypes.CDLL:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise CudaUnavailableError(f"none of {list(names)} could be loaded: no CUDA driver here")


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
