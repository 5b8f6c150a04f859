"""The one decision: how a value travels, as a pure function of facts and payload.

Note [Choosing a transport]
``decide(facts, payload, forced, checksum)`` returns the routes to try, in order; the
first route whose executor sends wins, and a route declines only for a reason the facts
cannot know in advance (every pool slot held, an allocation CUDA cannot share). Nothing
else in the package chooses a transport, and the send fast path is this function's
memoized result for a repeated layout, not a second copy of its rules. The routes:

- ``cuda``: a device array as an IPC descriptor, no payload bytes (memory.cuda); it falls
  to ``host`` when a receiver cannot open descriptors (``facts.cuda_reason``) or the
  device cannot share this allocation (``payload.device_problem``).
- ``host``: a device array copied to the host once, then decided again as a host tensor.
- ``shm``: a handle to a tensor in this output's shared-memory pool: every loaned tensor,
  and ordinary tensors of ``facts.shm_min_bytes`` or more, when every receiver can map the
  pool (``facts.shm_reason``). A full pool declines; the message routes follow.
- ``raw``: the payload written straight into dora's outgoing sample (``send_output_raw``):
  for payloads that must be compacted anyway (one copy into warm, pooled pages instead of a
  fresh allocation plus dora's copy), and for dense payloads large enough that the codec's
  threaded copy beats dora's one-thread memcpy (``payload.parallel_copy``). Not below
  ``RAW_MIN_BYTES`` (dora keeps smaller samples on its heap, unaligned), not with a
  checksum (dora fixes a raw sample's metadata before the bytes are written), only where
  the node has raw samples.
- ``inline``: ``send_output`` of the encoded array: for a dense tensor a view of its own
  memory, so the only copy is dora's.
- ``chunked``: a value whose one message would exceed dora's cap on this route
  (``facts.message_cap``, the validity bitmap counted), in chunks (``_chunks``).

A *plain* payload (a plain value: an Arrow array, text, bytes, a flat list; or any tensor
on a plain output, ``payload.plain``) is for consumers that know nothing of arrow_tensor: it
goes ``inline`` as one ordinary array, or, from a device, by ``host`` first. Never a handle,
a raw sample (a uint8 array to them) or chunks: a value too large for one message is
refused with a ``TransportError``, as is a structure on a plain output.

A forced transport (``send(transport=...)``, for tests and benchmarks) is honoured or
refused with a ``TransportError`` that says why; it is never silently replaced. ``shm`` is
the one preference (``pool.send``): the pool wherever every receiver can map it, waiting
a little for a slot; the message routes where it cannot be used or stays full, and the
returned route says which was taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._errors import TransportError
from ._facts import OutputFacts

INLINE = "inline"
RAW = "raw"
CHUNKED = "chunked"
SHM = "shm"
CUDA_IPC = "cuda"
"""Device arrays: an IPC descriptor, no payload bytes (Note [CUDA IPC descriptors])."""
HOST_COPY = "host"
"""Device arrays copied to the host, then decided again as a host tensor."""
ROUTES = (CUDA_IPC, HOST_COPY, SHM, RAW, INLINE, CHUNKED)
FORCEABLE = (INLINE, RAW, CHUNKED, SHM)
"""What ``send(transport=...)`` accepts."""

RAW_MIN_BYTES = 4096
"""dora puts smaller samples on the heap, unaligned for typed views: keep those inline."""
IPC_SLACK = 64 << 10
"""Stream header, schema and padding of dora's Arrow IPC message (measured 344 bytes)."""

TENSOR = "tensor"
"""A host tensor the codec planned: every route is open to it."""
TREE = "tree"
"""An encoded structure (one array of words): inline or chunked."""
DEVICE = "device"
"""A device array (torch CUDA, CuPy, pyarrow.cuda, the stand-in)."""
PLAIN = "plain"
"""A plain value (codec._plain): one Arrow array that any dora node reads as it is."""


@dataclass(frozen=True)
class Payload:
    """What the decision knows about one value (derived by ``_send.prepare``)."""

    nbytes: int
    """Payload bytes."""
    width: int = 1
    """Element width of the inline array: its validity bitmap has one bit per element."""
    needs_copy: bool = False
    """The payload must be compacted (non-dense or big-endian) before it can travel."""
    kind: str = TENSOR
    """``TENSOR``, ``TREE``, ``DEVICE`` or ``PLAIN``."""
    plain: bool = False
    """For consumers that know nothing of arrow_tensor (a plain output): one C-ordered
    message in the dtype's own Arrow type (Note [Choosing a transport])."""
    loaned: bool = False
    """The tensor lives in this output's shared-memory pool (``pool.loan``)."""
    parallel_copy: bool = False
    """The codec copies this many bytes on several threads (``_tensor.copies_in_parallel``)."""
    device_problem: str | None = None
    """Why the device cannot share this allocation over CUDA IPC, or None."""


def message_bytes(nbytes: int, width: int = 1) -> int:
    """Upper bound of the IPC message dora builds for ``nbytes`` of ``width``-byte elements."""
    bitmap = math.ceil(nbytes // max(width, 1) / 8)
    return nbytes + bitmap + 64 + IPC_SLACK


def max_chunk_payload(cap: int, width: int = 1) -> int:
    """Largest payload (a multiple of 64 bytes) whose message of ``width``-byte elements fits."""
    room = cap - 64 - IPC_SLACK
    payload = room * 8 * width // (8 * width + 1)
    return payload - payload % 64


def decide(
    facts: OutputFacts, payload: Payload, forced: str | None = None, checksum: bool = False
) -> tuple[str, ...]:
    """The routes to try for ``payload`` on the output ``facts`` describe, in order.

    See Note [Choosing a transport]. Pure: the same arguments give the same routes.

    Raises
    ------
    TransportError
        When ``forced`` is not a transport, or names one this value or output cannot take.
    """
    if forced is not None and forced not in FORCEABLE:
        raise TransportError(f"transport must be one of {FORCEABLE} or None, got {forced!r:.40}")
    if payload.plain or payload.kind == PLAIN:
        return _plain_routes(facts, payload, forced)
    if payload.kind == DEVICE:
        if forced is not None or facts.cuda_reason or payload.device_problem:
            return (HOST_COPY,)
        return (CUDA_IPC, HOST_COPY)
    cap = facts.message_cap
    fits_inline = message_bytes(payload.nbytes, payload.width) <= cap
    if payload.kind == TREE:
        if forced not in (None, INLINE, CHUNKED):
            raise TransportError(f"a structure travels inline or chunked, not {forced!r}")
        if forced == INLINE and not fits_inline:
            raise _too_big(payload, cap)
        if forced == CHUNKED or not fits_inline:
            return (_chunkable(payload),)
        return (INLINE,)
    fits_raw = message_bytes(payload.nbytes, 1) <= cap
    can_raw = facts.raw and not checksum
    if forced == INLINE:
        if not fits_inline:
            raise _too_big(payload, cap)
        return (INLINE,)
    if forced == RAW:
        if not fits_raw:
            raise _too_big(payload, cap)
        if not can_raw:
            why = "it carries a checksum" if checksum else "this node has no raw samples"
            raise TransportError(f"transport 'raw' is not possible here: {why}")
        return (RAW,)
    if forced == CHUNKED:
        return (_chunkable(payload),)
    routes: tuple[str, ...] = ()
    pooled = payload.loaned or payload.nbytes >= facts.shm_min_bytes or forced == SHM
    if pooled and facts.shm_reason is None and payload.nbytes:
        routes = (SHM,)
    # Compacted payloads are sized as raw samples (bytes): that is how they usually go.
    if not (fits_raw if payload.needs_copy else fits_inline):
        return (*routes, _chunkable(payload))
    raw = can_raw and (
        (payload.needs_copy and payload.nbytes >= RAW_MIN_BYTES)
        or (payload.parallel_copy and fits_raw)
    )
    return (*routes, RAW, INLINE) if raw else (*routes, INLINE)


def _plain_routes(facts: OutputFacts, payload: Payload, forced: str | None) -> tuple[str, ...]:
    what = "a plain value" if payload.kind == PLAIN else f"plain output {facts.output_id!r}"
    if forced not in (None, INLINE):
        raise TransportError(f"{what} travels inline, as one ordinary array, not {forced!r}")
    if payload.kind == TREE:
        raise TransportError(
            f"{what} carries tensors, Arrow arrays, text, bytes and flat lists that any node "
            f"reads; a structure needs arrow_tensor to decode it: send it on another output"
        )
    if payload.kind == DEVICE:
        return (HOST_COPY,)
    if message_bytes(payload.nbytes, payload.width) > facts.message_cap:
        raise TransportError(
            f"{what}: a {payload.nbytes}-byte value does not fit one dora message "
            f"({facts.message_cap} bytes), and a consumer that does not use arrow_tensor "
            f"cannot join chunks; send it on an output that is not plain"
        )
    return (INLINE,)


def _chunkable(payload: Payload) -> str:
    if payload.nbytes < 2:
        raise TransportError(
            f"a {payload.nbytes}-byte value cannot be split into chunks (at least two bytes)"
        )
    return CHUNKED


def _too_big(payload: Payload, cap: int) -> TransportError:
    return TransportError(
        f"a {payload.nbytes}-byte payload does not fit one dora message on this route "
        f"({cap} bytes with its validity bitmap); send it with transport='chunked' or None"
    )
