"""The host stand-in of a GPU: real cross-process memory in /dev/shm, no CUDA.

A ``CudaBackend`` (``_device``) whose "device memory" is owner-only shared-memory blocks
that several arrays share, as PyTorch's caching allocator packs small tensors into one
``cudaMalloc`` block. Its handles open in another process for real, so the whole CUDA
transport above it is tested on CPU, across processes too. It is a test double: messages
it writes say so (``at.cuda.backend = "standin"``) and a real receiver never opens them as
GPU memory.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import mmap
import os
import secrets
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..._errors import CudaUnavailableError, UnsupportedTensorError
from ...codec import _dtypes
from ...codec._schema import TensorHeader
from .._slots import pid_alive
from ._device import IPC_HANDLE_SIZE, ArrayInfo, DeviceId, DeviceSpan, Export

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

    def __init__(self, view: np.ndarray, block: _Block, storage: tuple[int, int]) -> None:
        self.view = view
        self.block = block
        self.storage = storage
        """(offset in the block, bytes) of the allocation this array views: its storage."""

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
        return StandInArray(self.view[(*np.index_exp[key], Ellipsis)], self.block, self.storage)

    def transpose(self, *axes: int) -> StandInArray:
        """A permuted view, no copy."""
        return StandInArray(self.view.transpose(*axes), self.block, self.storage)

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
        return StandInArray(raw.view(dt).reshape(tuple(shape)), block, (start, nbytes))

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
    """``CudaBackend`` over host shared memory; counts opens, closes, waits and exports."""

    name = "standin"
    ipc_problem: str | None = None
    """Set by tests to play a device without legacy IPC (e.g. integrated GPUs)."""

    def __init__(self, allocator: StandInAllocator | None = None) -> None:
        self.allocator = allocator or StandInAllocator()
        self.device = DeviceId(STANDIN_UUID, "0000:00:00.0", 0)
        self.opened: dict[int, mmap.mmap] = {}
        self.opens = 0
        self.closes = 0
        self.waited: list[bytes] = []
        self._events = itertools.count(1)
        self.exports = 0
        """Exports whose memory is still kept for receivers (``on_release`` not yet run)."""
        self.ipc_refusal: str | None = None
        """Set by tests to play memory ``cuIpcGetMemHandle`` refuses (expandable segments,
        ``cudaMallocAsync`` pools): the export then raises ``CudaUnavailableError``."""

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

    def address_range(self, ptr: int) -> tuple[int, int]:
        """(base, size) of the block holding ``ptr`` (``cuMemGetAddressRange``)."""
        for block in self.allocator.blocks:
            base = block.array.ctypes.data
            if base <= ptr < base + block.size:
                return base, block.size
        raise CudaUnavailableError(f"{ptr:#x} lies in no stand-in block")

    def ipc_get(self, base: int) -> bytes:
        """``cuIpcGetMemHandle`` of the block at ``base``: its name, padded to 64 bytes."""
        if self.ipc_refusal is not None:
            raise CudaUnavailableError(f"cuIpcGetMemHandle failed: {self.ipc_refusal}")
        for block in self.allocator.blocks:
            if block.array.ctypes.data == base:
                return _pad(block.name.encode())
        raise CudaUnavailableError(f"cuIpcGetMemHandle failed: {base:#x} starts no block")

    def export(self, x: Any) -> Export:
        """As the real backends do: the block's handle, the first byte's offset in it."""
        view = x.view
        low = view.__array_interface__["data"][0] + sum(
            (n - 1) * s for n, s in zip(view.shape, view.strides, strict=True) if s < 0 and n
        )
        base, size = self.address_range(low)
        handle = self.ipc_get(base)
        token = next(self._events).to_bytes(8, "little")
        self.exports += 1

        def release() -> None:
            self.exports -= 1

        return Export(
            handle,
            low - base,
            size,
            _pad(b"standin-event" + token),
            self.device,
            keepalive=x,
            on_release=release,
        )

    def local_device(self, uuid: str, pci_bus_id: str) -> int | None:
        """Only the stand-in device exists."""
        return 0 if uuid == STANDIN_UUID else None

    def open_handle(self, handle: bytes, ordinal: int) -> tuple[int, int]:
        """Map a block read-only by name, after checking the name is one of ours."""
        if len(handle) != IPC_HANDLE_SIZE:
            raise CudaUnavailableError(f"a legacy IPC handle is 64 bytes, got {len(handle)}")
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

    def build(self, span: DeviceSpan, header: TensorHeader) -> np.ndarray:
        """A read-only numpy view whose base chain keeps ``owner`` alive."""
        raw = np.asarray(_HostOwner(span.ptr, span.nbytes, span.owner))
        out = raw.view(header.dtype.bits_view).reshape(header.physical_shape)
        out = out.transpose(header.inverse_perm)
        out.flags.writeable = False
        return out

    def to_host(self, ptr: int, nbytes: int, ordinal: int) -> np.ndarray:
        """A private copy."""
        return np.array(np.asarray(_HostOwner(ptr, nbytes, None)), copy=True)


def _pad(raw: bytes) -> bytes:
    if len(raw) > IPC_HANDLE_SIZE:
        raise ValueError(f"handle of {len(raw)} bytes exceeds {IPC_HANDLE_SIZE}")
    return raw.ljust(IPC_HANDLE_SIZE, b"\0")


_STANDIN: list[HostStandIn] = []


def standin() -> HostStandIn:
    """The process-wide host stand-in (created on first use)."""
    if not _STANDIN:
        _STANDIN.append(HostStandIn())
    return _STANDIN[0]


def sweep_standin() -> list[str]:
    """Unlink stand-in blocks whose creating process is gone (after a SIGKILL in a test)."""
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


# Registered at import, before ``_ipc`` registers its own exit hook (``_ipc`` imports this
# module), so it runs after it: in-flight stand-in memory stays until receivers released it
# or the linger ran out.
atexit.register(_close_standin)
