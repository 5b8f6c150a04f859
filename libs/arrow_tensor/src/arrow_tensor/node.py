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

Messages from nodes that do not use arrow_tensor (dora's node-hub cameras, array senders)
are decoded by their conventions (``foreign``; Note [Foreign messages] in
``codec._nodehub``): images as ``(H, W, C)`` numpy views, numeric arrays as 1-D views,
the rest as the ``pyarrow`` array. Messages that cannot be decoded (malformed, a failed
checksum) are skipped: one bad message never stops a node. The first skip or fallback of
each input and reason is reported on stderr; later ones are only counted (``Node.errors``,
``Node.fallbacks``), and the end of the stream prints a summary. Timer inputs and inputs
listed in ``raw_inputs`` are passed through undecoded (timers as ``None``, raw inputs as
the ``pyarrow`` array).
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._errors import ArrowTensorError, IncompleteTransferError
from .codec import _schema
from .transport import _facts, _sequence
from .transport._messages import FOREIGN_MODES, Receiver, checked_verify
from .transport._send import loan, send
from .transport._startup import Acks, hold_seconds, zenoh_overlay

__all__ = ["Input", "Node", "dora_node", "run"]

_TIMER_PREFIX = "dora/timer/"
_PENDING_MAX = 100_000
"""Events taken off dora's queue while a send waits (Note [Start-up hold]), at most."""


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


def dora_node() -> Any:
    """A new ``dora.Node()``, its zenoh session told to wait rather than drop a message.

    dora's data plane drops a message whose sending queue stays busy for over a millisecond
    (a node short of CPU at start-up); this node waits up to ``ARROW_TENSOR_ZENOH_DROP_WAIT``
    (Note [Start-up hold] in ``transport._startup``). ``Node()`` makes its node this way;
    call it where you drive a ``dora.Node`` yourself. A deployment that configures zenoh
    itself (``DORA_ZENOH_CONFIG_OVERLAY``, ``ZENOH_CONFIG``) is left as it is.
    """
    from dora import Node as DoraNode

    zenoh_overlay()
    return DoraNode()


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
        ``"auto"`` (default): verify the checksum of every message that carries one;
        ``True``: of every message (one without is skipped as an error); ``False``: never.
    checksum:
        Attach checksums to sent messages.
    raw_inputs:
        Input ids delivered undecoded (their ``value`` is the received ``pyarrow`` array).
    drain_timeout:
        Seconds to wait for queued inputs after the end was signalled (see the module note).
    foreign:
        Messages from nodes without arrow_tensor: ``"decode"`` (default) by the node-hub
        conventions, ``"raw"`` as the received ``pyarrow`` array, ``"error"`` skipped. A
        dict sets it per input id, ``"*"`` for the others.
    plain_outputs:
        Outputs whose tensors go the way consumers without arrow_tensor read them (C order,
        the dtype's own Arrow type, image keys, never a handle; see ``send``'s ``plain``):
        output ids, or ``"*"`` for all. Default: ``ARROW_TENSOR_PLAIN_OUTPUTS``.

    Attributes
    ----------
    errors:
        Messages skipped, by input id.
    fallbacks:
        Foreign messages delivered other than their convention promised (a JPEG frame
        without OpenCV), by ``(input id, reason)``.
    received:
        Values delivered, by input id.
    lost, reordered, duplicates:
        Messages that never arrived, arrived out of order, or arrived twice, by input id,
        from the senders' sequence numbers (Note [Sequence numbers] in
        ``transport._sequence``). The first of each on an input is logged as a warning
        with its likely cause; the end of the stream prints a summary.
    """

    def __init__(
        self,
        node: Any = None,
        *,
        writable: bool = False,
        verify: bool | str = "auto",
        checksum: bool = False,
        raw_inputs: Iterable[str] = (),
        drain_timeout: float = 0.5,
        foreign: str | Mapping[str, str] = "decode",
        plain_outputs: Iterable[str] | str | None = None,
    ) -> None:
        self._foreign = _foreign_modes(foreign)
        self._verify = checked_verify(verify)
        if isinstance(plain_outputs, str):
            plain_outputs = _facts.output_names(plain_outputs)
        self._plain = None if plain_outputs is None else frozenset(plain_outputs)
        if node is None:
            node = dora_node()
        self.dora = node
        self.checksum = checksum
        self.errors: Counter[str] = Counter()
        self.fallbacks: Counter[tuple[str, str]] = Counter()
        self.received: Counter[str] = Counter()
        self._skips: Counter[tuple[str, str]] = Counter()
        self._chunking: set[str] = set()
        """Inputs with a chunked value in progress (their receivers may time it out)."""
        self.closed: set[str] = set()
        self.finished = False
        self._writable = writable
        self._receivers: dict[str, Receiver] = {}
        self._raw = set(raw_inputs)
        self._drain_timeout = drain_timeout
        self._draining = False
        self._drain_deadline = 0.0
        self._specs = self._input_specs()
        self._timers = {
            k for k, v in self._specs.items() if _source_of(v).startswith(_TIMER_PREFIX)
        }
        self._data_inputs = set(self._specs) - self._timers
        self._sequences: dict[str, _sequence.Sequence] = {}
        self._said: set[tuple[str, str]] = set()
        self._pending: deque[Mapping[str, Any]] = deque()
        _facts.attach(node)  # learn of crashed producers, so their shared memory is unlinked
        node_id = _facts.own_node_id()
        queues = {i: _facts.queue_size(self._specs[i]) for i in sorted(self._data_inputs)}
        self._acks = Acks(node, node_id or "", queues if node_id else {}, hold_seconds())
        _facts.set_waiting(node, self._take_waiting)  # Note [Start-up hold]

    def _input_specs(self) -> dict[str, Any]:
        """The inputs as dora's node config gives them (id -> source or its mapping)."""
        try:
            return dict(self.dora.node_config().get("inputs") or {})
        except Exception:  # a stand-in without node_config: learn nothing, end on STOP only
            return {}

    @property
    def lost(self) -> Counter[str]:
        """Messages that never arrived (so far), by input id."""
        return Counter({i: s.lost for i, s in self._sequences.items() if s.lost})

    @property
    def reordered(self) -> Counter[str]:
        """Messages that arrived after a later one, by input id."""
        return Counter({i: s.reordered for i, s in self._sequences.items() if s.reordered})

    @property
    def duplicates(self) -> Counter[str]:
        """Messages that arrived twice, by input id."""
        return Counter({i: s.duplicates for i, s in self._sequences.items() if s.duplicates})

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
            expiry = self._chunk_expiry()  # wake up to drop a chunked value that lost a chunk
            if expiry is not None:
                until = max(expiry - time.monotonic(), 0.001)
                wait = until if wait is None else min(wait, until)
            event = self._next_event(wait)
            if expiry is not None:
                self._expire_chunks()
            if event is None:
                self._finish()
                return None
            item = self._handle(event)
            if item is not None:
                return item
        return None

    def _next_event(self, wait: float | None) -> Mapping[str, Any] | None:
        """The next event: one taken off dora's queue while a send waited, else dora's."""
        if self._pending:
            return self._pending.popleft()
        event = self.dora.next(timeout=wait) if wait is not None else self.dora.next()
        if event is not None and self._acks.active:
            self._took(event)
        return event

    def _took(self, event: Mapping[str, Any]) -> None:
        if event.get("type") == "INPUT":
            self._acks.took(event.get("id", ""))

    def _take_waiting(self) -> None:
        """While a send waits for a receiver to start (Note [Start-up hold]), take this
        node's own events off dora's queue, so that two nodes feeding each other never wait
        on each other; ``recv`` delivers them in order."""
        while len(self._pending) < _PENDING_MAX:
            try:
                event = self.dora.try_recv()
            except Exception:  # the stream ended, or a stand-in without try_recv
                return
            if event is None:
                return
            if self._acks.active:
                self._took(event)
            self._pending.append(event)

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

    def _track_chunks(self, input_id: str, receiver: Receiver) -> None:
        """Keep ``_chunking`` to the inputs with a chunked value in progress."""
        if receiver.pending:
            self._chunking.add(input_id)
        else:
            self._chunking.discard(input_id)

    def _chunk_expiry(self) -> float | None:
        if not self._chunking:  # the common case: nothing half-received, nothing to look at
            return None
        times = [self._receivers[i].next_expiry() for i in self._chunking]
        return min((t for t in times if t is not None), default=None)

    def _expire_chunks(self) -> None:
        for input_id in list(self._chunking):
            receiver = self._receivers[input_id]
            for text in receiver.expired():
                self._report(input_id, IncompleteTransferError(text))
            self._track_chunks(input_id, receiver)

    def _finish(self) -> None:
        self.finished = True
        self._acks.close()
        for input_id, seqs in sorted(self._sequences.items()):
            line = seqs.summary()
            if line is not None:
                self._warn(f"input {input_id!r} ({self._from(input_id)}): {line}")
        for input_id, receiver in self._receivers.items():
            try:  # a value still incomplete at the end (a lost chunk) is reported, not hidden
                receiver.close()
            except ArrowTensorError as exc:
                self._report(input_id, exc)
        for what, counts in (("skipped", self._skips), ("delivered raw", self.fallbacks)):
            for (input_id, reason), n in sorted(counts.items()):
                if n > 1:
                    _say(f"input {input_id!r}: {n} messages {what} ({reason})")

    def _report(self, input_id: str, exc: ArrowTensorError) -> None:
        self.errors[input_id] += 1
        reason = type(exc).__name__
        self._skips[(input_id, reason)] += 1
        if self._skips[(input_id, reason)] == 1:
            _say(
                f"skipped a message on input {input_id!r}: {reason}: {exc} (further "
                f"{reason} skips on this input are counted, not logged: Node.errors)"
            )

    def _fallback(self, input_id: str, reason: str, text: str) -> None:
        self.fallbacks[(input_id, reason)] += 1
        if self.fallbacks[(input_id, reason)] == 1:
            _say(f"input {input_id!r}: {text} (logged once; counted in Node.fallbacks)")

    def _start_draining(self) -> None:
        if not self._draining:
            self._draining = True
            self._drain_deadline = time.monotonic() + self._drain_timeout

    def _from(self, input_id: str) -> str:
        source = _source_of(self._specs.get(input_id, ""))
        return f"from {source}" if source else "source unknown"

    def _warn(self, text: str, topic: tuple[str, str] | None = None) -> None:
        """A warning through dora's log (or stderr); once per ``topic`` when one is given."""
        if topic is not None:
            if topic in self._said:
                return
            self._said.add(topic)
        text = f"arrow_tensor.node: {text}"
        try:
            self.dora.log_warn(text)
        except Exception:  # a stand-in without dora's log
            print(text, file=sys.stderr, flush=True)

    def _sequence(self, input_id: str, seq: int) -> None:
        """Account for message ``seq`` of ``input_id``; say the first of each kind of trouble."""
        seqs = self._sequences.get(input_id)
        if seqs is None:
            seqs = self._sequences[input_id] = _sequence.Sequence()
        started = seqs.expected is not None
        event = seqs.see(seq)
        if event is None:
            return
        where = f"input {input_id!r} ({self._from(input_id)})"
        queue = _facts.queue_size(self._specs.get(input_id))
        source = _source_of(self._specs.get(input_id, ""))
        sender = source.split("/")[0] if source else "the sender"
        counted = "further ones on this input are counted (Node.{}) and summed up at the end"
        counted_first = "F" + counted[1:]
        if event.kind == _sequence.GAP:
            first = "" if started else f" (the first message this input saw was {seq})"
            late = "" if started else "; or this node started after its sender, or restarted"
            text = (
                f"{where}: messages {event.span} never arrived{first}. Likely cause: this node "
                f"fell behind and dora dropped the oldest messages of its queue (queue_size "
                f"{queue}): raise it in the dataflow YAML (inputs: {input_id}: {{source: "
                f"{source or '...'}, queue_size: {max(4 * queue, 100)}}}) or make the node "
                f"faster; a full shared-memory pool of {sender} (shared_memory_pool_size) loses "
                f"messages too{late}. {counted_first.format('lost')}"
            )
        elif event.kind == _sequence.LATE:
            text = (
                f"{where}: message {seq} arrived after later ones (out of order). Likely cause: "
                f"{sender}'s dora shared-memory pool was full, so dora sent some messages by "
                f"its slower daemon path: raise shared_memory_pool_size of node {sender} in the "
                f"dataflow YAML; {counted.format('reordered')}"
            )
        elif event.kind == _sequence.DUPLICATE:
            text = f"{where}: message {seq} arrived twice; {counted.format('duplicates')}"
        else:
            text = f"{where}: {sender} started its numbering over (the node restarted)"
        self._warn(text, (input_id, event.kind))

    def _decode(self, input_id: str, event: Mapping[str, Any]) -> Input | None:
        raw_meta = event.get("metadata") or {}
        seq = raw_meta.get(_schema.KEY_SEQ)
        if type(seq) is int:
            self._sequence(input_id, seq)
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
            receiver = Receiver(
                writable=self._writable,
                verify=self._verify,
                foreign=self._foreign.get(input_id, self._foreign["*"]),
                on_fallback=lambda reason, text, i=input_id: self._fallback(i, reason, text),
            )
            self._receivers[input_id] = receiver
        try:
            value = receiver.receive(event.get("value"), raw_meta)
        except ArrowTensorError as exc:
            self._report(input_id, exc)
            value = None
        if value is None or input_id in self._chunking:  # a chunked value started or ended
            self._track_chunks(input_id, receiver)
        if value is None:  # one part of a multi-message value (or a skipped message)
            return None
        self.received[input_id] += 1
        return Input(input_id, value, metadata, stamp)

    def empty(self, output: str, shape: Sequence[int], dtype: Any) -> Any:
        """A writable tensor in ``output``'s shared-memory pool, to fill and then ``send``.

        Sending it moves only a handle (see ``arrow_tensor.pool``); where the pool cannot be
        used (a receiver on another machine, no free slot, a plain output) it is an
        ordinary tensor and ``send`` copies it. ``dtype`` is a torch or numpy dtype, or a
        wire dtype name.
        """
        return loan(self.dora, output, shape, dtype, plain=self._plain_flag(output))

    def _plain_flag(self, output: str) -> bool | None:
        """True for an output this node declared plain; None: as the environment says."""
        return True if self._plain and _facts.is_plain(output, self._plain) else None

    def send(self, output: str, value: Any, **metadata: Any) -> str:
        """Encode ``value`` (tensor or structure) and send it on ``output``.

        Parameters
        ----------
        output:
            The output id, as listed under ``outputs:`` in the dataflow YAML.
        value:
            A tensor; a dict / list / tuple of tensors and scalars; or a plain value that
            node-hub nodes read as they are: a ``pyarrow.Array``, a ``str`` (a one-element
            string array), ``bytes`` (uint8), a flat list of only ints, floats or strs.
        **metadata:
            Your own keys (str, int, float, bool or homogeneous lists of them).

        Returns
        -------
        str
            The transport the library chose (``"inline"``, ``"raw"``, ``"chunked"``...).

        Raises
        ------
        UnsupportedTensorError, MetadataError, TransportError
            For a value or metadata dora cannot carry (or a plain output cannot); nothing is
            sent.
        """
        plain = self._plain_flag(output)
        return send(self.dora, output, value, metadata, checksum=self.checksum, plain=plain)


def _say(text: str) -> None:
    print(f"arrow_tensor.node: {text}", file=sys.stderr, flush=True)


def _foreign_modes(foreign: str | Mapping[str, str]) -> dict[str, str]:
    """``foreign`` as a mode per input id, ``"*"`` holding the default."""
    modes = dict(foreign) if isinstance(foreign, Mapping) else {"*": foreign}
    modes.setdefault("*", "decode")
    for input_id, mode in modes.items():
        if mode not in FOREIGN_MODES:
            raise ValueError(
                f"foreign mode of {input_id!r} must be one of {FOREIGN_MODES}, got {mode!r:.40}"
            )
    return modes


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
