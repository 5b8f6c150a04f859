"""The producing side of CUDA IPC: device arrays exported as descriptors, kept alive in slots.

See Note [CUDA IPC descriptors] in this package's ``__init__``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ... import config
from ..._errors import PoolExhaustedError, UnsupportedTensorError
from ...codec import _checksum, _layout, _schema
from .._blocks import ANONYMOUS, KIND_CUDA, ProducerBlock, identity_or_standalone, notices
from .._slots import Lease
from . import _handles
from ._descriptor import CudaDescriptor
from ._device import NO_EVENT, ArrayInfo, CudaBackend, Export
from ._pyarrow import pyarrow_cuda
from ._select import backend_for_array
from ._standin import STANDIN_UUID, StandInArray, standin

log = logging.getLogger("arrow_tensor.cuda")


class _InFlight(ProducerBlock):
    """The bounded table of what one producer shared with one set of receivers.

    A block file with a control block only (Note [Block files]): each slot stands for one
    export, referenced here until every receiver released it.
    """

    def __init__(self, receivers: Sequence[str], n_slots: int, lease_s: float) -> None:
        super().__init__(
            identity_or_standalone(),
            kind=KIND_CUDA,
            n_slots=n_slots,
            receivers=receivers,
            lease_s=lease_s,
        )
        self.receivers = tuple(receivers)
        self.exports: dict[int, Export] = {}
        self._lock = threading.Lock()
        notices().announce(self.name)

    def collect(self) -> None:
        """Drop the references of slots every receiver is done with."""
        self.slots.busy()  # advances slot states (releases, deaths, leases)
        with self._lock:
            for slot in [s for s in self.exports if self.slots.state_of(s)[0] == "free"]:
                _finish(self.exports.pop(slot))
        if not self.unlinked and self.all_mapped():
            self.unlink()  # every receiver holds a mapping: nothing can leak on a crash

    def share(self, export: Export, wait_s: float) -> tuple[int, int, int]:
        """Park ``export`` in a slot; returns (slot, generation, seq) for the message."""
        self.collect()
        lease = self.slots.try_acquire()
        if lease is None:
            deadline = time.monotonic() + wait_s
            while lease is None and time.monotonic() < deadline:
                time.sleep(0.0005)
                self.collect()
                lease = self.slots.try_acquire()
        if lease is None:
            raise PoolExhaustedError(
                f"all {self.block.n_slots} in-flight CUDA slots are still held by receivers "
                f"after {wait_s:g} s ({self.slots.describe()}); raise ARROW_TENSOR_CUDA_SLOTS "
                f"or release received tensors sooner"
            )
        with self._lock:
            old = self.exports.pop(lease.slot, None)
            if old is not None:
                _finish(old)
            self.exports[lease.slot] = export
        seq = self.slots.mark_sent(lease)
        return lease.slot, lease.generation, seq

    def withdraw(self, slot: int, generation: int) -> None:
        """A slot shared for a message that was never sent: nobody can hold it."""
        self.slots.unsend(Lease(slot, generation))
        with self._lock:
            export = self.exports.pop(slot, None)
        if export is not None:
            _finish(export)

    def held(self) -> int:
        """Slots whose memory is still referenced for receivers."""
        self.collect()
        return len(self.exports)

    def close_after(self, linger_s: float) -> None:
        """Wait up to ``linger_s`` for receivers, then drop every reference and unlink."""
        deadline = time.monotonic() + linger_s
        while self.held() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.exports:
            log.warning(
                "exiting with %d CUDA tensors still held by receivers of %s; their memory "
                "is freed with this process",
                len(self.exports),
                self.receivers,
            )
        with self._lock:
            for export in self.exports.values():
                _finish(export)
            self.exports.clear()
        self.close()


def _finish(export: Export) -> None:
    if export.on_release is not None:
        with contextlib.suppress(Exception):  # best effort: the process may be exiting
            export.on_release()
    export.keepalive = None


_tables: dict[tuple[str, ...], _InFlight] = {}
_tables_lock = threading.Lock()


def _table(receivers: Sequence[str]) -> _InFlight:
    key = tuple(receivers)
    with _tables_lock:
        table = _tables.get(key)
        if table is None:
            slots = config.setting("ARROW_TENSOR_CUDA_SLOTS", config.integer(1, 1024), 32)
            lease = config.setting("ARROW_TENSOR_CUDA_LEASE", config.duration, 5.0)
            table = _tables[key] = _InFlight(key, slots, lease)
        return table


def in_flight() -> int:
    """CUDA tensors this process still keeps alive for receivers (all outputs)."""
    return sum(t.held() for t in list(_tables.values()))


def close_all(linger_s: float | None = None) -> None:
    """Release every in-flight reference (at exit, after waiting for receivers)."""
    if linger_s is None:
        linger_s = config.setting("ARROW_TENSOR_CUDA_LINGER", config.duration, 2.0)
    with _tables_lock:
        tables = list(_tables.values())
        _tables.clear()
    for table in tables:
        table.close_after(linger_s)


atexit.register(close_all)


def _dense_source(backend: CudaBackend, x: Any) -> tuple[Any, ArrayInfo, list[int]]:
    """``x`` itself when dense (any dimension order), else one device copy; plus its order."""
    info = backend.info(x)
    perm = _layout.memory_order(info.shape, info.strides)
    foreign = _handles.opened.contains(x)
    if info.pending_math or foreign or not _layout.is_dense(info.shape, info.strides, perm):
        # Memory received from another process cannot be re-exported: copy it too.
        x = backend.compact(x, perm)
        info = backend.info(x)
    return x, info, perm


def encode_cuda(
    x: Any,
    *,
    receivers: Sequence[str] = (ANONYMOUS,),
    checksum: bool = False,
    wait_s: float | None = None,
) -> tuple[pa.Array, dict[str, Any]]:
    """Encode a device array as a CUDA IPC descriptor: no payload bytes leave the device.

    Parameters
    ----------
    x:
        A torch CUDA tensor, a CuPy array, a ``pyarrow.cuda.CudaBuffer`` or (tests) a
        ``_standin.StandInArray``.
    receivers:
        Node ids of every receiver of the message (the transport reads them from the
        dataflow descriptor). The default is one receiver outside dora (or one that does not know
        its id): a bare ``at.encode`` of a CUDA tensor is for exactly one reader.
    checksum:
        Attach ``at.checksum`` computed over a host copy of the bytes (a device-to-host
        copy: for debugging, not for speed).
    wait_s:
        How long to wait for a free in-flight slot (``ARROW_TENSOR_CUDA_WAIT``, default 1 s).

    Returns
    -------
    (array, metadata)
        ``array``: 128 uint8 bytes, the memory handle then the event handle (empty for a
        zero-size tensor). ``metadata``: the tensor header plus the ``at.cuda.*`` keys.

    Raises
    ------
    CudaUnavailableError
        The memory cannot be shared with legacy CUDA IPC (expandable segments, VMM).
    PoolExhaustedError
        Every in-flight slot is still held by receivers after ``wait_s``.
    UnsupportedTensorError
        Dtypes or layouts without a wire form.
    """
    backend = backend_for_array(x)
    if wait_s is None:
        wait_s = config.setting("ARROW_TENSOR_CUDA_WAIT", config.duration, 1.0)
    source, info, perm = _dense_source(backend, x)
    problem = _schema.unencodable(info.shape, info.entry.itemsize)
    if problem is not None:
        raise UnsupportedTensorError(problem)
    header = _schema.TensorHeader(info.entry, info.shape, tuple(perm), info.framework)
    if header.nbytes == 0:
        desc = CudaDescriptor(
            header, backend.name, b"", None, 0, 0, _empty_uuid(backend), "", "", 0, 0, 0
        )
        return desc.to_message()
    table = _table(receivers)  # before the export: from there on, every failure releases it
    export = backend.export(source)
    try:
        slot, generation, seq = table.share(export, wait_s)
    except BaseException:
        _finish(export)
        raise
    try:
        event = None if export.event == NO_EVENT else export.event
        desc = CudaDescriptor(
            header,
            backend.name,
            export.handle,
            event,
            export.offset,
            export.alloc_size,
            export.device.uuid,
            export.device.pci_bus_id,
            table.name,
            slot,
            generation,
            seq,
        )
        array, meta = desc.to_message()
        if checksum:
            host = _host_bytes(backend, source, header)
            meta[_schema.KEY_CHECKSUM] = _checksum.digest(header.describe(), host)
    except BaseException:
        table.withdraw(slot, generation)
        raise
    return array, meta


def withdraw(meta: Mapping[str, Any]) -> None:
    """Take back a descriptor ``encode_cuda`` made that was never sent (the send failed).

    Its slot is reclaimed and the memory given back to its allocator at once, instead of
    when the slot's lease runs out.
    """
    name = meta.get(_schema.KEY_CUDA_BLOCK)
    with _tables_lock:
        tables = [t for t in _tables.values() if t.name == name]
    for table in tables:
        table.withdraw(meta[_schema.KEY_CUDA_SLOT], meta[_schema.KEY_CUDA_GENERATION])


def _empty_uuid(backend: CudaBackend) -> str:
    return STANDIN_UUID if backend.name == "standin" else "GPU-00000000"


def _host_bytes(backend: CudaBackend, x: Any, header: _schema.TensorHeader) -> Any:
    """The wire bytes of a dense device array, copied to the host (checksums, host path)."""
    if isinstance(x, StandInArray):
        return np.ascontiguousarray(x.view.transpose(list(header.perm))).view(np.uint8)
    host = to_host(x)
    if isinstance(host, np.ndarray):
        return np.ascontiguousarray(host.transpose(list(header.perm))).reshape(-1).view(np.uint8)
    import torch

    dense = host.permute(list(header.perm)).contiguous().reshape(-1)
    return dense.view(torch.uint8).numpy()


def to_host(x: Any) -> Any:
    """The host copy of a device array, same framework family (torch -> CPU torch, else numpy).

    This is the host path's one device-to-host copy.
    """
    if isinstance(x, StandInArray):
        return x.numpy()
    if sys.modules.get("torch") is not None and isinstance(x, sys.modules["torch"].Tensor):
        return x.detach().cpu()
    if sys.modules.get("cupy") is not None and isinstance(x, sys.modules["cupy"].ndarray):
        return x.get()
    pacuda = pyarrow_cuda()
    if pacuda is not None and isinstance(x, pacuda.CudaBuffer):
        return np.frombuffer(x.copy_to_host(), dtype=np.uint8)
    raise UnsupportedTensorError(f"not a device array: {type(x).__name__}")


def legacy_ipc_problem(x: Any, environ: Mapping[str, str]) -> str | None:
    """Why legacy CUDA IPC cannot share ``x`` from this process, or None."""
    if isinstance(x, StandInArray):
        return standin().ipc_problem
    conf = ",".join(
        environ.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
    ).replace(" ", "")
    if sys.modules.get("torch") is not None and isinstance(x, sys.modules["torch"].Tensor):
        if "expandable_segments:true" in conf.lower():
            return "PyTorch expandable segments are enabled (no legacy CUDA IPC handles)"
        if not x.is_cuda:
            return None
        props = sys.modules["torch"].cuda.get_device_properties(x.device)
        if getattr(props, "is_integrated", False):
            return f"{props.name} is an integrated (unified-memory) GPU without legacy IPC"
    return None
