"""Sending: a value prepared once, the decision taken once, executors that send or decline.

``send`` reads as its steps: the fast path for a layout this output sent before (the
memoized decision, Note [The fast path] in ``codec._tensor``); the output's facts
(``_facts``); the value prepared into a ``Payload`` (``prepare``); the routes
(``_decide.decide``); each route's executor in order until one sends. An executor either
sends and returns its route, or declines (``None``) having sent nothing: a full pool, an
allocation CUDA cannot share, a node without raw samples.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .._errors import (
    ArrowTensorError,
    CudaUnavailableError,
    PoolExhaustedError,
    TransportError,
)
from ..codec import _layout, _nodehub, _plain, _schema, _tensor, _tree
from ..codec._tensor import TensorPlan
from ..memory._blocks import ANONYMOUS
from ..memory._host_pool import private_tensor
from ..memory.cuda._ipc import encode_cuda, legacy_ipc_problem, to_host, withdraw
from ..memory.cuda._select import is_device_array
from . import _chunks
from ._advice import check_pool, host_path
from ._decide import (
    CHUNKED,
    CUDA_IPC,
    DEVICE,
    HOST_COPY,
    INLINE,
    PLAIN,
    RAW,
    RAW_MIN_BYTES,
    SHM,
    TENSOR,
    TREE,
    Payload,
    decide,
    max_chunk_payload,
    message_bytes,
)
from ._facts import FAST_SENDS, OutputState, refused_cap, state_of
from ._metadata import KEYS_OK, PLAIN_TYPES, user_metadata

_EMPTY = pa.array([], pa.uint8())


@dataclass
class Outgoing:
    """One value on its way: planned once, described for the decision, with its metadata."""

    value: Any
    payload: Payload
    extra: dict[str, Any]
    """The user's metadata, already checked."""
    checksum: bool
    forced: str | None
    plan: TensorPlan | None = None
    """Host tensors: the codec's plan (header, physical-order view, whether to compact);
    made on demand for a loan, which its pool already describes (``tensor_plan``)."""
    tree: _tree.TreePlan | None = None
    """Structures: the codec's plan of every leaf."""
    encoded: tuple[pa.Array, dict[str, Any]] | None = None
    """Plain values: the one array they travel as, and its ``at.`` keys."""

    def tensor_plan(self) -> TensorPlan:
        """The codec's plan of this host tensor, made on first use."""
        if self.plan is None:
            self.plan = _tensor.plan(self.value, c_order=self.payload.plain)
        return self.plan


def send(
    node: Any,
    output_id: str,
    value: Any,
    metadata: Mapping[str, Any] | None = None,
    *,
    checksum: bool = False,
    transport: str | None = None,
    plain: bool | None = None,
) -> str:
    """Encode ``value`` and send it on ``output_id`` of the dora ``node``.

    Parameters
    ----------
    node:
        A ``dora.Node`` (or ``dora.testing.MockNode``).
    output_id:
        One of the node's outputs.
    value:
        What ``arrow_tensor.encode`` accepts: a tensor (numpy, torch on any device, CuPy),
        a dict / list / tuple nesting tensors and scalars, or a plain value (a
        ``pyarrow.Array``, ``str``, ``bytes``, a flat list of ints, floats or strs) sent as
        the one Arrow array node-hub nodes expect.
    metadata:
        Your own flat keys (not ``at.``-prefixed, not dora's reserved ones).
    checksum:
        Attach an xxh3-64 checksum of the exact bytes sent. A payload that needs compacting
        is then compacted into a private buffer and hashed before it is sent (two copies).
    transport:
        ``None`` lets the library decide (Note [Choosing a transport]); ``"inline"``,
        ``"raw"`` or ``"chunked"`` force one (tests, benchmarks) or raise
        ``TransportError`` saying why it cannot be; ``"shm"`` prefers the shared-memory
        pool (``pool.send``).
    plain:
        Send a tensor the way consumers that know nothing of arrow_tensor read it: one
        C-ordered array of the dtype's own Arrow type, with node-hub image keys for image
        shapes, never a handle (the ``at.`` header still travels). ``None``: as
        ``ARROW_TENSOR_PLAIN_OUTPUTS`` says for this output.

    Returns
    -------
    str
        The route taken: ``"inline"``, ``"raw"``, ``"chunked"``, ``"shm"`` or ``"cuda"``.

    Raises
    ------
    UnsupportedTensorError, MetadataError, TransportError
        For values, metadata or forced transports arrow_tensor cannot send; nothing is sent.
    """
    if transport is None and not checksum and not plain:
        sent = _fast_send(node, output_id, value, metadata)
        if sent is not None:
            return sent
    state = state_of(node, output_id)
    plain = state.facts.plain if plain is None else plain
    out = prepare(state, value, user_metadata(metadata), checksum, transport, plain)
    return _execute(state, out)


def _execute(state: OutputState, out: Outgoing) -> str:
    """Try the decided routes in order; the first that sends wins.

    A route that declines because it learned a fact (a node without raw samples, a lower
    message cap dora refused a message for) has the decision taken again with the new facts.
    """
    facts = None
    routes: tuple[str, ...] = ()
    while facts is not state.facts:
        facts = state.facts
        routes = decide(facts, out.payload, out.forced, out.checksum)
        for route in routes:
            try:
                sent = _EXECUTORS[route](state, out)
            except RuntimeError as exc:  # dora's own refusal; only a size limit is learned
                if not _learned_cap(state, exc):
                    raise
                break
            if sent is not None:
                return sent
            if state.facts is not facts:
                break
    raise TransportError(
        f"output {state.facts.output_id!r}: every route declined ({', '.join(routes)})"
    )


def _learned_cap(state: OutputState, exc: RuntimeError) -> bool:
    """True if dora refused a message as too big for its route: the lower cap is learned."""
    cap = refused_cap(exc)
    if cap is None or cap >= state.facts.message_cap:
        return False
    state.unsent()  # it goes again, in chunks: its number is reused
    state.lower_message_cap(cap)
    return True


# Preparing a value ------------------------------------------------------------------------
def _is_host_tensor(value: Any) -> bool:
    """A numpy array or CPU torch tensor: spares ``is_device_array``'s slower checks."""
    if isinstance(value, np.ndarray):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor) and value.device.type == "cpu"


def _address(value: Any) -> int | None:
    if isinstance(value, np.ndarray):
        return value.__array_interface__["data"][0]
    return value.data_ptr()


def tensor_payload(state: OutputState, value: Any, p: TensorPlan, plain: bool = False) -> Payload:
    """The decision's view of a planned host tensor (the fast path learns through it too)."""
    pool = state.pool
    return Payload(
        nbytes=p.nbytes,
        width=p.header.dtype.storage.itemsize,
        needs_copy=p.needs_copy,
        kind=TENSOR,
        plain=plain,
        loaned=pool is not None and p.nbytes > 0 and pool.owns(_address(value)),
        parallel_copy=_tensor.copies_in_parallel(p.nbytes),
    )


def prepare(
    state: OutputState,
    value: Any,
    extra: dict[str, Any],
    checksum: bool,
    forced: str | None,
    plain: bool = False,
) -> Outgoing:
    """Plan ``value`` once and describe it for the decision (``plain``: for a plain output).

    Raises
    ------
    UnsupportedTensorError
        For anything without an exact wire form, naming the alternative.
    """
    if _is_host_tensor(value):
        header = None if state.pool is None or plain else state.pool.loaned_header(value)
        if header is not None:  # a loan, untouched: its pool describes it, nothing to plan
            payload = Payload(header.nbytes, header.dtype.storage.itemsize, loaned=True)
            return Outgoing(value, payload, extra, checksum, forced)
        p = _tensor.plan(value, c_order=plain)
        payload = tensor_payload(state, value, p, plain)
        return Outgoing(value, payload, extra, checksum, forced, plan=p)
    if is_device_array(value):
        problem = legacy_ipc_problem(value, os.environ)
        payload = Payload(0, kind=DEVICE, plain=plain, device_problem=problem)
        return Outgoing(value, payload, extra, checksum, forced)
    if _plain.plain_form(value) is not None:
        array, meta = _plain.encode_plain(value, checksum=checksum)
        payload = Payload(array.nbytes, kind=PLAIN, plain=True)
        return Outgoing(value, payload, extra, checksum, forced, encoded=(array, meta))
    if isinstance(value, (dict, list, tuple)):
        tp = _tree.plan_tree(value)
        payload = Payload(tp.nbytes, 8, kind=TREE, plain=plain)
        return Outgoing(value, payload, extra, checksum, forced, tree=tp)
    p = _tensor.plan(value, c_order=plain)  # raises, saying what this value is and what would do
    return Outgoing(value, tensor_payload(state, value, p, plain), extra, checksum, forced, plan=p)


# Executors: each sends and returns its route, or declines with None -----------------------
def _send_cuda(state: OutputState, out: Outgoing) -> str | None:
    try:
        array, meta = encode_cuda(
            out.value,
            receivers=state.facts.receiver_ids or (ANONYMOUS,),
            checksum=out.checksum,
        )
    except (PoolExhaustedError, CudaUnavailableError) as exc:  # this one goes by the host
        host_path(state, str(exc))
        return None
    meta.update(out.extra)
    state.before_send(meta, 0)
    try:
        state.node.send_output(state.facts.output_id, array, meta)
    except BaseException:
        withdraw(meta)  # its memory goes back to the allocator now, not after a lease
        raise
    return CUDA_IPC


def _send_host(state: OutputState, out: Outgoing) -> str | None:
    reason = state.facts.cuda_reason or out.payload.device_problem
    if reason and out.forced is None:
        host_path(state, reason)
    host = to_host(out.value)  # the host path's one device-to-host copy
    plain = out.payload.plain
    return _execute(state, prepare(state, host, out.extra, out.checksum, out.forced, plain))


def _send_shm(state: OutputState, out: Outgoing) -> str | None:
    pool = state.shm_pool()
    if not (state.facts.trust_descriptor or pool.receivers_proven()):
        # Note [Relay-safe handles]: this value goes in its message, which asks every
        # receiver to open the pool; handles follow once all of them have.
        out.extra[_schema.KEY_SHM_PROBE] = pool.probe_name(out.payload.nbytes)
        if "unproven" not in state.said:
            state.warn_once(
                "unproven",
                f"output {state.facts.output_id!r}: receivers {pool.unproven_receivers()} "
                f"have not opened its shared-memory pool yet (a relay, a recorder, a node "
                f"without arrow_tensor?): values travel in the messages themselves until "
                f"each of them has (ARROW_TENSOR_SHM_TRUST=descriptor sends handles from the "
                f"first message)",
            )
        return None
    handle = pool.place_loan(out.value) if out.payload.loaned else None
    if handle is None:
        # An ordinary tensor never waits for a slot: the message path is as fast as a copy
        # into a slot would be. Only pool.send (forced) waits a little.
        wait_s = pool.wait_s if out.forced == SHM else 0.0
        handle = pool.place(out.value, out.tensor_plan(), wait_s=wait_s)
    if handle is None:
        return None
    meta = handle.publish(out.checksum)
    meta.update(out.extra)
    state.before_send(meta, 0)
    try:
        state.node.send_output(state.facts.output_id, _EMPTY, meta)
    except BaseException:
        handle.unsend()
        raise
    handle.sent()
    return SHM


def _send_raw(state: OutputState, out: Outgoing) -> str | None:
    p = out.tensor_plan()
    check_pool(state, message_bytes(p.nbytes, 1), payload_bytes=p.nbytes)
    meta = p.header.to_metadata()
    meta.update(out.extra)
    state.before_send(meta, p.nbytes)
    try:
        with state.node.send_output_raw(state.facts.output_id, p.nbytes, meta) as sample:
            p.write_into(sample)
    except NotImplementedError:  # dora.testing.MockNode, before anything was sent
        state.unsent()
        state.no_raw_samples()
        return None
    return RAW


def _send_inline(state: OutputState, out: Outgoing) -> str | None:
    if out.encoded is not None:  # a plain value: the one array it is
        array, meta = out.encoded[0], {**out.encoded[1], **out.extra}
        nbytes, width = out.payload.nbytes, 1
    elif out.tree is None:
        p = out.tensor_plan()
        array, meta = _tensor.encode_plan(p, checksum=out.checksum, arrow_bool=out.payload.plain)
        meta.update(out.extra)
        if out.payload.plain:  # node-hub consumers read images by these keys
            user_encoding = out.extra.get("encoding")
            meta.update(_nodehub.image_keys(p.header.shape, p.header.dtype.name, user_encoding))
        nbytes, width = p.nbytes, out.payload.width
    else:
        array, meta = _tree.encode_plan(out.tree, checksum=out.checksum)
        meta.update(out.extra)
        nbytes, width = out.tree.nbytes, 8
    if nbytes >= RAW_MIN_BYTES:  # smaller messages live on dora's heap, not in its pool
        check_pool(state, message_bytes(nbytes, width), payload_bytes=nbytes)
    state.before_send(meta, nbytes)
    state.node.send_output(state.facts.output_id, array, meta)
    return INLINE


def _send_chunked(state: OutputState, out: Outgoing) -> str | None:
    max_chunk = max_chunk_payload(state.facts.message_cap, 1)
    if out.tree is None:
        p = out.tensor_plan()
        pieces, flat = _chunks.plan_pieces(p, max_chunk)
        header_meta = p.header.to_metadata()
        if out.checksum:
            if flat is None:
                flat = p.payload().view(np.uint8)
                pieces = _chunks.byte_pieces(flat, max_chunk)
            header_meta[_schema.KEY_CHECKSUM] = _chunks.checksum_of(p.header.describe(), flat)
        total = p.nbytes
    else:
        array, header_meta = _tree.encode_plan(out.tree, checksum=out.checksum)
        flat = _chunks.chunk_bytes(array)
        pieces, total = _chunks.byte_pieces(flat, max_chunk), out.tree.nbytes
    largest = message_bytes(max(piece.nbytes for piece in pieces), 1)
    check_pool(state, largest, in_flight=len(pieces) + 1)
    node, output_id = state.node, state.facts.output_id
    if state.facts.raw:
        try:
            _chunks.send_chunks(
                node, output_id, pieces, total, header_meta, out.extra, raw=True, state=state
            )
            return CHUNKED
        except NotImplementedError:  # MockNode: raised by the first chunk, before it left
            state.unsent()
            state.no_raw_samples()
    _chunks.send_chunks(
        node, output_id, pieces, total, header_meta, out.extra, raw=False, state=state
    )
    return CHUNKED


_EXECUTORS: dict[str, Callable[[OutputState, Outgoing], str | None]] = {
    CUDA_IPC: _send_cuda,
    HOST_COPY: _send_host,
    SHM: _send_shm,
    RAW: _send_raw,
    INLINE: _send_inline,
    CHUNKED: _send_chunked,
}


# The fast path: the memoized decision for a layout (Note [The fast path] in codec._tensor)
@dataclass(frozen=True, slots=True)
class _FastSend:
    """A layout ``send`` decided on one output to be one plain dora message."""

    state: OutputState
    """The output's state: held so the node's id in the key is not reused."""
    raw: bool
    """Compacted into a ``send_output_raw`` sample, else the tensor's own bytes inline."""
    arrow_type: pa.DataType
    length: int
    """Elements of ``arrow_type`` (inline), or of the tensor (raw)."""
    nbytes: int
    perm: tuple[int, ...] | None
    """Transpose into physical order first (None: already C-ordered)."""
    metadata: dict[str, Any]


_UNSEEN = object()


def _torch_tensor() -> type | None:
    """``torch.Tensor`` if torch is imported (we never import it here)."""
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def _fast_send(node: Any, output_id: str, value: Any, metadata: Any) -> str | None:
    """Send a repeated layout the way the decision chose for it; None: take the full path.

    A frame costs microseconds in a node woken by a message, so this is written out: one
    memo lookup, the per-tensor checks torch needs, one dora call.
    """
    kind = type(value)
    if kind is np.ndarray:
        key = (id(node), output_id, kind, value.dtype, value.shape, value.strides)
    elif kind is _torch_tensor():
        # torch's own attributes, cheaper than t.numpy(). Sparse and nested tensors have
        # no strides.
        try:
            key = (id(node), output_id, kind, value.dtype, value.shape, value.stride())
        except RuntimeError:
            return None
    else:
        return None
    entry = FAST_SENDS.get(key, _UNSEEN)
    if entry is _UNSEEN:
        entry = _learn(state_of(node, output_id), value, key)
    if entry is None:
        return None
    if metadata and not (  # user_metadata would return an equal copy: take it as it is
        type(metadata) is dict
        and KEYS_OK.keys() >= metadata.keys()
        and PLAIN_TYPES.issuperset(map(type, metadata.values()))
    ):
        return None
    meta = {**entry.metadata, **metadata} if metadata else entry.metadata.copy()
    bits = value
    if kind is not np.ndarray:
        # Per tensor, not per layout: the device, a negative view's pending math, and
        # memory at all (a ZeroTensor view's data_ptr is an offset from 0).
        if not value.is_cpu or value.is_neg() or value._is_zerotensor():
            return None
        if not entry.raw:  # dense: its bytes start at its first element
            try:
                bits = pa.foreign_buffer(value.data_ptr(), entry.nbytes, value)
            except RuntimeError:  # no storage (functorch wrappers): the full path says so
                return None
        else:
            bits = _numpy_or_none(value)
            if bits is None:
                return None
    try:
        if not entry.raw:
            if kind is np.ndarray:
                if entry.perm is not None:
                    bits = bits.transpose(entry.perm)
                bits = pa.py_buffer(bits)
            array = pa.Array.from_buffers(entry.arrow_type, entry.length, [None, bits])
            entry.state.before_send(meta, entry.nbytes)
            node.send_output(output_id, array, meta)
            return INLINE
        if entry.perm is not None:
            bits = bits.transpose(entry.perm)
        entry.state.before_send(meta, entry.nbytes)
        with node.send_output_raw(output_id, entry.nbytes, meta) as sample:
            _tensor.write_into(sample, bits)
    except NotImplementedError:  # dora.testing.MockNode: nothing was sent
        entry.state.unsent()
        entry.state.no_raw_samples()
        return None
    except RuntimeError as exc:  # too big for the route dora chose: decided again, chunked
        if _learned_cap(entry.state, exc):
            return None
        raise
    return RAW


def _numpy_or_none(t: Any) -> np.ndarray | None:
    """``t.numpy()``: its bits with its strides, or None when torch refuses (autograd, other
    devices, conjugate or negative views, dtypes numpy lacks): the full path says why."""
    try:
        return t.numpy()
    except (RuntimeError, TypeError, ValueError):
        return None


def _learn(state: OutputState, value: Any, key: tuple[Any, ...]) -> _FastSend | None:
    """Decide for ``value`` as the full path would; an entry when that is one plain message.

    Inline: a dense tensor. Raw: compaction of a native-order payload (a byte swap, rare,
    keeps the full path). A torch tensor that is not a plain CPU view (a device, conjugate
    or negative bits, whose resolved copy has a layout of its own) teaches nothing; complex
    torch tensors, whose conjugate bit would need a check per message, keep the full path.
    """
    if state.pool is not None or state.facts.plain or state.facts.remote_rate:
        return FAST_SENDS.remember(key, None)  # loans, plain outputs, paced: the full path
    if type(value) is not np.ndarray and (
        not value.is_cpu or value.is_neg() or value.is_conj() or value._is_zerotensor()
    ):
        return None  # not remembered: the next plain tensor of this layout learns it
    try:
        p = _tensor.plan(value)
        routes = decide(state.facts, tensor_payload(state, value, p))
    except ArrowTensorError:  # the full path raises it; the next tensor may be fine
        return None
    raw = routes[0] == RAW and p.source.dtype.isnative
    inline = routes[0] == INLINE and not p.needs_copy
    complex_torch = p.header.framework == "torch" and p.header.dtype.name.startswith("complex")
    entry = None
    if (raw or inline) and p.nbytes and not complex_torch:
        width = 1 if raw else p.header.dtype.storage.itemsize
        if p.nbytes >= RAW_MIN_BYTES:  # the one pool check of this layout on this output
            check_pool(state, message_bytes(p.nbytes, width), payload_bytes=p.nbytes)
        perm = p.header.perm
        entry = _FastSend(
            state=state,
            raw=raw,
            arrow_type=_tensor.storage_type(p.header.dtype.storage),
            length=p.header.numel if raw else p.nbytes // width,
            nbytes=p.nbytes,
            perm=None if _layout.is_identity(perm) else perm,
            metadata=p.header.to_metadata(),
        )
    return FAST_SENDS.remember(key, entry)


# Loans ----------------------------------------------------------------------------------
def loan(
    node: Any,
    output_id: str,
    shape: Sequence[int],
    dtype: Any,
    framework: str | None = None,
    plain: bool | None = None,
) -> Any:
    """A writable tensor in ``output_id``'s shared-memory pool (see ``arrow_tensor.pool``).

    Where the pool cannot reach every receiver (``facts.shm_reason``), or on a plain output
    (``plain``, else ``ARROW_TENSOR_PLAIN_OUTPUTS``), an ordinary private tensor: the code
    stays the same and the value travels as a message.
    """
    state = state_of(node, output_id)
    plain = state.facts.plain if plain is None else plain
    if state.facts.shm_reason is not None or plain:
        return private_tensor(shape, dtype, framework)
    return state.shm_pool().loan(shape, dtype, framework)
