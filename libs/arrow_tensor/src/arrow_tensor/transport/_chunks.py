"""Values larger than one dora message: split into chunks, reassembled in order.

Note [Chunks past dora's message cap]
dora encodes every message as one Arrow IPC stream and refuses streams over its cap
(``facts.message_cap``); its encoder adds an all-ones validity bitmap (one bit per
element, and ``send_output_raw`` samples are uint8, so 1/8 of the payload). A value whose
message would not fit is sent as ``count`` chunk messages of at most
``_decide.max_chunk_payload(cap)`` bytes each, written straight into dora's outgoing
samples (one copy, by the codec's threaded compaction; non-dense tensors are compacted
row block by row block).
Every chunk carries the codec header plus ``at.chunk.*`` keys (sender stream, transfer
sequence number, index, count, byte offset, total bytes) and ``at.kind = "chunk"`` so that
``decode`` on a lone chunk fails clearly. The receiver copies chunks, strictly in order,
into one buffer preallocated from the first chunk, and decodes that buffer when the last
chunk arrives. dora delivery is lossy and can reorder, so anything but the next expected
chunk drops the whole value with ``IncompleteTransferError``; memory stays bounded (a total
limit per value, a few transfers in flight, a new transfer from a sender abandons its
previous one) and nothing ever waits for a chunk.
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from .._errors import IncompleteTransferError, MetadataError, PayloadError
from ..codec import _checksum, _schema
from ..codec import _tensor as _codec
from ..codec._tensor import TensorPlan

MAX_CHUNKS = 1 << 16
DEFAULT_MAX_TRANSFER_BYTES = 64 << 30
DEFAULT_MAX_TRANSFERS = 4
DEFAULT_IDLE_S = 10.0
"""A chunked value with no new chunk for this long lost one (``ARROW_TENSOR_CHUNK_TIMEOUT``):
chunks of one value leave back to back, paced at most (``_facts.REMOTE_RATE``)."""

# One stream per sending process and output: a new transfer on a stream abandons the last.
_PROCESS_TOKEN = secrets.token_hex(8)
_SEQUENCES: dict[str, Iterator[int]] = {}


@dataclass(frozen=True)
class _Piece:
    offset: int
    nbytes: int
    write: Callable[[Any], None]  # fills the first ``nbytes`` of a writable buffer


def byte_pieces(data: np.ndarray, max_chunk: int) -> list[_Piece]:
    """Equal pieces (multiples of 64 bytes) of a flat uint8 array."""
    total = data.nbytes
    count = max(2, math.ceil(total / max_chunk))
    step = math.ceil(total / count)
    if total > 128:  # 64-byte aligned pieces, still at least two
        step = math.ceil(step / 64) * 64

    def writer(lo: int, hi: int) -> Callable[[Any], None]:
        # One memcpy on one thread: chunks go back to back, and the receiver copies the
        # previous one into place meanwhile; a threaded copy here would take its core.
        def write(dest: Any) -> None:
            np.copyto(np.frombuffer(dest, dtype=np.uint8, count=hi - lo), data[lo:hi])

        return write

    return [
        _Piece(lo, min(step, total - lo), writer(lo, min(lo + step, total)))
        for lo in range(0, total, step)
    ]


def _row_pieces(source: np.ndarray, max_chunk: int) -> list[_Piece] | None:
    """Pieces of whole rows of a physical-order view, each compacted straight into its sample.

    ``None`` when a single row is larger than one chunk.
    """
    rows = source.shape[0]
    row_bytes = source[0].size * source.itemsize if rows else 0
    if rows < 2 or row_bytes == 0 or row_bytes > max_chunk:
        return None
    per_chunk = max_chunk // row_bytes
    count = max(2, math.ceil(rows / per_chunk))
    per_chunk = math.ceil(rows / count)

    def writer(lo: int, hi: int) -> Callable[[Any], None]:
        block = source[lo:hi]

        def write(dest: Any) -> None:  # the codec's one (threaded, where it pays) copy
            _codec.write_into(dest, block)

        return write

    return [
        _Piece(
            lo * row_bytes,
            (min(lo + per_chunk, rows) - lo) * row_bytes,
            writer(lo, min(lo + per_chunk, rows)),
        )
        for lo in range(0, rows, per_chunk)
    ]


def plan_pieces(plan: TensorPlan, max_chunk: int) -> tuple[list[_Piece], np.ndarray | None]:
    """Split a tensor's payload into chunk pieces; also the flat payload if it was built.

    Dense payloads are cut in equal byte ranges of the tensor's own memory. Non-dense ones
    are cut along their outermost physical dimension so that each piece compacts straight
    into its sample; when even one row is too big they are compacted once first.
    """
    if not plan.needs_copy:
        flat = plan.payload().view(np.uint8)
        return byte_pieces(flat, max_chunk), flat
    pieces = _row_pieces(plan.source, max_chunk)
    if pieces is not None:
        return pieces, None
    flat = plan.payload().view(np.uint8)
    return byte_pieces(flat, max_chunk), flat


class Outbound(Protocol):
    """What ``send_chunks`` tells before each chunk (an output's ``OutputState``)."""

    def before_send(self, meta: dict[str, Any], nbytes: int) -> None:
        """Called right before a chunk message goes (it may add keys to ``meta``)."""


def send_chunks(
    node: Any,
    output_id: str,
    pieces: list[_Piece],
    total: int,
    header_meta: Mapping[str, Any],
    user_meta: Mapping[str, Any],
    *,
    raw: bool = True,
    state: Outbound | None = None,
) -> int:
    """Send ``pieces`` as chunk messages of one transfer; returns the number sent.

    ``header_meta`` is the codec metadata of the whole value (its checksum, if any, goes on
    the last chunk only). ``raw`` writes each piece into a ``send_output_raw`` sample (one
    copy); otherwise each piece is compacted into a private buffer and sent inline.
    ``state.before_send(meta, nbytes)`` is called before each chunk (the output's start-up
    hold, pacing and sequence number).
    """
    if len(pieces) > MAX_CHUNKS:
        raise PayloadError(f"{total} bytes would need {len(pieces)} chunks; at most {MAX_CHUNKS}")
    stream = f"{_PROCESS_TOKEN}/{output_id}"
    seq = next(_SEQUENCES.setdefault(stream, itertools.count()))
    base = {k: v for k, v in header_meta.items() if k != _schema.KEY_CHECKSUM}
    base.update(user_meta)
    base[_schema.KEY_CHUNK_KIND] = base[_schema.KEY_KIND]
    base[_schema.KEY_KIND] = _schema.KIND_CHUNK
    base[_schema.KEY_CHUNK_STREAM] = stream
    base[_schema.KEY_CHUNK_SEQ] = seq
    base[_schema.KEY_CHUNK_COUNT] = len(pieces)
    base[_schema.KEY_CHUNK_TOTAL] = total
    for index, piece in enumerate(pieces):
        meta = dict(base)
        meta[_schema.KEY_CHUNK_INDEX] = index
        meta[_schema.KEY_CHUNK_OFFSET] = piece.offset
        if index == len(pieces) - 1 and _schema.KEY_CHECKSUM in header_meta:
            meta[_schema.KEY_CHECKSUM] = header_meta[_schema.KEY_CHECKSUM]
        if state is not None:
            state.before_send(meta, piece.nbytes)
        if raw:
            with node.send_output_raw(output_id, piece.nbytes, meta) as sample:
                piece.write(sample)
        else:
            buf = np.empty(piece.nbytes, dtype=np.uint8)
            piece.write(buf)
            node.send_output(
                output_id,
                pa.Array.from_buffers(pa.uint8(), piece.nbytes, [None, pa.py_buffer(buf)]),
                meta,
            )
    return len(pieces)


def checksum_of(header_text: str, flat: np.ndarray) -> str:
    """The whole-value checksum of a chunked transfer (over the exact bytes chunks carry)."""
    return _checksum.digest(header_text, flat)


def decode_chunk(
    array: Any, meta: Mapping[str, Any], writable: bool = False, verify: bool = False
) -> Any:
    """``decode`` of a lone chunk message: always an error pointing at the Receiver."""
    index, count = meta.get(_schema.KEY_CHUNK_INDEX), meta.get(_schema.KEY_CHUNK_COUNT)
    raise IncompleteTransferError(
        f"this message is chunk {index} of {count} of a value too large for one dora message; "
        f"decode cannot read a chunk alone: receive every message of the input with "
        f"arrow_tensor.Receiver().receive(value, metadata) (or the node API), which "
        f"reassembles the chunks and returns the value with the last one"
    )


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return DEFAULT_MAX_TRANSFER_BYTES


@dataclass
class _Transfer:
    seq: int
    count: int
    total: int
    buffer: np.ndarray
    next_index: int = 0
    offset: int = 0
    last_at: float = 0.0
    """``time.monotonic()`` of its latest chunk."""


class Reassembler:
    """Collects chunk messages into whole values; bounded in memory, never waits.

    Parameters
    ----------
    max_transfer_bytes:
        Largest value accepted (default: the smaller of 64 GiB and the physical memory).
    max_transfers:
        Transfers (senders) in flight at once; starting one more drops the oldest with an
        ``IncompleteTransferError``.
    idle_s:
        A transfer with no new chunk for this long lost one (``expired``).
    """

    def __init__(
        self,
        max_transfer_bytes: int | None = None,
        max_transfers: int = DEFAULT_MAX_TRANSFERS,
        idle_s: float = DEFAULT_IDLE_S,
    ) -> None:
        self.idle_s = idle_s
        self.max_transfer_bytes = (
            min(DEFAULT_MAX_TRANSFER_BYTES, _physical_memory())
            if max_transfer_bytes is None
            else max_transfer_bytes
        )
        self.max_transfers = max_transfers
        self._active: OrderedDict[str, _Transfer] = OrderedDict()
        self._dead: deque[tuple[str, int]] = deque(maxlen=64)
        self._spares: OrderedDict[str, np.ndarray] = OrderedDict()

    @property
    def pending(self) -> int:
        """Number of transfers started and not yet complete."""
        return len(self._active)

    def next_expiry(self) -> float | None:
        """``time.monotonic()`` when the stalest incomplete transfer expires, or None."""
        if not self._active:
            return None
        return min(t.last_at for t in self._active.values()) + self.idle_s

    def expired(self, now: float | None = None) -> list[str]:
        """Drop the transfers idle for ``idle_s``: a chunk was lost. Says which, and how far."""
        now = time.monotonic() if now is None else now
        gone = []
        for stream, t in list(self._active.items()):
            if now - t.last_at >= self.idle_s:
                del self._active[stream]
                self._dead.append((stream, t.seq))
                gone.append(
                    f"transfer {stream}#{t.seq} dropped: no chunk for {self.idle_s:g} s after "
                    f"chunk {t.next_index} of {t.count} ({t.offset} of {t.total} bytes); "
                    f"a chunk was lost on the way"
                )
        return gone

    def add(self, array: Any, meta: Mapping[str, Any]) -> tuple[pa.Array, dict[str, Any]] | None:
        """Take one chunk; return ``(payload array, metadata of the value)`` when complete.

        Raises
        ------
        IncompleteTransferError
            A chunk was lost, duplicated, reordered or is inconsistent with its transfer,
            or a transfer was abandoned; only that value is dropped.
        MetadataError, PayloadError
            Malformed chunk metadata or payload.
        """
        stream = _schema.require(meta, _schema.KEY_CHUNK_STREAM, str)
        seq = _schema.require(meta, _schema.KEY_CHUNK_SEQ, int)
        index = _schema.require(meta, _schema.KEY_CHUNK_INDEX, int)
        count = _schema.require(meta, _schema.KEY_CHUNK_COUNT, int)
        offset = _schema.require(meta, _schema.KEY_CHUNK_OFFSET, int)
        total = _schema.require(meta, _schema.KEY_CHUNK_TOTAL, int)
        _schema.require(meta, _schema.KEY_CHUNK_KIND, str)
        if not 2 <= count <= MAX_CHUNKS or not 0 <= index < count or seq < 0:
            raise MetadataError(
                f"chunk index {index} of count {count} (seq {seq}): expected "
                f"0 <= index < count and 2 <= count <= {MAX_CHUNKS}"
            )
        if not 0 <= total <= self.max_transfer_bytes:
            raise PayloadError(
                f"chunked value of {total} bytes refused: this receiver accepts at most "
                f"{self.max_transfer_bytes} bytes (Receiver(max_transfer_bytes=...))"
            )
        data = chunk_bytes(array)
        name = f"{stream}#{seq}"
        if (stream, seq) in self._dead:
            return None  # the rest of a value already reported as incomplete
        current = self._active.get(stream)
        stale: str | None = None
        if current is not None and current.seq != seq:
            if seq < current.seq:
                return None  # a straggler of an older, already abandoned transfer
            del self._active[stream]
            self._dead.append((stream, current.seq))
            stale = (
                f"transfer {stream}#{current.seq} abandoned after chunk "
                f"{current.next_index} of {current.count}: the sender started transfer "
                f"#{seq} (chunks lost)"
            )
            current = None
        if current is None:
            if index != 0:
                self._dead.append((stream, seq))
                raise IncompleteTransferError(
                    f"transfer {name}: got chunk {index} of {count} before chunk 0 "
                    f"(lost or reordered); the value is dropped"
                    + (f"; also {stale}" if stale else "")
                )
            current, evicted = self._start(stream, seq, count, total, meta)
            stale = "; ".join(filter(None, [stale, evicted])) or None
        if (count, total) != (current.count, current.total) or index != current.next_index:
            del self._active[stream]
            self._dead.append((stream, seq))
            raise IncompleteTransferError(
                f"transfer {name}: expected chunk {current.next_index} of {current.count} "
                f"({current.total} bytes), got chunk {index} of {count} ({total} bytes); "
                f"a chunk was lost, duplicated or reordered, the value is dropped"
            )
        end = current.offset + data.size
        if offset != current.offset or end > current.total:
            del self._active[stream]
            self._dead.append((stream, seq))
            raise IncompleteTransferError(
                f"transfer {name}: chunk {index} claims bytes [{offset}, {offset + data.size}) "
                f"but bytes [{current.offset}, {end}) of {current.total} were expected"
            )
        current.buffer[current.offset : end] = data
        current.offset, current.next_index = end, index + 1
        current.last_at = time.monotonic()
        if stale is not None:
            raise IncompleteTransferError(stale)
        if current.next_index < current.count:
            return None
        del self._active[stream]
        if current.offset != current.total:
            raise IncompleteTransferError(
                f"transfer {name}: its {count} chunks hold {current.offset} bytes, "
                f"the value has {current.total}"
            )
        self._keep_spare(stream, current.buffer)
        value_meta = {k: v for k, v in meta.items() if not k.startswith("at.chunk.")}
        value_meta[_schema.KEY_KIND] = meta[_schema.KEY_CHUNK_KIND]
        buf = pa.py_buffer(current.buffer)
        return pa.Array.from_buffers(pa.uint8(), current.total, [None, buf]), value_meta

    def _start(
        self, stream: str, seq: int, count: int, total: int, meta: Mapping[str, Any]
    ) -> tuple[_Transfer, str | None]:
        if meta[_schema.KEY_CHUNK_KIND] == _schema.KIND_TENSOR:
            header = _schema.parse_header(meta)
            _codec.check_host(header)  # before the whole value is allocated
            if header.nbytes != total:
                raise PayloadError(
                    f"chunked tensor {header.describe()} has {header.nbytes} bytes "
                    f"but its chunks announce {total}"
                )
        evicted = []
        while len(self._active) >= self.max_transfers:
            old_stream, old = self._active.popitem(last=False)
            self._dead.append((old_stream, old.seq))
            evicted.append(
                f"transfer {old_stream}#{old.seq} dropped after chunk {old.next_index} of "
                f"{old.count}: more than {self.max_transfers} transfers in flight"
            )
        transfer = _Transfer(
            seq, count, total, self._buffer(stream, total), last_at=time.monotonic()
        )
        self._active[stream] = transfer
        return transfer, "; ".join(evicted) or None

    def _buffer(self, stream: str, total: int) -> np.ndarray:
        """A reassembly buffer: the stream's last one when nobody holds it any more.

        Fresh pages cost a page fault each on first touch (about as much as the copy
        itself); a stream of same-sized values reuses its buffer once the previous value,
        which is a zero-copy view of it, has been dropped.
        """
        spare = self._spares.pop(stream, None)
        # References: this local and getrefcount's argument. Any view of a decoded value
        # (numpy base, pyarrow buffer, DLPack capsule) holds one more.
        if spare is not None and spare.size == total and sys.getrefcount(spare) == 2:
            return spare
        return np.empty(total, dtype=np.uint8)

    def _keep_spare(self, stream: str, buffer: np.ndarray) -> None:
        self._spares[stream] = buffer
        while len(self._spares) > self.max_transfers:
            self._spares.popitem(last=False)

    def close(self) -> None:
        """Drop every incomplete transfer and spare buffer; raise if a value was incomplete."""
        names = [f"{s}#{t.seq} ({t.next_index}/{t.count} chunks)" for s, t in self._active.items()]
        self._active.clear()
        self._spares.clear()
        if names:
            raise IncompleteTransferError(f"incomplete chunked values dropped: {names}")


def chunk_bytes(array: Any) -> np.ndarray:
    """The bytes of one chunk as a flat uint8 view, after the payload reader's checks."""
    buf = _codec.read_payload(array, None, what="a chunk")
    return np.frombuffer(buf, dtype=np.uint8)
