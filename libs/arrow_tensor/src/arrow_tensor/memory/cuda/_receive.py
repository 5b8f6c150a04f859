"""The receiving side of CUDA IPC: descriptors opened into zero-copy device tensors.

See Note [CUDA IPC descriptors] in this package's ``__init__``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from ..._errors import CudaUnavailableError, MetadataError, PayloadError, StaleHandleError
from ...codec import _checksum, _schema
from ...codec._tensor import view_tensor
from .._blocks import (
    KIND_CUDA,
    MappedBlock,
    dropped_blocks,
    gone_message,
    identity_or_standalone,
    notices,
)
from .._slots import ReceiverSlots, pid_running
from . import _handles
from ._descriptor import parse_descriptor
from ._device import CudaBackend, DeviceSpan
from ._select import backend_for_receiver

_mapped: dict[str, MappedBlock] = {}
_mapped_lock = threading.Lock()


def _mapped_block(name: str) -> MappedBlock:
    for dropped in dropped_blocks():  # producers that died, as the crash notices report
        if dropped in _mapped:
            _mapped[dropped].gone = True
    with _mapped_lock:
        mapped = _mapped.get(name)
        if mapped is None:
            mapped = _mapped[name] = MappedBlock(
                name,
                identity_or_standalone(),
                kind=KIND_CUDA,
                what=repr(_schema.KEY_CUDA_BLOCK),
                anonymous_ok=True,
            )
            notices().watch(name)
        return mapped


def forget_blocks() -> None:
    """Drop this process's cache of mapped control blocks (tests)."""
    with _mapped_lock:
        _mapped.clear()


class _Hold:
    """Owner object of received device memory: its death releases handle and slot."""

    __slots__ = ("__weakref__",)


def _release(
    backend: CudaBackend,
    ordinal: int,
    uuid: str,
    handle: bytes,
    rx: ReceiverSlots | None,
    slot: int,
    generation: int,
) -> None:
    with contextlib.suppress(Exception):  # finalizers must not raise (interpreter exit)
        backend.synchronize(ordinal)
    with contextlib.suppress(Exception):
        _handles.opened.release(backend.name, uuid, handle)
    if rx is not None:
        rx.release(slot, generation)


def decode_cuda(
    array: Any,
    meta: Mapping[str, Any],
    writable: bool = False,
    verify: bool = False,
    device: str | None = None,
) -> Any:
    """Open a CUDA descriptor as a zero-copy device tensor (or a copy where asked).

    Parameters
    ----------
    array, meta:
        What dora delivered; ``meta`` already passed ``_schema.check_envelope``.
    writable:
        ``True``: a private copy on the device (same layout); the producer's memory is
        released at once.
    verify:
        Check ``at.checksum`` (over a host copy).
    device:
        ``None``: where it is, zero-copy. ``"cpu"``: a host copy (numpy, or CPU torch for
        torch messages). ``"cuda"`` / ``"cuda:N"``: on that device of this process, zero
        copy when it is the producer's device, else one device-to-device copy.

    Raises
    ------
    MetadataError, PayloadError
        Malformed descriptors (handle length, bounds, device name, control block name).
    CudaUnavailableError
        No CUDA framework here, or the producer's device is not visible to this process.
    StaleHandleError
        The producer is gone or the slot was reclaimed (the message was read too late).
    """
    desc = parse_descriptor(array, meta)
    header = desc.header
    backend = backend_for_receiver(desc.backend, header.framework)
    target = _parse_device(device)
    ordinal = backend.local_device(desc.device_uuid, desc.pci_bus_id)
    if header.nbytes == 0:
        return _empty(header, target, 0 if ordinal is None else ordinal, backend)
    if ordinal is None:
        raise CudaUnavailableError(
            f"the producer's device {desc.device_uuid} (PCI {desc.pci_bus_id or '?'}) is not "
            f"visible to this process (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); send through the host "
            f"path (ARROW_TENSOR_TRANSPORT=host)"
        )
    if desc.backend == "cuda" and desc.block.split("-")[2] == str(os.getpid()):
        raise CudaUnavailableError(
            "this process exported the CUDA memory of this message, and CUDA does not let "
            "a process open its own IPC handles: decode it in the receiving process"
        )
    mapped = _mapped_block(desc.block)
    if mapped.stale:
        raise StaleHandleError(gone_message(desc.block, mapped.producer_pid))
    if desc.slot >= mapped.block.n_slots:
        raise MetadataError(
            f"{_schema.KEY_CUDA_SLOT!r} {desc.slot} outside the {mapped.block.n_slots} slots "
            f"of {desc.block}"
        )
    mapped.rx.take(desc.slot, desc.generation, desc.seq)
    try:
        opened = _handles.opened.acquire(backend, desc.device_uuid, desc.handle, ordinal)
    except CudaUnavailableError:
        mapped.rx.release(desc.slot, desc.generation)
        if not pid_running(mapped.producer_pid):  # exited (a zombie answers kill(pid, 0))
            raise StaleHandleError(gone_message(desc.block, mapped.producer_pid)) from None
        raise
    except BaseException:
        mapped.rx.release(desc.slot, desc.generation)
        raise
    hold = _Hold()
    weakref.finalize(
        hold,
        _release,
        backend,
        ordinal,
        desc.device_uuid,
        desc.handle,
        mapped.rx,
        desc.slot,
        desc.generation,
    )
    if desc.offset + header.nbytes > opened.size:
        raise PayloadError(
            f"the tensor's bytes [{desc.offset}, {desc.offset + header.nbytes}) lie outside "
            f"the {opened.size}-byte allocation the handle opened (the message claims "
            f"{desc.alloc_size})"
        )
    if desc.event is not None:
        backend.wait_event(desc.event, ordinal)
    ptr = opened.base + desc.offset
    host = None
    if verify or target == "cpu":
        host = backend.to_host(ptr, header.nbytes, ordinal)
    if verify:
        _checksum.verify(meta.get(_schema.KEY_CHECKSUM), header.describe(), host)
    if target == "cpu":
        del hold  # the copy is private: the producer's memory is released now
        return _host_tensor(header, host)
    tensor = backend.build(DeviceSpan(ptr, header.nbytes, ordinal, hold), header)
    del hold  # from here on, only the tensor (and its views) keep the memory
    if target is not None and target != ordinal:
        return _to_device(tensor, target)
    if writable:
        return _private_copy(tensor)
    return tensor


def decode_on_device(
    decoder: Any, array: Any, meta: Mapping[str, Any], writable: bool, verify: bool, device: str
) -> Any:
    """``decode(..., device=...)`` for any message kind.

    CUDA descriptors are mapped (or copied) by ``decode_cuda``; host messages are decoded
    as usual and, for a CUDA ``device``, their tensor leaves are copied onto it.
    """
    target = _parse_device(device)
    if decoder is decode_cuda:
        return decode_cuda(array, meta, writable=writable, verify=verify, device=device)
    value = decoder(array, meta, writable=writable, verify=verify)
    return value if target == "cpu" else _map_tensors(value, target)


def _map_tensors(value: Any, ordinal: Any) -> Any:
    if isinstance(value, dict):
        return {k: _map_tensors(v, ordinal) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, ordinal) for v in value)
    if isinstance(value, np.ndarray) or hasattr(value, "is_cuda"):
        return move_to_device(value, ordinal)
    return value


def _parse_device(device: str | None) -> str | int | None:
    """None, "cpu" or a device ordinal (``"cuda"``: this process's current device)."""
    if device is None or device == "cpu":
        return device
    if isinstance(device, str):
        match = re.fullmatch(r"cuda(?::(\d{1,3}))?", device)
        if match:
            return int(match.group(1)) if match.group(1) else current_device()
    raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def current_device() -> int:
    """The CUDA device torch (else CuPy) makes current in this process; 0 without either."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return int(torch.cuda.current_device())
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        with contextlib.suppress(Exception):
            return int(cupy.cuda.runtime.getDevice())
    return 0


def _host_tensor(header: _schema.TensorHeader, host: np.ndarray) -> Any:
    framework = "torch" if header.framework == "torch" else "numpy"
    host_header = _schema.TensorHeader(header.dtype, header.shape, header.perm, framework)
    return view_tensor(host_header, pa.py_buffer(host), writable=True)


def move_to_device(value: Any, ordinal: int) -> Any:
    """A host tensor (or a device tensor elsewhere) as a tensor on CUDA device ``ordinal``."""
    if sys.modules.get("torch") is not None and isinstance(value, sys.modules["torch"].Tensor):
        if not sys.modules["torch"].cuda.is_available():
            raise CudaUnavailableError(
                f"device='cuda:{ordinal}' was asked for but torch sees no CUDA device here"
            )
        return value.to(f"cuda:{ordinal}")
    try:
        import cupy
    except ImportError as exc:
        raise CudaUnavailableError(
            "a numpy result was asked for on a CUDA device but cupy is not installed"
        ) from exc
    with cupy.cuda.Device(ordinal):
        return cupy.asarray(value)


def _to_device(tensor: Any, ordinal: int) -> Any:
    if isinstance(tensor, np.ndarray):
        return move_to_device(tensor, ordinal)
    if hasattr(tensor, "to"):
        return tensor.to(f"cuda:{ordinal}")
    import cupy

    with cupy.cuda.Device(ordinal):
        return cupy.array(tensor, copy=True)


def _private_copy(tensor: Any) -> Any:
    if isinstance(tensor, np.ndarray):
        return np.array(tensor, order="K", copy=True)
    if hasattr(tensor, "clone"):
        import torch

        return tensor.clone(memory_format=torch.preserve_format)
    return tensor.copy(order="K")


def _empty(header: _schema.TensorHeader, target: Any, ordinal: int, backend: Any) -> Any:
    """A zero-size tensor has no memory and no handle: make one where it is wanted."""
    value = _host_tensor(header, np.empty(0, dtype=np.uint8))
    if target == "cpu" or backend.name == "standin":
        return value
    return move_to_device(value, ordinal if target is None else target)
