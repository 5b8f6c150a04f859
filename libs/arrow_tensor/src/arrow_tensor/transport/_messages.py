"""Messages in and out of the codec and memory rooms: ``encode``, ``decode``, ``Receiver``.

One table maps each message kind (``at.kind``) to its decoder; ``decode`` and
``Receiver.receive`` both dispatch through it, after the codec's fast path for a header
seen before. ``Receiver`` adds the one stateful kind, chunks (``_chunks``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from .. import config
from .._errors import MetadataError, NotATensorMessageError
from ..codec import _nodehub, _plain, _schema, _tensor, _tree
from ..memory._host_mapped import decode_shm, probe_pool
from ..memory.cuda._ipc import encode_cuda
from ..memory.cuda._receive import decode_cuda, decode_on_device
from ..memory.cuda._select import is_device_array
from . import _chunks

VERIFY_MODES = (False, True, "auto")
"""``verify`` values: never, always (a message without a checksum is an error), or
``"auto"``: whenever the message carries one."""

Decoder = Callable[..., Any]
"""``decoder(array, meta, writable=..., verify=...)`` of one message kind."""

DECODERS: dict[str, Decoder] = {
    _schema.KIND_TENSOR: _tensor.decode_tensor,
    _schema.KIND_TREE: _tree.decode_tree,
    _schema.KIND_CHUNK: _chunks.decode_chunk,
    _schema.KIND_SHM: decode_shm,
    _schema.KIND_CUDA: decode_cuda,
    _schema.KIND_PLAIN: _plain.decode_plain,
}
"""Message kind -> its decoder: the one dispatch of every receiving path."""
FOREIGN_MODES = ("error", "decode", "raw")
"""What a ``Receiver`` does with a message some other node wrote (Note [Foreign messages]
in ``codec._nodehub``): raise ``NotATensorMessageError``, decode it by the node-hub
conventions, or return its ``pyarrow`` array as received."""

log = logging.getLogger("arrow_tensor")


def encode(x: Any, checksum: bool = False) -> tuple[pa.Array, dict[str, Any]]:
    """Encode a tensor as a 1-D Arrow array plus flat metadata.

    Parameters
    ----------
    x:
        A ``torch.Tensor`` on the CPU or a ``numpy.ndarray`` of any supported dtype and
        layout; or a dict / list / tuple nesting them with int, float, bool, str and None
        leaves (a structured payload: one array, see SPEC.md); or a plain value, sent as
        the Arrow array any dora node expects (a ``pyarrow.Array``; a ``str`` as a
        one-element string array; ``bytes`` as uint8; a flat list of only ints, only floats
        or only strs as one Arrow array; SPEC.md, Plain values). A torch CUDA tensor, CuPy
        array or ``pyarrow.cuda.CudaBuffer`` becomes a CUDA IPC descriptor for one
        receiver on this machine: no payload bytes leave the GPU (SPEC.md, "CUDA IPC
        descriptors"; ``send`` addresses every receiver of an output).
    checksum:
        Attach an xxh3-64 checksum of dtype, shape, layout and content (``at.checksum``),
        checked by ``decode(..., verify=True)``.

    Returns
    -------
    (array, metadata)
        ``array`` is a 1-D fixed-width ``pyarrow`` array: over the tensor's own memory
        when its layout is dense (no copy), else over one compacted copy. ``metadata`` is a
        flat dict of ``at.``-prefixed keys that dora carries intact; add your own keys
        beside them.

    Raises
    ------
    UnsupportedTensorError
        For anything without an exact wire form; the message names the alternative.
    """
    if is_device_array(x):  # torch CUDA / cupy / pyarrow.cuda: an IPC descriptor, no payload
        return encode_cuda(x, checksum=checksum)
    if _plain.plain_form(x) is not None:
        return _plain.encode_plain(x, checksum=checksum)
    if isinstance(x, (dict, list, tuple)):
        return _tree.encode_tree(x, checksum=checksum)
    return _tensor.encode_tensor(x, checksum=checksum)


def checked_verify(verify: object) -> bool | str:
    """``verify`` if it is one of ``VERIFY_MODES``, else a ValueError naming them."""
    if verify is True or verify is False or verify == "auto":
        return verify  # type: ignore[return-value]
    raise ValueError(f"verify must be True, False or 'auto', got {verify!r:.40}")


def wants_check(verify: bool | str, meta: object) -> bool:
    """Whether a message with ``meta`` is checked under ``verify`` (see ``VERIFY_MODES``)."""
    if verify is True:
        return True
    if verify != "auto":
        return False
    return (type(meta) is dict or isinstance(meta, Mapping)) and _schema.KEY_CHECKSUM in meta


def decode(
    array: Any,
    metadata: Mapping[str, Any],
    writable: bool = False,
    verify: bool | str = False,
    device: str | None = None,
) -> Any:
    """Rebuild exactly what ``encode`` was given.

    Parameters
    ----------
    array, metadata:
        What ``encode`` returned, or what dora delivered (``event["value"]``,
        ``event["metadata"]``). Keys arrow_tensor does not own (dora's ``timestamp``,
        your own) are ignored.
    writable:
        ``False`` (default): a zero-copy view of the received buffer that must not be
        written; numpy results are flagged read-only, torch has no such flag (see the
        read-only contract in the README). ``True``: a private, writable copy with the
        same layout.
    verify:
        ``True``: check the ``at.checksum`` written by ``encode(..., checksum=True)``; a
        message without one raises ``ChecksumError``. ``"auto"``: check it when the message
        carries one. ``False`` (default): do not check.
    device:
        ``None``: where the data is (a CUDA message gives a zero-copy device tensor, a host
        message a host tensor). ``"cpu"``: a host copy. ``"cuda"`` / ``"cuda:N"``: on that
        device of this process (zero copy for a CUDA message from that device).

    Returns
    -------
    The same kind that was encoded (torch in, torch out; numpy in, numpy out) with the same
    dtype, shape and bits, and for dense layouts the same strides.

    Raises
    ------
    NotATensorMessageError, VersionError, MetadataError, PayloadError, ChecksumError
        Subclasses of ``ArrowTensorError``; the message says what was received and what
        was expected.
    """
    if verify is False or verify is True:
        check = verify
    else:
        check = wants_check(checked_verify(verify), metadata)
    if not (writable or check or device):
        value = _tensor.fast_decode(array, metadata)
        if value is not None:
            if _schema.KEY_SHM_PROBE in metadata:
                probe_pool(metadata)
            return value
    meta = _schema.check_envelope(metadata)
    if _schema.KEY_SHM_PROBE in meta:
        probe_pool(meta)
    return _decode_kind(array, meta, writable, check, device)


def _decode_kind(
    array: Any, meta: Mapping[str, Any], writable: bool, verify: bool, device: str | None
) -> Any:
    """The decoder of ``meta``'s kind, on ``meta`` already accepted by ``check_envelope``."""
    kind = _schema.require(meta, _schema.KEY_KIND, str)
    decoder = DECODERS.get(kind) if type(kind) is str else None
    if decoder is None:
        raise MetadataError(
            f"unknown message kind {kind[:40]!r}; this decoder reads {sorted(DECODERS)}"
        )
    if device is None:
        return decoder(array, meta, writable=writable, verify=verify)
    return decode_on_device(decoder, array, meta, writable, verify, device)


class Receiver:
    """Turns received (array, metadata) pairs into decoded values.

    Stateful so that values sent in several chunks can be reassembled: ``receive`` returns
    ``None`` while a value is incomplete.

    Feed it every message of one input, in order; it returns each value once it is whole.

    Parameters
    ----------
    writable:
        Return private writable values instead of read-only-by-contract views.
    verify:
        ``True``: check the ``at.checksum`` of every value (one without is an error);
        ``"auto"``: of every value that carries one; ``False``: never.
    max_transfer_bytes:
        Largest chunked value accepted (default: min(64 GiB, physical memory)).
    max_transfers:
        Chunked values reassembled at once (one per sending output, normally).
    device:
        Where the values should be (``decode``'s ``device``): ``None`` where they are,
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    foreign:
        Messages written by nodes that do not use arrow_tensor (dora's node-hub):
        ``"error"`` (default) raises ``NotATensorMessageError``; ``"decode"`` gives what the
        sender meant (images as ``(H, W, C)`` numpy views, numeric arrays as 1-D views, the
        rest as the ``pyarrow`` array; see the README's node-hub section); ``"raw"`` gives
        the ``pyarrow`` array as received.
    on_fallback:
        Called as ``on_fallback(reason, text)`` whenever a foreign message is delivered
        other than its convention promised (a JPEG frame without OpenCV installed). By
        default the first time of each reason is logged (``logging``, "arrow_tensor").

    Attributes
    ----------
    fallbacks:
        How many foreign messages fell back, by reason.
    """

    def __init__(
        self,
        writable: bool = False,
        verify: bool | str = False,
        *,
        max_transfer_bytes: int | None = None,
        max_transfers: int = _chunks.DEFAULT_MAX_TRANSFERS,
        device: str | None = None,
        foreign: str = "error",
        on_fallback: Callable[[str, str], None] | None = None,
    ) -> None:
        if foreign not in FOREIGN_MODES:
            raise ValueError(f"foreign must be one of {FOREIGN_MODES}, got {foreign!r:.40}")
        self.writable = writable
        self.verify = checked_verify(verify)
        self.device = device
        self.foreign = foreign
        self.fallbacks: Counter[str] = Counter()
        self._on_fallback = on_fallback
        idle_s = config.setting(
            "ARROW_TENSOR_CHUNK_TIMEOUT", config.duration, _chunks.DEFAULT_IDLE_S
        )
        self._chunks = _chunks.Reassembler(max_transfer_bytes, max_transfers, idle_s)

    @property
    def pending(self) -> int:
        """Chunked values started and not yet complete."""
        return self._chunks.pending

    def next_expiry(self) -> float | None:
        """``time.monotonic()`` when an incomplete chunked value times out, or None."""
        return self._chunks.next_expiry()

    def expired(self) -> list[str]:
        """Drop chunked values that got no chunk for ``ARROW_TENSOR_CHUNK_TIMEOUT`` (10 s):
        one was lost. Returns what was dropped, one sentence each (nothing is raised)."""
        return self._chunks.expired()

    def receive(self, array: Any, metadata: Mapping[str, Any]) -> Any | None:
        """Decode one message, or take one chunk; ``None`` until a chunked value is complete.

        Raises
        ------
        ArrowTensorError
            A subclass saying what was wrong: ``IncompleteTransferError`` for a chunked value
            that lost a chunk (only that value is dropped), ``MetadataError``,
            ``PayloadError``, ``ChecksumError`` for bad messages.
        """
        verify = self.verify
        if verify is False or verify is True:
            check = verify
        elif type(metadata) is dict:  # "auto", on what dora delivers
            check = _schema.KEY_CHECKSUM in metadata
        else:
            check = wants_check(verify, metadata)
        if not check:
            if not (self.writable or self.device):
                value = _tensor.fast_decode(array, metadata)
                if value is not None:
                    if _schema.KEY_SHM_PROBE in metadata:
                        probe_pool(metadata)
                    return value
        try:
            meta = _schema.check_envelope(metadata)
        except NotATensorMessageError:
            if self.foreign == "error" or not _nodehub.is_foreign(metadata):
                raise
            return self._foreign(array, metadata)
        if _schema.KEY_SHM_PROBE in meta:
            probe_pool(meta)
        kind = meta.get(_schema.KEY_KIND)
        if type(kind) is not str or kind != _schema.KIND_CHUNK:
            return _decode_kind(array, meta, self.writable, check, self.device)
        done = self._chunks.add(array, meta)
        if done is None:
            return None
        value_array, value_meta = done
        value_meta = _schema.check_envelope(value_meta)
        check = wants_check(verify, value_meta)
        if self.device is None and value_meta.get(_schema.KEY_KIND) == _schema.KIND_TENSOR:
            # The reassembly buffer is already private: a lone tensor over it needs no second
            # copy, only numpy's flag, so it is viewed (the fast path's views come from
            # pyarrow, read-only for good).
            value = _tensor.decode_tensor(value_array, value_meta, False, check)
            if self.writable and isinstance(value, np.ndarray) and not value.flags.writeable:
                try:
                    value.flags.writeable = True
                except ValueError:
                    value = np.array(value, order="K", copy=True)
            return value
        # A structure is copied leaf by leaf, as decode does.
        return _decode_kind(value_array, value_meta, self.writable, check, self.device)

    def _foreign(self, array: Any, metadata: Mapping[str, Any]) -> Any:
        if self.foreign == "raw":
            return array
        value, fallback = _nodehub.decode_foreign(array, metadata, self.writable)
        if fallback is not None:
            self.fallbacks[fallback.reason] += 1
            if self._on_fallback is not None:
                self._on_fallback(fallback.reason, fallback.text)
            elif self.fallbacks[fallback.reason] == 1:
                log.warning("%s (logged once)", fallback.text)
        return value

    def close(self) -> None:
        """End of stream: drop incomplete chunked values, raising if there were any."""
        self._chunks.close()
