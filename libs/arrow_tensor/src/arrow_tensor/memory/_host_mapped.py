"""The host pool as receivers see it: pools mapped once, handles decoded into zero-copy views.

See Note [Shared-memory pools] in ``_host_pool`` and Note [Block files] in ``_blocks``.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from .._errors import ArrowTensorError, ShmHandleError
from ..codec import _checksum, _schema
from ..codec._memo import Memo
from ..codec._tensor import view_tensor
from ._blocks import (
    KIND_HOST,
    PAGE,
    Identity,
    MappedBlock,
    dropped_blocks,
    identity,
    notices,
    unlink,
)
from ._host_pool import W_CAPACITY, W_HEADER_BYTES


class _MappedPool(MappedBlock):
    """A pool as a receiver sees it: control block read-write, payload read-only."""

    def __init__(self, name: str, ident: Identity) -> None:
        super().__init__(name, ident, kind=KIND_HOST, what=repr(_schema.KEY_SHM_POOL), payload=True)

    def check(self) -> None:
        """The pool's own words agree with its file: capacity, control block, size."""
        capacity = self.kind_word(W_CAPACITY)
        if (
            self.kind_word(W_HEADER_BYTES) != self.header_bytes
            or capacity <= 0
            or capacity % PAGE
            or self.header_bytes + self.block.n_slots * capacity != self.file_size
            or self.payload is None
        ):
            raise ShmHandleError(
                f"pool {self.name}: header (capacity {capacity}, {self.block.n_slots} slots) "
                f"does not match its file size {self.file_size}"
            )
        self.capacity = capacity


_mapped: dict[str, _MappedPool] = {}
_mapped_lock = threading.Lock()


def _open_pool(name: str) -> _MappedPool:
    mapped = _mapped.get(name)
    if mapped is not None:
        return mapped
    with _mapped_lock:
        mapped = _mapped.get(name)
        if mapped is None:
            # A new pool usually means one retired: forget closed pools nothing here uses,
            # so their pages go back to the system once the last view dies.
            for old_name, old in list(_mapped.items()):
                if old.block.closed and old.rx.held() == 0:
                    del _mapped[old_name]
            mapped = _mapped[name] = _MappedPool(name, identity())
            notices().watch(name)
        return mapped


_refused: Memo[str, bool] = Memo(256)
"""Probed pool names this process cannot open (not a receiver of them, gone, hostile)."""


def probe_pool(meta: Mapping[str, Any]) -> None:
    """Open the pool ``at.shm.probe`` names, so that its producer learns this receiver can.

    A hint, never an error: a name this process cannot open (it is not a receiver of that
    pool, as behind a relay; the pool is gone) is remembered and skipped from then on.
    See Note [Relay-safe handles] in ``_host_pool``.
    """
    name = meta.get(_schema.KEY_SHM_PROBE)
    if type(name) is not str or name in _mapped or _refused.get(name, False):
        return
    try:
        _mark_dropped()
        _open_pool(name)
    except ArrowTensorError:
        _refused.remember(name, True)


def _mark_dropped() -> None:
    for name in dropped_blocks():
        mapped = _mapped.get(name)
        if mapped is not None:
            mapped.gone = True


def forget_pools() -> None:
    """Drop this process's cache of mapped pools (tests); live views keep their mappings."""
    with _mapped_lock:
        _mapped.clear()


def decode_shm(
    array: Any, meta: Mapping[str, Any], writable: bool = False, verify: bool = False
) -> Any:
    """Decode a shared-memory handle message into a zero-copy, read-only-by-contract tensor.

    Parameters
    ----------
    array, meta:
        What dora delivered; ``meta`` already passed ``_schema.check_envelope``. The array
        carries nothing.
    writable:
        ``True`` returns a private copy and releases the slot at once.
    verify:
        Check ``at.checksum`` over the slot's bytes.

    Returns
    -------
    A ``numpy.ndarray`` (flagged read-only) or ``torch.Tensor`` over the pool's mapping. The
    slot stays reserved for this process until that object and every view of it are freed.

    Raises
    ------
    ShmHandleError
        Malformed handle, a pool of another dataflow or user, bounds outside the pool.
    StaleHandleError
        The pool is gone (producer exited) or the slot was reused (lease expired).
    """
    header = _schema.parse_header(meta)
    name = _schema.require(meta, _schema.KEY_SHM_POOL, str)
    slot, generation, seq, offset = (
        _schema.require_index(meta, key, error=ShmHandleError)
        for key in (
            _schema.KEY_SHM_SLOT,
            _schema.KEY_SHM_GENERATION,
            _schema.KEY_SHM_SEQ,
            _schema.KEY_SHM_OFFSET,
        )
    )
    _mark_dropped()
    pool = _open_pool(name)
    nbytes = header.nbytes
    if slot >= pool.block.n_slots:
        raise ShmHandleError(f"slot {slot} outside pool {name} of {pool.block.n_slots} slots")
    if offset % header.dtype.itemsize or offset + nbytes > pool.capacity:
        raise ShmHandleError(
            f"bytes [{offset}, {offset + nbytes}) are not an aligned range inside a slot of "
            f"{pool.capacity} bytes"
        )
    pool.rx.take(slot, generation, seq)
    try:
        start = slot * pool.capacity + offset
        base = np.frombuffer(pool.payload, np.uint8, nbytes, start)
        pool.rx.hold_until_freed(base, slot, generation)
    except BaseException:
        pool.rx.release(slot, generation)
        raise
    buf = pa.py_buffer(base)
    del base
    if verify:
        _checksum.verify(meta.get(_schema.KEY_CHECKSUM), header.describe(), buf)
    return view_tensor(header, buf, writable)


def close_mapped() -> None:
    """At exit: unlink the known pools of producers that closed or died."""
    for mapped in list(_mapped.values()):
        if mapped.stale:
            unlink(mapped.name)


atexit.register(close_mapped)
