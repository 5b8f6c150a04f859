"""The ways of moving a tensor between dora nodes that ``make bench`` compares.

Each method is one ``Method`` entry in ``METHODS``: how the sender puts a torch tensor on an
output, and how the receiver turns the event back into a tensor it can use. Adding a
transport to the benchmark is adding one entry here.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

SINGLE_MESSAGE_MAX = 240 << 20
"""A float32 array of this size still fits dora's 256 MiB message (with its validity bitmap)."""


@dataclass(frozen=True)
class Method:
    """One way to send a tensor: ``send(node, output, tensor, metadata)`` and its receiver."""

    name: str
    label: str
    send: Callable[[Any, str, Any, dict[str, Any]], str | None]
    """Returns the transport it took when the library chose one (shown in the table)."""
    make_receiver: Callable[[], Callable[[pa.Array, dict[str, Any]], Any | None]]
    prepare: Callable[[Any], Any] = field(default=lambda t: t)
    """Done once per tensor before timing (raw dora gets its contiguous numpy array here)."""
    min_bytes: int = 0
    max_bytes: int | None = SINGLE_MESSAGE_MAX
    layouts: tuple[str, ...] | None = None
    """Layouts this method is meaningful for (None: all)."""
    """Largest payload tried; bigger ones are reported as not possible (dora's message cap)."""


# --- raw dora: the floor. A contiguous numpy array, pa.array, send_output. ----------------


def _raw_send(node: Any, output: str, x: np.ndarray, meta: dict[str, Any]) -> None:
    node.send_output(output, pa.array(x.reshape(-1)), {**meta, "shape": list(x.shape)})


def _raw_receiver() -> Callable[[pa.Array, dict[str, Any]], Any]:
    def receive(value: pa.Array, meta: dict[str, Any]) -> Any:
        return value.to_numpy(zero_copy_only=True).reshape(meta["shape"])

    return receive


def _contiguous_numpy(t: Any) -> np.ndarray:
    return t.contiguous().numpy()


def _numpy_view(t: Any) -> np.ndarray:
    """The tensor's own memory and strides as numpy (no copy): numpy in, numpy out."""
    return t.numpy()


# --- naive torch: what a node writes without a library. -----------------------------------


def _naive_send(node: Any, output: str, t: Any, meta: dict[str, Any]) -> None:
    arr = t.contiguous().numpy()
    node.send_output(output, pa.array(arr.reshape(-1)), {**meta, "shape": list(t.shape)})


def _naive_receiver() -> Callable[[pa.Array, dict[str, Any]], Any]:
    import torch

    def receive(value: pa.Array, meta: dict[str, Any]) -> Any:
        return torch.from_dlpack(value).reshape(meta["shape"])

    return receive


# --- pickle protocol 5, in-band, as serving frameworks do. ---------------------------------


def _pickle_send(node: Any, output: str, t: Any, meta: dict[str, Any]) -> None:
    node.send_output(output, pickle.dumps(t, protocol=5), meta)


def _pickle_receiver() -> Callable[[pa.Array, dict[str, Any]], Any]:
    def receive(value: pa.Array, meta: dict[str, Any]) -> Any:
        return pickle.loads(value.buffers()[1])

    return receive


# --- arrow-tensor, one entry per transport. -----------------------------------------------


def _at_send(transport: str | None) -> Callable[[Any, str, Any, dict[str, Any]], str]:
    import arrow_tensor as at

    def send(node: Any, output: str, t: Any, meta: dict[str, Any]) -> str:
        return at.send(node, output, t, meta, transport=transport)

    return send


def _at_receiver() -> Callable[[pa.Array, dict[str, Any]], Any]:
    from arrow_tensor import Receiver

    return Receiver().receive


def _shm_send(node: Any, output: str, t: Any, meta: dict[str, Any]) -> str:
    from arrow_tensor import pool

    return pool.send(node, output, t, meta)


def _loan_send(node: Any, output: str, t: Any, meta: dict[str, Any]) -> str:
    """The producer loans a slot and computes into it; only writing one element is timed."""
    from arrow_tensor import pool

    loaned = pool.loan(node, output, tuple(t.shape), t.dtype)
    loaned.view(-1)[0] = 1.0
    return pool.send(node, output, loaned, meta)


def output_of(method: str) -> str:
    """The sender's output for ``method``: separate outputs keep separate pools."""
    return f"data_{method}"


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "raw_dora",
            "raw dora (contiguous numpy)",
            _raw_send,
            _raw_receiver,
            prepare=_contiguous_numpy,
        ),
        Method("naive_torch", "naive torch (.contiguous().numpy())", _naive_send, _naive_receiver),
        Method("pickle5", "pickle protocol 5", _pickle_send, _pickle_receiver),
        Method("at", "arrow-tensor (auto)", _at_send(None), _at_receiver, max_bytes=None),
        Method(
            "at_numpy",
            "arrow-tensor (auto), numpy in and out",
            _at_send(None),
            _at_receiver,
            prepare=_numpy_view,
            max_bytes=None,
        ),
        Method("at_inline", "arrow-tensor inline", _at_send("inline"), _at_receiver),
        Method(
            "at_raw", "arrow-tensor raw one-copy", _at_send("raw"), _at_receiver, min_bytes=4096
        ),
        Method(
            "at_chunked",
            "arrow-tensor chunked",
            _at_send("chunked"),
            _at_receiver,
            min_bytes=16 << 20,
            max_bytes=None,
        ),
        Method(
            "at_shm", "arrow-tensor shm pool (one copy)", _shm_send, _at_receiver, max_bytes=None
        ),
        Method(
            "at_loan",
            "arrow-tensor shm loan (no copy)",
            _loan_send,
            _at_receiver,
            max_bytes=None,
            layouts=("contiguous",),
        ),
    ]
}
"""Every method ``make bench`` runs, in the order of its table."""
