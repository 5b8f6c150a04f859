"""Loaned shared-memory tensors: fill a tensor where receivers will read it, send a handle.

Producer::

    from arrow_tensor import pool

    frame = pool.loan(node, "image", (1080, 1920, 3), torch.uint8)   # or a numpy dtype
    torch.randint(0, 255, frame.shape, out=frame)                   # fill in place / out=
    pool.send(node, "image", frame, {"frame": i})                   # only a handle travels

Receiver: ``at.decode(event["value"], event["metadata"])`` returns a zero-copy tensor over
the pool. It is read-only: numpy flags it so, and the pages are mapped read-only, so an
in-place write to a torch tensor faults instead of corrupting what other receivers read
(decode with ``writable=True`` for a private copy). Call ``pool.attach(node)`` once so that
a crashed producer's pool files are removed as soon as dora reports it.

The slot stays reserved until every receiver has freed its tensor (and all views of it), a
message dora dropped gives its slot back after a lease, and when all slots are busy for
``ARROW_TENSOR_SHM_WAIT`` the value goes as an ordinary message instead. See SPEC.md,
"Shared-memory pool handles".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .memory._host_mapped import close_mapped
from .memory._host_pool import close_pools
from .transport import _facts
from .transport._decide import SHM
from .transport._send import loan as _loan
from .transport._send import send as _send

__all__ = ["attach", "close", "loan", "send"]


def loan(
    node: Any,
    output_id: str,
    shape: Sequence[int],
    dtype: Any,
    *,
    framework: str | None = None,
) -> Any:
    """An uninitialised tensor living in the shared-memory pool of ``output_id``.

    Parameters
    ----------
    node:
        The dora ``Node`` that will send it.
    output_id:
        The output it will be sent on (each output has its own pool).
    shape, dtype:
        C-ordered shape; a numpy dtype, a torch dtype or a wire dtype name.
    framework:
        ``"numpy"`` or ``"torch"``; by default torch for a torch dtype, else numpy.

    Returns
    -------
    A writable ``numpy.ndarray`` or ``torch.Tensor``. When the output has a receiver on
    another machine, or no slot frees up in time, it is an ordinary private tensor: the code
    stays the same, ``send`` then copies.

    Raises
    ------
    UnsupportedTensorError
        For a dtype, framework or shape no receiver could view.
    """
    return _loan(node, output_id, shape, dtype, framework)


def send(
    node: Any,
    output_id: str,
    value: Any,
    metadata: Mapping[str, Any] | None = None,
    *,
    checksum: bool = False,
) -> str:
    """Send a tensor on ``output_id`` through its pool.

    A tensor from ``loan`` travels as a handle without any copy; another CPU tensor is
    copied once into a slot. Do not write to a loaned tensor after sending it.

    Parameters
    ----------
    node, output_id:
        The dora node and output.
    value:
        A numpy array or CPU torch tensor.
    metadata:
        Your own flat metadata (plain bool/int/float/str or homogeneous lists).
    checksum:
        Attach an xxh3-64 checksum, checked by ``decode(..., verify=True)``.

    Returns
    -------
    ``"shm"`` if a handle was sent, ``"message"`` if the value went as an ordinary message
    (a receiver on another machine, or the pool stayed full for ``ARROW_TENSOR_SHM_WAIT``).
    """
    route = _send(node, output_id, value, metadata, checksum=checksum, transport=SHM)
    return "shm" if route == SHM else "message"


def attach(node: Any) -> None:
    """Receiver side: learn of crashed producers through ``node`` (dora's extension table).

    ``arrow_tensor.node.Node`` does this itself; call it once when you drive a plain
    ``dora.Node`` and decode shared-memory handles.
    """
    _facts.attach(node)


def close() -> None:
    """Remove this process's pool files now (also done at exit); loaned tensors stay valid."""
    close_pools()
    close_mapped()
