"""The public verbs: ``encode`` picks the codec for a value, ``decode`` for a message kind."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa

from . import _codec, _schema
from ._errors import MetadataError

# Message kind (``at.kind``) -> (private module, function(array, meta, writable, verify)).
# Modules are imported on first use so that ``import arrow_tensor`` stays light.
_DECODERS: dict[str, tuple[str, str]] = {
    _schema.KIND_TENSOR: ("._codec", "decode_tensor"),
    "tree": ("._tree", "decode_tree"),
    _schema.KIND_CHUNK: ("._chunks", "decode_chunk"),
    "shm": ("._shm", "decode_shm"),
    "cuda": ("._cuda_ipc", "decode_cuda"),
}
_resolved: dict[str, Callable[..., Any]] = {}


def encode(x: Any, checksum: bool = False) -> tuple[pa.Array, dict[str, Any]]:
    """Encode a tensor as a 1-D Arrow array plus flat metadata.

    Parameters
    ----------
    x:
        A ``torch.Tensor`` on the CPU or a ``numpy.ndarray`` of any supported dtype and
        layout; or a dict / list / tuple nesting them with int, float, bool, str and None
        leaves (a structured payload: one array, see SPEC.md). A torch CUDA tensor, CuPy
        array or ``pyarrow.cuda.CudaBuffer`` becomes a CUDA IPC descriptor for one
        receiver on this machine: no payload bytes leave the GPU (SPEC.md, "CUDA IPC
        descriptors"; ``_transport.send`` addresses every receiver of an output).
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
    from ._cuda_backend import is_device_array

    if is_device_array(x):  # torch CUDA / cupy / pyarrow.cuda: an IPC descriptor, no payload
        from ._cuda_ipc import encode_cuda

        return encode_cuda(x, checksum=checksum)
    if isinstance(x, (dict, list, tuple)):
        from ._tree import encode_tree

        return encode_tree(x, checksum=checksum)
    from ._codec import encode_tensor

    return encode_tensor(x, checksum=checksum)


def decode(
    array: Any,
    metadata: Mapping[str, Any],
    writable: bool = False,
    verify: bool = False,
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
        Check the ``at.checksum`` written by ``encode(..., checksum=True)``; a message
        without one raises ``ChecksumError``.
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
    if not (writable or verify or device):
        value = _codec.fast_decode(array, metadata)
        if value is not None:
            return value
    meta = _schema.check_envelope(metadata)
    kind = _schema.require(meta, _schema.KEY_KIND, str)
    target = _DECODERS.get(kind)
    if target is None:
        raise MetadataError(
            f"unknown message kind {kind[:40]!r}; this decoder reads {sorted(_DECODERS)}"
        )
    decoder = _resolved.get(kind)
    if decoder is None:
        module = importlib.import_module(target[0], __package__)
        decoder = _resolved[kind] = getattr(module, target[1])
    if device is None:
        return decoder(array, meta, writable=writable, verify=verify)
    from ._cuda_ipc import decode_on_device

    return decode_on_device(decoder, array, meta, writable, verify, device)
