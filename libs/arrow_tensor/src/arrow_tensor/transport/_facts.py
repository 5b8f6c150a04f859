"""Facts about each output, computed once: who receives it, where, and what its routes allow.

Note [Output facts]
Everything the transport decision needs to know about an *output* (as opposed to a value)
is read once, when the output first sends, into a frozen ``OutputFacts``: this node's id
and machine, the receivers and their machines (from the dataflow descriptor), why
shared-memory handles or CUDA IPC cannot be used here (or None), the size of dora's
shared-memory pool for this node, whether the node has raw samples, dora's message cap
and the pool threshold. The descriptor does not change while a dataflow runs, so neither
do the facts, with two exceptions learned by trying: a node whose ``send_output_raw``
refuses (``dora.testing.MockNode``) has no raw samples; and an output dora put on its
daemon path (its start-up handshake did not complete in time, or the receiver is on
another machine) carries at most 64 MiB per message, which dora's refusal names
(``refused_cap``). Either way the facts are replaced once and the value decided again.

The mutable per-output state sits beside the facts in ``OutputState``: the output's
shared-memory pool once it has one, and what was already said to the user. This module
holds the one registry of such state, keyed by the node's ``id`` with the node itself kept
in the entry, so an id can never be reused while its entry lives; entries of nodes nobody
else references any more are dropped (and their pools closed) when the registry grows.
Beside it, ``FAST_SENDS`` memoizes the decision per output and layout for the send fast
path, one lookup per message; each entry holds its output's state (so its node), and an
output's entries are dropped when one of its facts changes or it starts to loan.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .. import config
from .._errors import ShmHandleError
from ..codec import _schema
from ..codec._memo import Memo
from ..memory import _blocks
from ..memory._host_pool import OutputPool
from ._startup import DEFAULT_QUEUE, Edge, Hold, hold_seconds, timeout_seconds

log = logging.getLogger("arrow_tensor")

DORA_MESSAGE_CAP = 256 << 20
"""dora 1.1 refuses a message whose Arrow IPC stream exceeds this many bytes."""
REMOTE_MESSAGE_CAP = 32 << 20
"""Largest message sent to a receiver on another machine (``ARROW_TENSOR_REMOTE_MESSAGE_BYTES``).

dora refuses more than 64 MiB of IPC-encoded bytes on its daemon path, and silently lost 48
and 56 MiB messages well under that (benchmarks/README.md, "Across machines"); 32 MiB
messages arrived when paced (``REMOTE_RATE``)."""
REMOTE_RATE = 256 << 20
"""Bytes per second an output sends to receivers on other machines (``ARROW_TENSOR_REMOTE_RATE``).

Sent faster, dora's cross-machine path dropped messages without a word (3 of 20 32 MiB
messages back to back); paced at this rate, none."""
DORA_DEFAULT_POOL_BYTES = 8 << 20
"""A node's shared-memory pool when neither the YAML nor ``DORA_NODE_SHM_POOL_SIZE`` sets it."""
SHM_MIN_BYTES = 256 << 20
"""Ordinary tensors of this size or more go through the pool (``ARROW_TENSOR_SHM_MIN_BYTES``).

Below dora's message cap a copy into a slot measured no faster than dora's own message,
which holds no slot; above it the pool beats chunking (benchmarks/README.md)."""
EXTENSION_NS = "arrow_tensor.shm"
"""The namespace of arrow_tensor's entries in dora's extension table (crash notices)."""
_NO_CUDA = ("", "-1", "none", "void", "nodevfiles")
_DAEMON_LIMIT = re.compile(r"exceeding the (\d+)-byte daemon transport limit")


def refused_cap(exc: BaseException) -> int | None:
    """The per-message cap dora names when it refused a message as too big, else None."""
    match = _DAEMON_LIMIT.search(str(exc))
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Peer:
    """A receiver of an output: its node id and the machine it is deployed on (or None)."""

    node_id: str
    machine: str | None
    inputs: tuple[tuple[str, int], ...] = ()
    """Its inputs fed by the output, each with its dora queue size."""


@dataclass(frozen=True)
class OutputFacts:
    """What the transport decision knows about one output (see Note [Output facts])."""

    output_id: str
    node_id: str | None
    """This node's id (None outside dora)."""
    machine: str | None
    """This node's machine (``DORA_MACHINE_ID``, else its ``deploy.machine``), or None."""
    receivers: tuple[Peer, ...] = ()
    shm_reason: str | None = "no dataflow is known"
    """Why shared-memory handles cannot reach every receiver, or None when they can."""
    cuda_reason: str | None = "no dataflow is known"
    """Why CUDA IPC descriptors cannot reach every receiver, or None when they can."""
    pool_bytes: int = DORA_DEFAULT_POOL_BYTES
    """dora's shared-memory pool for this node's outgoing samples."""
    raw: bool = True
    """The node hands out raw samples (``send_output_raw``)."""
    message_cap: int = DORA_MESSAGE_CAP
    """Largest IPC-encoded message dora accepts on this output's route."""
    shm_min_bytes: int = SHM_MIN_BYTES
    """Ordinary tensors from this size travel through the pool."""
    plain: bool = False
    """A plain output (``ARROW_TENSOR_PLAIN_OUTPUTS``): every value goes as one ordinary
    array that consumers without arrow_tensor read right (Note [Choosing a transport])."""
    trust_descriptor: bool = False
    """Send shared-memory handles before the receivers have shown they can open the pool
    (``ARROW_TENSOR_SHM_TRUST=descriptor``; Note [Relay-safe handles] in memory._host_pool)."""
    remote_rate: float | None = None
    """Bytes per second when a receiver is on another machine (None: not paced)."""

    @property
    def receiver_ids(self) -> tuple[str, ...]:
        """The receivers' node ids."""
        return tuple(p.node_id for p in self.receivers)

    @property
    def remote(self) -> tuple[Peer, ...]:
        """The receivers deployed on another machine than this node."""
        return remote_peers(self.receivers, self.machine)

    @property
    def local_edges(self) -> tuple[Edge, ...]:
        """The receiving inputs on this machine (the start-up hold waits for these)."""
        remote = set(self.remote)
        return tuple(
            Edge(p.node_id, input_id, queue)
            for p in self.receivers
            if p not in remote
            for input_id, queue in p.inputs
        )


# Reading the dataflow descriptor (pure functions) -----------------------------------------
def _input_source(spec: object) -> str | None:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        source = spec.get("source")
        return source if isinstance(source, str) else None
    return None


def queue_size(spec: object) -> int:
    """The queue size of an input as the YAML (or ``node_config()``) gives it; dora's default."""
    queue = spec.get("queue_size") if isinstance(spec, Mapping) else None
    if isinstance(queue, int) and not isinstance(queue, bool) and queue > 0:
        return queue
    return DEFAULT_QUEUE


def _deploy_machine(entry: Mapping[str, Any], default: str | None) -> str | None:
    deploy = entry.get("deploy")
    if isinstance(deploy, Mapping) and deploy.get("machine"):
        return str(deploy["machine"])
    return default


def _nodes(descriptor: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    nodes = descriptor.get("nodes") or []
    return [n for n in nodes if isinstance(n, Mapping)] if isinstance(nodes, list) else []


def remote_peers(receivers: Sequence[Peer], machine: str | None) -> tuple[Peer, ...]:
    """The receivers deployed on another machine than ``machine`` (this node's)."""
    return tuple(p for p in receivers if p.machine != machine)


def receivers_of(descriptor: Mapping[str, Any], node_id: str, output_id: str) -> list[Peer]:
    """Every node with an input fed by ``node_id/output_id``, by id, with its machine and
    those inputs (with their queue sizes)."""
    wanted = f"{node_id}/{output_id}"
    default = _deploy_machine(descriptor, None)
    found: dict[str, Peer] = {}
    for entry in _nodes(descriptor):
        inputs = entry.get("inputs") or {}
        if not isinstance(inputs, Mapping):
            continue
        fed = tuple(
            (str(input_id), queue_size(spec))
            for input_id, spec in inputs.items()
            if _input_source(spec) == wanted
        )
        if fed:
            rid = str(entry.get("id"))
            found[rid] = Peer(rid, _deploy_machine(entry, default), fed)
    return [found[rid] for rid in sorted(found)]


def own_machine(
    descriptor: Mapping[str, Any], node_id: str, environ: Mapping[str, str]
) -> str | None:
    """This node's machine: ``DORA_MACHINE_ID``, else its ``deploy.machine`` in the YAML."""
    machine = environ.get("DORA_MACHINE_ID") or None
    if machine:
        return machine
    default = _deploy_machine(descriptor, None)
    for entry in _nodes(descriptor):
        if str(entry.get("id")) == node_id:
            return _deploy_machine(entry, default)
    return default


def shm_reason(
    output_id: str, receivers: list[Peer], machine: str | None, shm_available: bool
) -> str | None:
    """Why shared-memory handles cannot reach every receiver of ``output_id``, or None.

    The pool needs every receiver on this machine, and a usable /dev/shm. One dora output
    reaches all its receivers with the same message, so one remote receiver sends the whole
    output by the message path.
    """
    if not shm_available:
        return f"{_blocks.SHM_DIR} is not available on this system"
    if not receivers:
        return f"output {output_id!r} has no receivers in the dataflow descriptor"
    remote = [p.node_id for p in remote_peers(receivers, machine)]
    if remote:
        return f"receivers {remote} run on another machine than {machine!r}"
    return None


def cuda_reason(
    descriptor: Mapping[str, Any],
    receivers: list[Peer],
    machine: str | None,
    environ: Mapping[str, str],
) -> str | None:
    """Why the receivers cannot open CUDA IPC descriptors from this node, or None.

    A pure function of the dataflow descriptor (as ``node.dataflow_descriptor()`` returns
    it, or the YAML parsed) and this process's environment. Outside a dataflow (no
    receivers known) a descriptor is made for one receiver on this machine.
    """
    forced = environ.get("ARROW_TENSOR_TRANSPORT", "auto").strip().lower()
    if forced == "host":
        return "ARROW_TENSOR_TRANSPORT=host"
    remote = [p.node_id for p in remote_peers(receivers, machine)]
    if remote:
        return f"receivers {remote} run on another machine than {machine!r} (deploy.machine)"
    nodes = {str(n.get("id")): n for n in _nodes(descriptor)}
    for peer in receivers:
        env = nodes.get(peer.node_id, {}).get("env") or {}
        if not isinstance(env, Mapping):
            continue
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and str(visible).strip().lower() in _NO_CUDA:
            return (
                f"receiver {peer.node_id!r} has no CUDA device (CUDA_VISIBLE_DEVICES={visible!r})"
            )
        if str(env.get("ARROW_TENSOR_TRANSPORT", "")).strip().lower() == "host":
            return f"receiver {peer.node_id!r} asks for the host path (ARROW_TENSOR_TRANSPORT=host)"
    return None


def output_names(raw: str) -> frozenset[str]:
    """Output ids from a comma-separated list (``*``: every output)."""
    return frozenset(item.strip() for item in raw.split(",") if item.strip())


def plain_outputs(environ: Mapping[str, str]) -> frozenset[str]:
    """The outputs ``ARROW_TENSOR_PLAIN_OUTPUTS`` names (comma separated; ``*``: every one)."""
    return output_names(environ.get("ARROW_TENSOR_PLAIN_OUTPUTS", ""))


def is_plain(output_id: str, names: frozenset[str] | set[str]) -> bool:
    """Whether ``output_id`` is one of ``names`` (``*`` names every output)."""
    return output_id in names or "*" in names


def pool_bytes(node_config: Mapping[str, Any], environ: Mapping[str, str]) -> int:
    """The bytes of shared memory dora gives a node's outgoing samples.

    The YAML's ``shared_memory_pool_size`` (visible in ``node.node_config()``) wins over
    ``DORA_NODE_SHM_POOL_SIZE`` in the node's environment; neither means dora's 8 MB.
    """
    size = node_config.get("shared_memory_pool_size")
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    try:
        return int(environ.get("DORA_NODE_SHM_POOL_SIZE", ""))
    except ValueError:
        return DORA_DEFAULT_POOL_BYTES


# Reading a node (the only impure part) ----------------------------------------------------
def _call(node: Any, method: str) -> dict[str, Any]:
    """``node.<method>()`` as a dict; {} for a node without a daemon behind it."""
    fn = getattr(node, method, None)
    try:
        value = fn() if callable(fn) else None
    except Exception:  # a stand-in without a daemon: nothing to learn
        value = None
    return dict(value) if isinstance(value, Mapping) else {}


def own_node_id() -> str | None:
    """This process's dora node id (None outside a dataflow)."""
    try:
        return _blocks.identity().node_id
    except ShmHandleError:
        return None


def facts_of(node: Any, output_id: str, environ: Mapping[str, str] | None = None) -> OutputFacts:
    """The facts of ``output_id`` on ``node``, read from the node and this environment."""
    env = os.environ if environ is None else environ
    node_id = own_node_id()
    descriptor = _call(node, "dataflow_descriptor")
    receivers = receivers_of(descriptor, node_id, output_id) if node_id else []
    machine = own_machine(descriptor, node_id or "", env)
    shm_min = config.setting("ARROW_TENSOR_SHM_MIN_BYTES", config.size, SHM_MIN_BYTES)
    trust = config.setting(
        "ARROW_TENSOR_SHM_TRUST", config.choice("proven", "descriptor"), "proven", environ=env
    )
    remote = bool(remote_peers(receivers, machine))
    cap = DORA_MESSAGE_CAP
    if remote:
        cap = config.setting(
            "ARROW_TENSOR_REMOTE_MESSAGE_BYTES", config.size, REMOTE_MESSAGE_CAP, environ=env
        )
        cap = max(1 << 20, min(cap, DORA_MESSAGE_CAP))
    rate = (
        config.setting("ARROW_TENSOR_REMOTE_RATE", config.size, REMOTE_RATE, environ=env)
        if remote
        else None
    )
    no_dora = "this process is not a dora node (DORA_NODE_CONFIG names no node)"
    return OutputFacts(
        output_id=output_id,
        node_id=node_id,
        machine=machine,
        receivers=tuple(receivers),
        shm_reason=(
            shm_reason(output_id, receivers, machine, _blocks.available()) if node_id else no_dora
        ),
        cuda_reason=cuda_reason(descriptor, receivers, machine, env),
        pool_bytes=pool_bytes(_call(node, "node_config"), env),
        raw=callable(getattr(node, "send_output_raw", None)),
        message_cap=cap,
        shm_min_bytes=shm_min,
        plain=is_plain(output_id, plain_outputs(env)),
        trust_descriptor=trust == "descriptor",
        remote_rate=float(rate) if rate else None,
    )


# Per-output state ----------------------------------------------------------------------
@dataclass(eq=False)
class OutputState:
    """The facts of one output plus what the transport keeps for it between sends."""

    node: Any
    """Held so that ``id(node)`` in the registry key cannot be reused while this lives."""
    facts: OutputFacts
    pool: OutputPool | None = None
    """This output's shared-memory pool, made on first use."""
    said: set[str] = field(default_factory=set)
    """Topics already told to the user (each warning is given once per output)."""
    pool_checked: int = 0
    """The largest in-flight byte count found to fit dora's pool (no warning needed)."""
    next_send_at: float = 0.0
    """When the pacing toward other machines lets the next message go (``pace``)."""
    seq: int = 0
    """The sequence number of this output's next message (``at.seq``, Note [Sequence numbers])."""
    hold: Hold | None = None
    """The start-up hold while some receiver is held for (Note [Start-up hold])."""
    hold_made: bool = False

    def before_send(self, meta: dict[str, Any], nbytes: int) -> None:
        """Right before each dora message of this output: wait while a receiver starts up,
        pace toward other machines, and number the message (``at.seq``)."""
        if not self.hold_made:
            self._make_hold()
        if self.hold is not None:
            self.hold.admit()
            if self.hold.finished:
                self.hold = None
        if self.facts.remote_rate:
            self.pace(nbytes)
        meta[_schema.KEY_SEQ] = self.seq
        self.seq += 1

    def unsent(self) -> None:
        """The last numbered message was refused by dora (it is sent again otherwise)."""
        self.seq -= 1
        if self.hold is not None:
            self.hold.sent -= 1

    def _make_hold(self) -> None:
        self.hold_made = True
        edges = self.facts.local_edges
        table = callable(getattr(self.node, "extension_load", None))
        if not edges or self.facts.plain or not table or hold_seconds() <= 0:
            return  # no receiver to wait for, node-hub consumers (plain), no dora, or off
        self.hold = Hold(
            self.node,
            self.facts.output_id,
            edges,
            timeout_seconds(),
            self.warn_once,
            WAITERS.get(id(self.node)),
        )

    def pace(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more may go toward other machines (``facts.remote_rate``)."""
        rate = self.facts.remote_rate
        if not rate:
            return
        now = time.monotonic()
        if self.next_send_at > now:
            time.sleep(self.next_send_at - now)
            now = self.next_send_at
        self.next_send_at = now + nbytes / rate

    def no_raw_samples(self) -> None:
        """Learned: this node refuses raw samples (see Note [Output facts])."""
        if self.facts.raw:
            self.facts = replace(self.facts, raw=False)
            self.forget_fast()

    def lower_message_cap(self, cap: int) -> None:
        """Learned: dora carries at most ``cap`` bytes per message on this output's route."""
        if cap < self.facts.message_cap:
            self.facts = replace(self.facts, message_cap=cap)
            self.forget_fast()
            self.warn_once(
                "cap",
                f"arrow_tensor: dora put output {self.facts.output_id!r} on its daemon path, "
                f"which carries at most {cap} bytes per message; larger values go in chunks "
                f"from now on (give the node a `shared_memory_pool_size` and send after its "
                f"receivers are up to keep dora's shared-memory route)",
            )

    def shm_pool(self) -> OutputPool:
        """The output's pool, made on first use (only when ``facts.shm_reason`` is None)."""
        if self.pool is None:
            self.pool = OutputPool(
                _blocks.identity(), self.facts.output_id, self.facts.receiver_ids
            )
            self.forget_fast()  # sends may now be loans: the fast path steps aside
        return self.pool

    def fast_keys(self) -> list[tuple[Any, ...]]:
        """This output's keys in ``FAST_SENDS``."""
        node_key, output_id = id(self.node), self.facts.output_id
        return [k for k in FAST_SENDS if k[0] == node_key and k[1] == output_id]

    def forget_fast(self) -> None:
        """Drop this output's memoized decisions (a fact changed, or it loans now)."""
        for key in self.fast_keys():
            del FAST_SENDS[key]

    def warn_once(self, topic: str, text: str) -> None:
        """Tell the user ``text`` once per output and topic, through dora's log if it has one."""
        if topic in self.said:
            return
        self.said.add(topic)
        warn = getattr(self.node, "log_warn", None)
        if callable(warn):
            try:
                warn(text)
                return
            except Exception:  # logging must never break a send
                pass
        log.warning(text)


_STATES: dict[tuple[int, str], OutputState] = {}
_SWEEP_AT = 256
WAITERS: dict[int, Callable[[], None]] = {}
"""What a sender does while the start-up hold waits, by ``id(node)`` (``Node`` takes its
inputs off dora's queue); set with ``set_waiting``."""
FAST_SENDS: Memo[tuple[Any, ...], Any] = Memo(1024)
"""The send fast path's memo: (id(node), output, type, dtype, shape, strides) -> entry."""


def state_of(node: Any, output_id: str) -> OutputState:
    """The state of ``output_id`` on ``node``, its facts read on first use."""
    state = _STATES.get((id(node), output_id))
    if state is None:
        if len(_STATES) >= _SWEEP_AT:
            _forget_dead_nodes()
        attach(node)
        state = _STATES[(id(node), output_id)] = OutputState(node, facts_of(node, output_id))
        if state.facts.remote:
            say_remote(state)
    return state


def say_remote(state: OutputState) -> None:
    """Say once, as a warning, that this output reaches other machines, and what follows."""
    facts = state.facts
    where = ", ".join(f"{p.node_id!r} on {p.machine!r}" for p in facts.remote)
    state.warn_once(
        "remote",
        f"arrow_tensor: output {facts.output_id!r} of node {facts.node_id!r} (machine "
        f"{facts.machine!r}) reaches receivers on other machines ({where}): its values go as "
        f"ordinary dora messages of at most {facts.message_cap >> 20} MiB "
        f"(ARROW_TENSOR_REMOTE_MESSAGE_BYTES), larger ones in chunks, paced at "
        f"{int(facts.remote_rate or 0) >> 20} MiB/s (ARROW_TENSOR_REMOTE_RATE); no shared "
        f"memory or CUDA handles",
    )


def _forget_dead_nodes() -> None:
    """Drop the state of nodes only this registry still references (closing their pools)."""
    global _SWEEP_AT
    by_node: dict[int, list[tuple[int, str]]] = {}
    for key in _STATES:
        by_node.setdefault(key[0], []).append(key)
    for keys in by_node.values():
        node = _STATES[keys[0]].node
        # References: one per entry of this node, the local, getrefcount's argument.
        if sys.getrefcount(node) <= len(keys) + 2:
            for key in keys:
                state = _STATES.pop(key)
                state.forget_fast()
                if state.pool is not None:
                    with contextlib.suppress(Exception):
                        state.pool.close()
        del node
    _SWEEP_AT = max(256, 2 * len(_STATES))


def set_waiting(node: Any, waiting: Callable[[], None] | None) -> None:
    """Have the start-up hold of ``node``'s outputs call ``waiting`` (a bound method, held
    weakly) while it waits."""
    if waiting is None:
        WAITERS.pop(id(node), None)
    else:
        ref = weakref.WeakMethod(waiting)  # type: ignore[arg-type]

        def call() -> None:
            method = ref()
            if method is not None:
                method()

        waiting = WAITERS[id(node)] = call
    for (node_key, _), state in _STATES.items():
        if node_key == id(node) and state.hold is not None:
            state.hold.waiting = waiting


def existing_state(node: Any, output_id: str) -> OutputState | None:
    """The state of ``output_id`` on ``node`` if it has sent before (the fast path asks)."""
    return _STATES.get((id(node), output_id))


# Crash notices through dora's extension table ---------------------------------------------
class DoraNotices:
    """``_blocks.Notices`` over a dora node's extension table (see Note [Block files]).

    The daemon drops a node's entries when it exits, even by a crash, and tells every node
    that loaded them: receivers then unlink the block names of a dead producer.
    """

    def __init__(self, node: Any) -> None:
        self.node = node

    def announce(self, name: str) -> None:
        """Store an entry for ``name``, owned by this node."""
        with contextlib.suppress(Exception):  # MockNode, or a dora without the table
            self.node.extension_store(EXTENSION_NS, name, str(os.getpid()).encode())

    def retire(self, name: str) -> None:
        """Drop the entry of ``name`` (closed cleanly)."""
        with contextlib.suppress(Exception):
            self.node.extension_drop(EXTENSION_NS, name)

    def watch(self, name: str) -> None:
        """Load the entry of ``name``: its drop will be reported to this node."""
        with contextlib.suppress(Exception):  # already dropped: the producer is gone
            self.node.extension_load(EXTENSION_NS, name)

    def dropped(self) -> list[str]:
        """Entries dropped since the last call (their producers exited)."""
        try:
            return list(self.node.drain_dropped_extension_keys(EXTENSION_NS))
        except Exception:  # MockNode / older dora: no notices, the exit sweep still runs
            return []


def attach(node: Any) -> None:
    """Let this process's pools and receivers exchange crash notices through ``node``.

    The first dora node of the process is used (one process is one dora node); later calls
    with another node replace it (tests make many).
    """
    current = _blocks.notices()
    if not (isinstance(current, DoraNotices) and current.node is node):
        _blocks.set_notices(DoraNotices(node))
