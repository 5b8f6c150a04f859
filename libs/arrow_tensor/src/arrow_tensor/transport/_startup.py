"""Start-up without loss: a sender never has more messages in flight than a receiver can queue.

Note [Start-up hold]
dora drops the oldest message of an input whose queue (``queue_size``, default 10) is full,
without a word to the sender. At start-up every receiver is slow: it imports torch on its
first tensor, warms its model, runs its first batch; a 30 Hz camera fills a queue of 10 in
a third of a second. So for the first seconds of each of its inputs, a ``Node`` tells its
senders how many messages it has taken from dora, and a sender never lets more messages be
outstanding toward a receiver than that receiver's queue holds: it waits in ``send``.

The back channel is dora's extension table (a daemon-kept, dataflow-scoped key-value table,
no YAML needed; entries die with the node that stored them), namespace ``STARTUP_NS``:

- ``rx/<node>/<input>``: stored by the receiving ``Node`` when it is made, for each data
  input: "this input is read by arrow_tensor and will report". Its value is the queue size.
- ``ack/<node>/<input>``: the number of messages the receiver took from that input so far,
  stored every few messages (``ack_every``); ``done`` once its start-up is over
  (``ARROW_TENSOR_STARTUP_HOLD`` seconds after the first message it took).

The sender (``Hold``, one per output, made on its first send) counts the messages it sends
and reads a receiver's ack only when the count could overflow the receiver's queue. A
receiver without an ``rx`` entry ``GRACE`` seconds after the output's first send does not
run arrow_tensor (a node-hub node) and is not held for; a receiver whose entries vanished
exited; ``done`` ends the hold for that receiver. A receiver that takes nothing for
``ARROW_TENSOR_STARTUP_TIMEOUT`` seconds is named in a warning and no longer held for. Once
no receiver is held for, the hold is dropped: steady state costs nothing.

The hold keeps queues from overflowing; the messages must also leave the sender. dora
publishes on zenoh with the "drop" congestion policy: a message that finds the sending queue
busy for longer than zenoh's ``wait_before_drop`` (1 ms) is dropped without a word, which a
node starved of CPU at start-up (six Python processes importing torch on two cores) met in
2 of 16 runs of a camera pipeline. ``zenoh_overlay`` raises that wait for the node's own
session (``ARROW_TENSOR_ZENOH_DROP_WAIT``, through dora's ``DORA_ZENOH_CONFIG_OVERLAY``),
unless the deployment configures zenoh itself.

While a sender waits it may take its own inputs off dora's queue (``Node`` passes a
``waiting`` callback that buffers them): two nodes that feed each other cannot wait on each
other. Receivers on other machines are not held for: the extension table is kept per daemon.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import config

STARTUP_NS = "arrow_tensor.startup"
"""The namespace of the start-up hold's entries in dora's extension table."""
DEFAULT_QUEUE = 10
"""dora's queue size of an input that sets none."""
GRACE = 2.0
"""Seconds after an output's first send within which every arrow_tensor receiver has said so."""
DONE = b"done"
HOLD_S = 3.0
"""Default of ``ARROW_TENSOR_STARTUP_HOLD``: seconds an input reports after its first message."""
TIMEOUT_S = 30.0
"""Default of ``ARROW_TENSOR_STARTUP_TIMEOUT``: seconds a sender waits on an idle receiver."""


def hold_seconds(environ: Mapping[str, str] | None = None) -> float:
    """``ARROW_TENSOR_STARTUP_HOLD``: how long an input reports after its first message (0: off)."""
    return config.setting("ARROW_TENSOR_STARTUP_HOLD", config.duration, HOLD_S, environ=environ)


def timeout_seconds(environ: Mapping[str, str] | None = None) -> float:
    """``ARROW_TENSOR_STARTUP_TIMEOUT``: how long a sender waits on a receiver taking nothing."""
    return config.setting(
        "ARROW_TENSOR_STARTUP_TIMEOUT", config.duration, TIMEOUT_S, environ=environ
    )


ZENOH_DROP_WAIT_S = 0.1
"""Default of ``ARROW_TENSOR_ZENOH_DROP_WAIT``: how long zenoh waits before it drops a message."""
_OVERLAY_ENV = "DORA_ZENOH_CONFIG_OVERLAY"
_ZENOH_CONFIG_ENV = "ZENOH_CONFIG"
_DROP_KEYS = (
    "transport/link/tx/queue/congestion_control/drop/wait_before_drop",
    "transport/link/tx/queue/congestion_control/drop/max_wait_before_drop_fragments",
)


def zenoh_overlay(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Before ``dora.Node()``: have this node's zenoh session wait, not drop (see the note).

    Writes a zenoh config overlay with zenoh's drop waits set to
    ``ARROW_TENSOR_ZENOH_DROP_WAIT`` and names it in ``DORA_ZENOH_CONFIG_OVERLAY`` of
    ``environ`` (``os.environ`` by default). Returns its path, or None when the deployment
    configures zenoh itself (``DORA_ZENOH_CONFIG_OVERLAY`` or ``ZENOH_CONFIG`` set) or the
    setting is 0.
    """
    env = os.environ if environ is None else environ
    wait = config.setting(
        "ARROW_TENSOR_ZENOH_DROP_WAIT", config.duration, ZENOH_DROP_WAIT_S, environ=env
    )
    if wait <= 0 or env.get(_OVERLAY_ENV) or env.get(_ZENOH_CONFIG_ENV):
        return None
    micros = int(wait * 1e6)
    path = os.path.join(tempfile.gettempdir(), f"arrow_tensor-zenoh-{os.getuid()}-{micros}.json5")
    if not os.path.exists(path):
        text = "{ " + ", ".join(f'"{key}": {micros}' for key in _DROP_KEYS) + " }\n"
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".arrow_tensor-zenoh-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # whole or absent: nodes starting together read the same file
    env[_OVERLAY_ENV] = path
    return path


def rx_key(node_id: str, input_id: str) -> str:
    """The entry saying ``node_id``'s input ``input_id`` reports what it takes."""
    return f"rx/{node_id}/{input_id}"


def ack_key(node_id: str, input_id: str) -> str:
    """The entry holding how many messages ``node_id``'s input ``input_id`` took."""
    return f"ack/{node_id}/{input_id}"


def ack_every(queue_size: int) -> int:
    """Report every this many messages: often enough that a sender rarely waits on a stale count."""
    return max(1, queue_size // 4)


def _store(node: Any, key: str, value: bytes) -> bool:
    try:
        node.extension_store(STARTUP_NS, key, value)
        return True
    except Exception:  # MockNode, a dora without the table, a daemon going away
        return False


def _load(node: Any, key: str) -> bytes | None:
    try:
        value = node.extension_load(STARTUP_NS, key)
    except Exception:
        return None
    return bytes(value) if value is not None else None


# The receiving side ---------------------------------------------------------------------
@dataclass
class _Input:
    every: int
    taken: int = 0
    first: float | None = None


class Acks:
    """A receiving node's reports of what it took, per data input, for its first seconds.

    Parameters
    ----------
    node:
        The dora node (its extension table carries the reports).
    node_id:
        This node's id in the dataflow.
    queues:
        Each data input's queue size.
    hold_s:
        Seconds each input reports after its first message (0 or less: it never reports).
    """

    def __init__(self, node: Any, node_id: str, queues: Mapping[str, int], hold_s: float) -> None:
        self._node = node
        self._node_id = node_id
        self._hold_s = hold_s
        self._open: dict[str, _Input] = {}
        if hold_s <= 0 or not callable(getattr(node, "extension_store", None)):
            return
        for input_id, queue in queues.items():
            if _store(node, rx_key(node_id, input_id), str(queue).encode()):
                self._open[input_id] = _Input(ack_every(queue))

    @property
    def active(self) -> bool:
        """Whether some input still reports."""
        return bool(self._open)

    def took(self, input_id: str) -> None:
        """One message of ``input_id`` left dora's queue."""
        state = self._open.get(input_id)
        if state is None:
            return
        now = time.monotonic()
        if state.first is None:
            state.first = now
        state.taken += 1
        if now - state.first >= self._hold_s:
            _store(self._node, ack_key(self._node_id, input_id), DONE)
            del self._open[input_id]
        elif state.taken % state.every == 0:
            _store(self._node, ack_key(self._node_id, input_id), str(state.taken).encode())

    def close(self) -> None:
        """Say every still-reporting input is done (this node stops taking messages)."""
        for input_id in list(self._open):
            _store(self._node, ack_key(self._node_id, input_id), DONE)
        self._open.clear()


# The sending side -----------------------------------------------------------------------
@dataclass(frozen=True)
class Edge:
    """One receiving input of an output: node id, input id, its queue size."""

    node_id: str
    input_id: str
    queue: int = DEFAULT_QUEUE

    @property
    def name(self) -> str:
        """``node/input`` as the YAML names it."""
        return f"{self.node_id}/{self.input_id}"


_UNKNOWN, _HELD = "unknown", "held"


@dataclass
class _Receiver:
    edge: Edge
    state: str = _UNKNOWN
    taken: int = 0
    progress_at: float = field(default_factory=time.monotonic)


class Hold:
    """One output's start-up hold (Note [Start-up hold]): ``admit`` before each message.

    Parameters
    ----------
    node:
        The sending dora node.
    output_id:
        The output.
    edges:
        Its receiving inputs on this machine.
    timeout_s:
        Seconds without progress after which a receiver is no longer waited for.
    warn:
        Says a sentence to the user (once per topic).
    waiting:
        Called while waiting (a ``Node`` takes its own inputs off dora's queue meanwhile).
    """

    def __init__(
        self,
        node: Any,
        output_id: str,
        edges: Sequence[Edge],
        timeout_s: float,
        warn: Callable[[str, str], None],
        waiting: Callable[[], None] | None = None,
    ) -> None:
        self._node = node
        self._output_id = output_id
        self._receivers = [_Receiver(e) for e in edges]
        self._timeout_s = timeout_s
        self._warn = warn
        self.waiting = waiting
        self.sent = 0
        self.started = time.monotonic()
        self.waited_s = 0.0
        """Seconds ``admit`` spent waiting (for tests and the summary)."""

    @property
    def finished(self) -> bool:
        """No receiver is held for any more: the output sends without asking."""
        return not self._receivers

    def admit(self) -> None:
        """Return when one more message fits every held receiver's queue, then count it."""
        for receiver in list(self._receivers):
            if self.sent - receiver.taken >= receiver.edge.queue:
                self._wait_for(receiver)
        self.sent += 1

    def _wait_for(self, r: _Receiver) -> None:
        t0 = time.monotonic()
        pause = 0.0005
        while not self._room(r):
            if self.waiting is not None:
                self.waiting()
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        self.waited_s += time.monotonic() - t0

    def _room(self, r: _Receiver) -> bool:
        """Read ``r``'s report; True when the next message fits (or ``r`` is let go)."""
        now = time.monotonic()
        if r.state == _UNKNOWN:
            if _load(self._node, rx_key(r.edge.node_id, r.edge.input_id)) is None:
                if now - self.started < GRACE:
                    return False  # it may not have said so yet
                return self._release(r)  # no arrow_tensor there: nothing to wait for
            r.state, r.progress_at = _HELD, now
        value = _load(self._node, ack_key(r.edge.node_id, r.edge.input_id))
        if value == DONE:
            return self._release(r)
        if value is None and _load(self._node, rx_key(r.edge.node_id, r.edge.input_id)) is None:
            return self._release(r)  # its entries are gone: it exited
        taken = int(value) if value and value.isdigit() else 0
        if taken > r.taken:
            r.taken, r.progress_at = taken, now
        if self.sent - r.taken < r.edge.queue:
            return True
        if now - r.progress_at >= self._timeout_s:
            self._warn(
                f"startup:{r.edge.name}",
                f"arrow_tensor: output {self._output_id!r} waited {self._timeout_s:.0f} s for "
                f"receiver {r.edge.name} to take a message (it took {r.taken} of "
                f"{self.sent}); sending on without waiting for it, so dora drops what its queue "
                f"of {r.edge.queue} cannot hold (ARROW_TENSOR_STARTUP_TIMEOUT)",
            )
            return self._release(r)
        return False

    def _release(self, r: _Receiver) -> bool:
        with contextlib.suppress(ValueError):
            self._receivers.remove(r)
        return True
