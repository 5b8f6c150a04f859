"""The allocations this process opened from other processes' handles, each exactly once.

See Note [CUDA IPC descriptors] in this package's ``__init__``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ._device import CudaBackend
from ._standin import StandInArray


@dataclass
class _Opened:
    base: int
    size: int
    refs: int
    ordinal: int
    backend: CudaBackend


class HandleCache:
    """Opened allocations of this process: each handle opened once, closed on last release.

    Opening the same handle twice in one process fails (CUDA allows one mapping per
    process), and closing it while a tensor still views it turns reads into faults, so
    every tensor built on a handle holds one reference and the last one closes it.
    """

    def __init__(self) -> None:
        self._open: dict[tuple[str, str, bytes], _Opened] = {}
        self._lock = threading.RLock()

    def acquire(self, backend: CudaBackend, uuid: str, handle: bytes, ordinal: int) -> _Opened:
        """The mapping of ``handle``, opening it on first use; one more reference."""
        key = (backend.name, uuid, handle)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                base, size = backend.open_handle(handle, ordinal)
                entry = self._open[key] = _Opened(base, size, 0, ordinal, backend)
            entry.refs += 1
            return entry

    def release(self, backend_name: str, uuid: str, handle: bytes) -> None:
        """One reference less; the last one closes the mapping."""
        key = (backend_name, uuid, handle)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs <= 0:
                del self._open[key]
                entry.backend.close_handle(entry.base, entry.ordinal)

    def contains(self, x: Any) -> bool:
        """True when ``x``'s memory lies in an allocation opened here (not ours to share)."""
        ptr = _data_ptr(x)
        if ptr is None:
            return False
        with self._lock:
            return any(e.base <= ptr < e.base + e.size for e in self._open.values())

    def __len__(self) -> int:
        return len(self._open)

    def refs(self) -> int:
        """Total references held (tensors alive on opened handles)."""
        with self._lock:
            return sum(e.refs for e in self._open.values())


def _data_ptr(x: Any) -> int | None:
    if isinstance(x, StandInArray):
        return None  # stand-in receivers build numpy arrays, never StandInArrays
    ptr = getattr(x, "data_ptr", None)
    if callable(ptr):
        return int(ptr())
    data = getattr(x, "data", None)
    return int(getattr(data, "ptr", 0)) or None


opened = HandleCache()
"""This process's opened allocations (receivers open here; producers ask ``contains``)."""
