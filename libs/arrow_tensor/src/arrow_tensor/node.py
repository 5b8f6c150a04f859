"""Write a dora node in a few lines: the library owns the event loop.

A node is a loop over decoded inputs plus ``send``::

    from arrow_tensor.node import Node

    node = Node()
    for input_id, value, metadata in node:
        node.send("out", value * 2, **metadata)

or, for the common one-input-one-output node, a function::

    from arrow_tensor.node import run

    def double(value, metadata):
        return value * 2          # sent on "out" with the input's metadata

    if __name__ == "__main__":
        run(double)

Note [How the loop ends]
dora delivers ``STOP`` and ``INPUT_CLOSED`` *ahead of* inputs still queued for the node, and a
timer input (``dora/timer/...``) never closes. So the loop neither ends on the first control
event nor waits for timers: once ``STOP`` arrives, or every data input (an input whose
source is not a dora timer) is closed, it keeps draining until dora's stream ends or no data
input arrives for ``drain_timeout`` seconds, then ends. Every queued message is delivered.

Messages that cannot be decoded (not ours, malformed, failed checksum) are reported on
stderr with the input id and the reason, counted in ``Node.errors``, and skipped: one bad
message never stops a node. Timer inputs and inputs listed in ``raw_inputs`` are passed
through undecoded (timers as ``None``, raw inputs as the ``pyarrow`` array).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._errors import ArrowTensorError
from .codec import _schema
from .transport import _facts
from .transport._messages import Receiver
from .transport._send import loan, send

__all__ = ["Input", "Node", "run"]

_TIMER_PREFIX = "dora/timer/"


@dataclass(frozen=True)
class Input:
    """One decoded input; unpacks as ``input_id, value, metadata``.

    Attributes
    ----------
    id:
        The input id, as named under ``inputs:`` in the dataflow YAML.
    value:
        The decoded value (tensor or structure), ``None`` for a timer tick, the raw
        ``pyarrow`` array for inputs listed in ``raw_inputs``.
    metadata:
        The sender's own metadata: without arrow_tensor's ``at.`` keys and dora's
        ``timestamp``, so it can be forwarded as is with ``node.send(..., **metadata)``.
    timestamp:
        dora's timestamp of the message (``None`` where dora gives none, as in MockNode).
    """

    id: str
    value: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    timestamp: Any = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.id, self.value, self.metadata))


def _source_of(spec: Any) -> str:
    if isinstance(spec, Mapping):
        spec = spec.get("source", "")
    return spec if isinstance(spec, str) else ""


class Node:
    """A ``dora.Node`` that decodes inputs, encodes outputs and ends cleanly.

    Parameters
    ----------
    node:
        The dora node to drive; by default a new ``dora.Node()``. Pass a
        ``dora.testing.MockNode`` in tests.
    writable:
        Decode into private writable copies instead of read-only zero-copy views.
    verify:
        Verify checksums of received messages (a message without one is an error).
    checksum:
        Attach checksums to sent messages.
    raw_inputs:
        Input ids delivered undecoded (their ``value`` is the received ``pyarrow`` array).
    drain_timeout:
        Seconds to wait for queued inputs after the end was signalled (see the module note).
    """

    def __init__(
        self,
        node: Any = None,
        *,
        writable: bool = False,
        verify: bool = False,
        checksum: bool = False,
        raw_inputs: Iterable[str] = (),
        drain_timeout: float = 0.5,
    ) -> None:
        if node is None:
            from dora import Node as DoraNode

            node = DoraNode()
        self.dora = node
        self.checksum = checksum
        self.errors: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.closed: set[str] = set()
        self.finished = False
        self._writable, self._verify = writable, verify
        self._receivers: dict[str, Receiver] = {}
        self._raw = set(raw_inputs)
        self._drain_timeout = drain_timeout
        self._draining = False
        self._drain_deadline = 0.0
        self._timers, self._data_inputs = self._classify_inputs()
        _facts.attach(node)  # learn of crashed producers, so their shared memory is unlinked

    def _classify_inputs(self) -> tuple[set[str], set[str]]:
        try:
            inputs = dict(self.dora.node_config().get("inputs") or {})
        except Exception:  # a stand-in without node_config: learn nothing, end on STOP only
            inputs = {}
        timers = {k for k, v in inputs.items() if _source_of(v).startswith(_TIMER_PREFIX)}
        return timers, set(inputs) - timers

    def __iter__(self) -> Iterator[Input]:
        while (item := self.recv()) is not None:
            yield item

    def recv(self, timeout: float | None = None) -> Input | None:
        """The next input, or ``None`` when ``timeout`` seconds pass or the stream ended.

        After ``None``, ``node.finished`` tells the two apart.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if self._draining:
                wait = self._drain_deadline - time.monotonic()
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
            else:
                wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                if self._draining and time.monotonic() >= self._drain_deadline:
                    self._finish()
                return None
            event = self.dora.next(timeout=wait) if wait is not None else self.dora.next()
            if event is None:
                self._finish()
                return None
            item = self._handle(event)
            if item is not None:
                return item
        return None

    def _handle(self, event: Mapping[str, Any]) -> Input | None:
        kind = event.get("type")
        if kind == "INPUT":
            input_id = event.get("id", "")
            if input_id in self._timers:
                return None if self._draining else Input(input_id, None, {}, None)
            if self._draining:
                self._drain_deadline = time.monotonic() + self._drain_timeout
            return self._decode(input_id, event)
        if kind == "INPUT_CLOSED":
            self.closed.add(event.get("id", ""))
            if self._data_inputs and self._data_inputs <= self.closed:
                self._start_draining()
        elif kind == "STOP":
            self._start_draining()
        elif kind == "ERROR" and "Timeout" not in str(event.get("error", "")):
            print(
                f"arrow_tensor.node: dora error: {str(event.get('error'))[:300]}", file=sys.stderr
            )
        return None

    def _finish(self) -> None:
        self.finished = True
        for input_id, receiver in self._receivers.items():
            try:  # a value still incomplete at the end (a lost chunk) is reported, not hidden
                receiver.close()
            except ArrowTensorError as exc:
                self._report(input_id, exc)

    def _report(self, input_id: str, exc: ArrowTensorError) -> None:
        self.errors[input_id] += 1
        print(
            f"arrow_tensor.node: skipped a message on input {input_id!r} "
            f"({self.errors[input_id]} so far): {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )

    def _start_draining(self) -> None:
        if not self._draining:
            self._draining = True
            self._drain_deadline = time.monotonic() + self._drain_timeout

    def _decode(self, input_id: str, event: Mapping[str, Any]) -> Input | None:
        raw_meta = event.get("metadata") or {}
        metadata = {
            k: v
            for k, v in raw_meta.items()
            if not k.startswith(_schema.PREFIX) and k != "timestamp"
        }
        stamp = raw_meta.get("timestamp")
        if input_id in self._raw:
            self.received[input_id] += 1
            return Input(input_id, event.get("value"), metadata, stamp)
        receiver = self._receivers.get(input_id)
        if receiver is None:
            receiver = Receiver(writable=self._writable, verify=self._verify)
            self._receivers[input_id] = receiver
        try:
            value = receiver.receive(event.get("value"), raw_meta)
        except ArrowTensorError as exc:
            self._report(input_id, exc)
            return None
        if value is None:  # one part of a multi-message value; the rest is still coming
            return None
        self.received[input_id] += 1
        return Input(input_id, value, metadata, stamp)

    def empty(self, output: str, shape: Sequence[int], dtype: Any) -> Any:
        """A writable tensor in ``output``'s shared-memory pool, to fill and then ``send``.

        Sending it moves only a handle (see ``arrow_tensor.pool``); where the pool cannot be
        used (a receiver on another machine, no free slot) it is an ordinary tensor and
        ``send`` copies it. ``dtype`` is a torch or numpy dtype, or a wire dtype name.
        """
        return loan(self.dora, output, shape, dtype)

    def send(self, output: str, value: Any, **metadata: Any) -> str:
        """Encode ``value`` (tensor or structure) and send it on ``output``.

        Parameters
        ----------
        output:
            The output id, as listed under ``outputs:`` in the dataflow YAML.
        value:
            A tensor, or a dict / list / tuple of tensors and scalars.
        **metadata:
            Your own keys (str, int, float, bool or homogeneous lists of them).

        Returns
        -------
        str
            The transport the library chose (``"inline"``, ``"raw"``, ``"chunked"``...).

        Raises
        ------
        UnsupportedTensorError, MetadataError
            For a value or metadata dora cannot carry; nothing is sent.
        """
        return send(self.dora, output, value, metadata, checksum=self.checksum)


def run(
    fn: Callable[[Any, dict[str, Any]], Any],
    *,
    output: str = "out",
    inputs: Iterable[str] | None = None,
    node: Any = None,
    **options: Any,
) -> Node:
    """Run a one-input-one-output node: call ``fn`` on every input and send its result.

    Parameters
    ----------
    fn:
        ``fn(value, metadata) -> result``. ``metadata`` is a mutable copy of the input's own
        metadata: what ``fn`` leaves in it is sent with the result, so per-item keys (a frame
        id) flow through. Returning ``None`` sends nothing.
    output:
        The output id results are sent on.
    inputs:
        Input ids to process (default: every input except timers).
    node:
        The dora node (default ``dora.Node()``; a ``MockNode`` in tests).
    **options:
        Passed to :class:`Node` (``writable``, ``verify``, ``checksum``...).

    Returns
    -------
    The :class:`Node`, after the stream ended (its ``errors`` and ``received`` counters).
    """
    wrapper = Node(node, **options)
    wanted = None if inputs is None else set(inputs)
    for item in wrapper:
        if item.value is None or (wanted is not None and item.id not in wanted):
            continue
        metadata = dict(item.metadata)
        result = fn(item.value, metadata)
        if result is not None:
            wrapper.send(output, result, **metadata)
    return wrapper
