"""The CUDA IPC descriptor: what a message carries, and its strict parser.

See Note [CUDA IPC descriptors] in this package's ``__init__``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..._errors import MetadataError
from ...codec import _schema, _tensor
from ...codec._schema import (
    KEY_CUDA_ALLOC as KEY_ALLOC,
)
from ...codec._schema import (
    KEY_CUDA_BACKEND as KEY_BACKEND,
)
from ...codec._schema import (
    KEY_CUDA_BLOCK as KEY_BLOCK,
)
from ...codec._schema import (
    KEY_CUDA_EVENT as KEY_EVENT,
)
from ...codec._schema import (
    KEY_CUDA_GENERATION as KEY_GENERATION,
)
from ...codec._schema import (
    KEY_CUDA_OFFSET as KEY_OFFSET,
)
from ...codec._schema import (
    KEY_CUDA_PCI as KEY_PCI,
)
from ...codec._schema import (
    KEY_CUDA_SEQ as KEY_SEQ,
)
from ...codec._schema import (
    KEY_CUDA_SLOT as KEY_SLOT,
)
from ...codec._schema import (
    KEY_CUDA_UUID as KEY_UUID,
)
from ...codec._schema import KIND_CUDA
from .._blocks import NAME
from ._device import IPC_HANDLE_SIZE, NO_EVENT

BACKENDS = ("cuda", "standin")
HANDLE_BYTES = IPC_HANDLE_SIZE
ARRAY_BYTES = 2 * HANDLE_BYTES
_UUID = re.compile(r"^(GPU|MIG|STANDIN)-[0-9A-Za-z-]{1,80}$")
_PCI = re.compile(r"^[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


@dataclass(frozen=True)
class CudaDescriptor:
    """Everything a receiver needs to open one CUDA tensor (see Note [CUDA IPC descriptors])."""

    header: _schema.TensorHeader
    backend: str
    handle: bytes
    event: bytes | None
    offset: int
    alloc_size: int
    device_uuid: str
    pci_bus_id: str
    block: str
    slot: int
    generation: int
    seq: int

    def to_message(self) -> tuple[pa.Array, dict[str, Any]]:
        """The Arrow array (handle bytes, event bytes) and the flat metadata."""
        raw = b"" if self.header.nbytes == 0 else self.handle + (self.event or NO_EVENT)
        array = pa.array(np.frombuffer(raw, dtype=np.uint8), type=pa.uint8())
        meta = self.header.to_metadata()
        meta.update(
            {
                _schema.KEY_KIND: KIND_CUDA,
                KEY_BACKEND: self.backend,
                KEY_OFFSET: self.offset,
                KEY_ALLOC: self.alloc_size,
                KEY_UUID: self.device_uuid,
                KEY_PCI: self.pci_bus_id,
                KEY_EVENT: self.event is not None,
                KEY_BLOCK: self.block,
                KEY_SLOT: self.slot,
                KEY_GENERATION: self.generation,
                KEY_SEQ: self.seq,
            }
        )
        return array, meta


def _handle_bytes(array: object, expected: int) -> bytes:
    buf = _tensor.read_payload(
        array, expected, "a CUDA descriptor's array", "a memory handle + event handle is"
    )
    return buf.to_pybytes()


def parse_descriptor(array: Any, meta: Mapping[str, Any]) -> CudaDescriptor:
    """Validate a CUDA descriptor message (metadata already passed ``check_envelope``).

    Every size is checked before anything is opened: the handle is exactly 64 bytes, the
    tensor's bytes (from dtype, shape and its dense dimension order) lie inside the block,
    the device is named by a well-formed UUID, the control block name is one of ours.

    Raises
    ------
    MetadataError, PayloadError
        With what was received and what was expected.
    """
    header = _schema.parse_header(meta)
    backend = _schema.require(meta, KEY_BACKEND, str)
    if backend not in BACKENDS:
        raise MetadataError(f"{KEY_BACKEND!r} must be one of {BACKENDS}, got {backend[:40]!r}")
    nbytes = header.nbytes
    raw = _handle_bytes(array, 0 if nbytes == 0 else ARRAY_BYTES)
    has_event = _schema.require(meta, KEY_EVENT, bool)
    offset = _schema.require_index(meta, KEY_OFFSET)
    alloc = _schema.require_index(meta, KEY_ALLOC)
    if offset + nbytes > alloc:
        raise MetadataError(
            f"the tensor's {nbytes} bytes at offset {offset} end at {offset + nbytes}, past "
            f"the end of its {alloc}-byte allocation ({KEY_OFFSET!r}, {KEY_ALLOC!r} "
            f"and {_schema.KEY_TENSOR!r} disagree)"
        )
    if nbytes and offset % min(header.dtype.itemsize, 16):
        raise MetadataError(
            f"{KEY_OFFSET!r} {offset} is not aligned to the {header.dtype.itemsize}-byte "
            f"elements of {header.dtype.name}"
        )
    uuid = _schema.require(meta, KEY_UUID, str)
    pci = _schema.require(meta, KEY_PCI, str)
    if not _UUID.match(uuid):
        raise MetadataError(f"{KEY_UUID!r} must look like 'GPU-<uuid>', got {uuid[:90]!r}")
    if pci and not _PCI.match(pci):
        raise MetadataError(f"{KEY_PCI!r} must look like '0000:65:00.0', got {pci[:40]!r}")
    block = _schema.require(meta, KEY_BLOCK, str)
    if block and not NAME.match(block):
        raise MetadataError(
            f"{KEY_BLOCK!r} must name a control block 'at-<32 hex>-<pid>-<32 hex>', "
            f"got {block[:100]!r}"
        )
    if nbytes and not block:
        raise MetadataError(f"{KEY_BLOCK!r} is empty but the tensor has {nbytes} bytes")
    slot = _schema.require_index(meta, KEY_SLOT)
    generation = _schema.require_index(meta, KEY_GENERATION)
    seq = _schema.require_index(meta, KEY_SEQ)
    if nbytes and generation == 0:
        raise MetadataError(f"{KEY_GENERATION!r} must be positive for a non-empty tensor")
    handle = raw[:HANDLE_BYTES]
    event = raw[HANDLE_BYTES:] if has_event and raw else None
    return CudaDescriptor(
        header, backend, handle, event, offset, alloc, uuid, pci, block, slot, generation, seq
    )
