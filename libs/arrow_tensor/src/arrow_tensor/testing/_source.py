"""The sending side of the integrity check: every case, numbered, paced by acks.

Note [Flow control]
dora drops messages silently when an input queue overflows and falls back to a slow path
(that fails above 64 MiB) when the sender's shared-memory pool is full. The validator
therefore acknowledges every message it has checked on its ``ack`` output (when the dataflow
wires one), and the source keeps at most ``window`` messages / ``window_bytes`` bytes
unacknowledged. Acks carry the highest sequence number checked, so a lost ack or a dropped
message never stalls the source; if no ack comes for ``ack_timeout`` seconds the source warns
once and sends without flow control.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .. import config as _config
from ..transport._send import send
from ._cases import (
    DEFAULT_SIZES,
    KEY_CASE,
    KEY_CHECKSUMMED,
    KEY_END,
    KEY_HELLO,
    KEY_SEED,
    KEY_SEQ,
    KEY_TOTAL,
    Case,
    Log,
    _print,
    make_tensor,
    resolve_device,
    select_cases,
)

# --------------------------------------------------------------------------------------------
# Source


@dataclass(frozen=True)
class SourceConfig:
    """Settings of ``nodes/tensor_source`` (see :meth:`from_env` for the variables)."""

    seed: int = 0
    cases: tuple[str, ...] = ("*",)
    sizes: tuple[int, ...] = DEFAULT_SIZES
    rounds: int = 1
    duration: float = 0.0
    rate: float = 0.0
    device: str = "auto"
    checksum: bool = True
    window: int = 2
    window_bytes: int = 256 << 20
    ack_timeout: float = 10.0
    corrupt: bool = False
    output: str = "tensors"
    ack_input: str = "ack"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SourceConfig:
        """Read the source settings from environment variables.

        ``SEED`` (int), ``CASES`` (comma-separated globs over case ids), ``SIZES``
        (``0,4KiB,1MiB,64MiB``), ``ROUNDS`` (passes over the cases), ``DURATION`` (``30s``;
        when set, repeat rounds until it has elapsed instead), ``RATE`` (messages per second,
        0 = as fast as acks allow), ``DEVICE`` (``auto|cpu|cuda``), ``CHECKSUM`` (bool),
        ``WINDOW`` / ``WINDOW_BYTES`` (unacknowledged messages / bytes, 0 = no flow control),
        ``ACK_TIMEOUT`` (``10s``) and the test-only ``ARROW_TENSOR_TEST_CORRUPT`` (bool: flip
        one payload byte of every message after encoding, to prove the validator fails).

        Raises
        ------
        ConfigError
            Naming the variable, the value and what was expected.
        """
        d = cls()
        get = _config.setting
        return cls(
            seed=get("SEED", _config.integer(0, 2**63 - 1), d.seed, environ=environ),
            cases=tuple(get("CASES", _config.text_list, list(d.cases), environ=environ)),
            sizes=tuple(get("SIZES", _config.size_list(), list(d.sizes), environ=environ)),
            rounds=get("ROUNDS", _config.integer(1), d.rounds, environ=environ),
            duration=get("DURATION", _config.duration, d.duration, environ=environ),
            rate=get("RATE", _config.number(0), d.rate, environ=environ),
            device=get("DEVICE", _config.choice("auto", "cpu", "cuda"), d.device, environ=environ),
            checksum=get("CHECKSUM", _config.boolean, d.checksum, environ=environ),
            window=get("WINDOW", _config.integer(0), d.window, environ=environ),
            window_bytes=get("WINDOW_BYTES", _config.size, d.window_bytes, environ=environ),
            ack_timeout=get("ACK_TIMEOUT", _config.duration, d.ack_timeout, environ=environ),
            corrupt=get("ARROW_TENSOR_TEST_CORRUPT", _config.boolean, False, environ=environ),
        )


class _AckWindow:
    """The source's side of Note [Flow control]; also notices STOP."""

    def __init__(self, node: Any, config: SourceConfig, log: Log) -> None:
        self.node, self.config, self.log = node, config, log
        self.enabled = config.window > 0
        self.pending: deque[tuple[int, int]] = deque()
        self.pending_bytes = 0
        self.acked = -1
        self.heard = False
        self.stopped = False

    def _handle(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        if kind == "STOP":
            self.stopped = True
        elif kind == "INPUT" and event.get("id") == self.config.ack_input:
            try:
                self.acked = max(self.acked, int(event["value"][0].as_py()))
                self.heard = True
            except (TypeError, ValueError, IndexError, KeyError, AttributeError):
                self.log(f"tensor_source: ignoring malformed ack {event.get('value')!r:.80}")
            while self.pending and self.pending[0][0] <= self.acked:
                self.pending_bytes -= self.pending.popleft()[1]

    def _next(self, timeout: float) -> None:
        event = self.node.next(timeout=timeout)
        if event is None:
            time.sleep(0.005)  # an ended event stream returns None at once: don't spin
        else:
            self._handle(event)

    def poll(self) -> None:
        while (event := self.node.try_recv()) is not None:
            self._handle(event)

    def _full(self, nbytes: int) -> bool:
        return bool(self.pending) and (
            len(self.pending) >= self.config.window
            or self.pending_bytes + nbytes > self.config.window_bytes
        )

    def wait(self, until: Callable[[], bool]) -> None:
        """Handle events until ``until()`` holds, STOP arrives or acks time out."""
        deadline = time.monotonic() + self.config.ack_timeout
        while self.enabled and not self.stopped and not until():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.log(
                    f"tensor_source: WARNING no ack from the validator for "
                    f"{self.config.ack_timeout:g}s (is its 'ack' output wired to this node's "
                    f"'{self.config.ack_input}' input?); sending without flow control"
                )
                self.enabled = False
                return
            self._next(min(remaining, 0.5))

    def handshake(self, send_hello: Callable[[], None]) -> int:
        """Say hello until the validator answers: dora drops what is sent before routes exist."""
        deadline = time.monotonic() + self.config.ack_timeout
        hellos = 0
        while self.enabled and not self.heard and not self.stopped:
            if time.monotonic() > deadline:
                self.wait(lambda: self.heard)  # warns and disables flow control
                return hellos
            send_hello()
            hellos += 1
            retry = time.monotonic() + 0.2
            while not self.heard and not self.stopped and time.monotonic() < retry:
                self._next(0.05)
        return hellos

    def before_send(self, nbytes: int) -> None:
        self.poll()
        self.wait(lambda: not self._full(nbytes))

    def sent(self, seq: int, nbytes: int) -> None:
        if self.enabled:
            self.pending.append((seq, nbytes))
            self.pending_bytes += nbytes


def _schedule(cases: Sequence[Case], config: SourceConfig) -> Iterator[tuple[int, Case]]:
    start = time.monotonic()
    seq = 0
    for round_index in range(sys.maxsize if config.duration > 0 else config.rounds):
        if round_index and config.duration > 0 and time.monotonic() - start >= config.duration:
            return
        for case in cases:
            yield seq, case
            seq += 1


def run_source(node: Any, config: SourceConfig, log: Log = _print) -> dict[str, Any]:
    """Send the configured cases on ``config.output`` of ``node``, then an end marker.

    Every message carries its case id, sequence number, the seed and the total number of
    messages (``-1`` when running for a duration; the end marker always has the total).

    Returns
    -------
    A summary: messages sent, payload bytes, seconds, whether STOP cut the run short.
    """
    device = resolve_device(config.device)
    cases = select_cases(config.cases, config.sizes)
    total = -1 if config.duration > 0 else len(cases) * config.rounds
    sender = CorruptingNode(node) if config.corrupt else node
    flow = _AckWindow(node, config, log)
    announced = "until DURATION elapses" if total < 0 else f"{total} messages"
    log(
        f"tensor_source: {len(cases)} cases x {config.rounds if total >= 0 else '*'} rounds = "
        f"{announced}, seed {config.seed}, device {device}, checksum "
        f"{'on' if config.checksum else 'off'}" + (", CORRUPTING (test)" if config.corrupt else "")
    )
    hello = {KEY_HELLO: True, KEY_SEED: config.seed}
    t0 = time.monotonic()
    hellos = flow.handshake(lambda: send(node, config.output, np.array(0), hello))
    log(f"tensor_source: validator answered after {hellos} hello(s), {time.monotonic() - t0:.2f} s")
    start = time.monotonic()
    sent = nbytes_sent = 0
    for seq, case in _schedule(cases, config):
        flow.before_send(case.nbytes or 0)
        if flow.stopped:
            break
        tensor = make_tensor(case, config.seed, seq, device if case.framework == "torch" else "cpu")
        meta = {KEY_CASE: case.id, KEY_SEQ: seq, KEY_SEED: config.seed, KEY_TOTAL: total}
        meta[KEY_CHECKSUMMED] = config.checksum
        send(sender, config.output, tensor, meta, checksum=config.checksum)
        size = int(tensor.nbytes) if isinstance(tensor, np.ndarray) else tensor.nbytes
        flow.sent(seq, size)
        sent += 1
        nbytes_sent += size
        if config.rate > 0:
            time.sleep(max(0.0, start + sent / config.rate - time.monotonic()))
    end_meta = {KEY_END: True, KEY_TOTAL: sent, KEY_SEED: config.seed}
    send(node, config.output, np.array(sent, dtype=np.int64), end_meta)
    flow.wait(lambda: flow.acked >= sent - 1)
    elapsed = time.monotonic() - start
    log(
        f"tensor_source: sent {sent} messages, {nbytes_sent / 2**20:.1f} MiB in {elapsed:.1f} s"
        + (" (stopped early)" if flow.stopped else "")
    )
    return {"sent": sent, "bytes": nbytes_sent, "seconds": elapsed, "stopped": flow.stopped}


class CorruptingNode:
    """TEST ONLY: forwards to a dora node, flipping one payload byte of every tensor message.

    Used by ``ARROW_TENSOR_TEST_CORRUPT=1`` to prove that the validator fails. The flip
    happens after encoding, on a private copy, so the source's own tensor is untouched.
    """

    def __init__(self, node: Any) -> None:
        self._node = node

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)

    def send_output(
        self, output_id: str, data: Any, metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Send ``data`` with one bit of one byte flipped (position derived from the seq)."""
        seq = (metadata or {}).get(KEY_SEQ)
        if isinstance(data, pa.Array) and isinstance(seq, int):
            data = flip_byte(data, seq * 7919)
        self._node.send_output(output_id, data, metadata)

    def send_output_raw(
        self, output_id: str, data_length: int, metadata: Mapping[str, Any] | None = None
    ) -> Any:
        """The node's writable sample, with one byte flipped just before it is sent."""
        sample = self._node.send_output_raw(output_id, data_length, metadata)
        seq = (metadata or {}).get(KEY_SEQ)
        return _CorruptingSample(sample, seq * 7919) if isinstance(seq, int) else sample


class _CorruptingSample:
    """Wraps dora's raw sample: the flip happens after the transport wrote the payload."""

    def __init__(self, sample: Any, position: int) -> None:
        self._sample, self._position, self._buffer = sample, position, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sample, name)

    def _flip(self, buffer: Any) -> None:
        raw = np.frombuffer(buffer, np.uint8)
        if raw.size:
            raw[self._position % raw.size] ^= 1
        del raw  # dora refuses to send while a view is open

    def __enter__(self) -> Any:
        self._buffer = self._sample.__enter__()
        return self._buffer

    def __exit__(self, *exc_info: Any) -> Any:
        if exc_info[0] is None:
            self._flip(self._buffer)
        self._buffer = None
        return self._sample.__exit__(*exc_info)

    def send(self) -> None:
        view = self._sample.as_memoryview()
        self._flip(view)
        view.release()
        self._sample.send()


def flip_byte(array: pa.Array, position: int) -> pa.Array:
    """TEST ONLY: a copy of ``array`` with one bit of byte ``position`` (modulo size) flipped."""
    width = array.type.bit_width // 8
    length = len(array) * width
    if length == 0:
        return array
    raw = np.frombuffer(array.buffers()[1], np.uint8, count=length, offset=array.offset * width)
    raw = raw.copy()
    raw[position % length] ^= 1
    return pa.Array.from_buffers(array.type, len(array), [None, pa.py_buffer(raw)])
