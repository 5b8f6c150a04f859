"""Deterministic test tensors and the end-to-end integrity check behind the shipped nodes.

``nodes/tensor_source`` sends, and ``nodes/validator`` checks, one message per *case*: a
framework x dtype x layout class x size, e.g. ``torch/bfloat16/channels_last/1MiB``. Every
tensor is a pure function of (seed, case id, sequence number), which travel in the message's
metadata, so the validator regenerates exactly what was sent and compares dtype, shape,
layout class and bytes. Messages are numbered: drops and reordering (dora's delivery is
lossy) are reported apart from corruption, which always fails.

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

import fnmatch
import json
import math
import os
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import _config, _dtypes, _layout, _transport
from ._codec import plan
from ._errors import (
    ArrowTensorError,
    ChecksumError,
    ConfigError,
    MetadataError,
    UnsupportedTensorError,
)

__all__ = [
    "DEFAULT_SIZES",
    "FIXED_LAYOUTS",
    "KEY_CASE",
    "KEY_CHECKSUMMED",
    "KEY_END",
    "KEY_HELLO",
    "KEY_SEED",
    "KEY_SEQ",
    "KEY_TOTAL",
    "LAYOUTS",
    "SIZED_LAYOUTS",
    "Case",
    "CorruptingNode",
    "SourceConfig",
    "Validator",
    "ValidatorConfig",
    "all_cases",
    "describe_mismatch",
    "format_table",
    "import_frameworks",
    "make_tensor",
    "random_bits",
    "resolve_device",
    "run_source",
    "run_validator",
    "select_cases",
    "write_report",
]

KEY_CASE = "test.case"
KEY_SEQ = "test.seq"
KEY_SEED = "test.seed"
KEY_TOTAL = "test.total"
KEY_END = "test.end"
KEY_HELLO = "test.hello"
KEY_CHECKSUMMED = "test.checksummed"

SIZED_LAYOUTS = (
    "contiguous",
    "transposed",
    "channels_last",
    "stepped",
    "negative",
    "expanded",
    "offset",
    "stacked",
)
FIXED_LAYOUTS = ("scalar", "empty")
LAYOUTS = SIZED_LAYOUTS + FIXED_LAYOUTS
FRAMEWORKS = ("torch", "numpy")
# torch has no negative strides; numpy has no bfloat16/float8/complex32.
_NUMPY_ONLY_LAYOUTS = ("negative",)
DEFAULT_SIZES = (0, 4 << 10, 1 << 20, 64 << 20)
_COLUMNS = 64
_BLOCK_WORDS = 1 << 17  # 1 MiB of fresh random words; larger tensors tile it with block keys
_MAX_FAILURES_KEPT = 50
Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------------------------
# Cases and deterministic tensors


@dataclass(frozen=True, order=True)
class Case:
    """One kind of test message: framework, wire dtype, layout class and target size.

    ``nbytes`` is the logical size aimed at (``numel * itemsize``, rounded down to whole
    rows); it is ``None`` for the size-less layouts ``scalar`` and ``empty``.
    """

    framework: str
    dtype: str
    layout: str
    nbytes: int | None = None

    @property
    def id(self) -> str:
        """``framework/dtype/layout[/size]``, the name used in metadata, filters and reports."""
        parts = [self.framework, self.dtype, self.layout]
        if self.nbytes is not None:
            parts.append(_config.format_size(self.nbytes))
        return "/".join(parts)

    @classmethod
    def parse(cls, case_id: object) -> Case:
        """The case named ``case_id``; raises MetadataError for anything we did not generate."""
        if not isinstance(case_id, str):
            raise MetadataError(f"{KEY_CASE!r} must be a str, got {type(case_id).__name__}")
        parts = case_id.split("/")
        expected = "framework/dtype/layout[/size], e.g. 'torch/float32/transposed/4KiB'"
        if len(parts) not in (3, 4):
            raise MetadataError(f"case id {case_id[:80]!r} is not {expected}")
        framework, dtype, layout = parts[:3]
        nbytes = None
        if len(parts) == 4:
            try:
                nbytes = _config.size(parts[3])
            except ValueError:
                raise MetadataError(f"case id {case_id[:80]!r} is not {expected}") from None
        case = cls(framework, dtype, layout, nbytes)
        if not _valid(case) or (nbytes is None) != (layout in FIXED_LAYOUTS):
            raise MetadataError(f"case id {case_id[:80]!r} names no case this version makes")
        return case


def _valid(case: Case) -> bool:
    entry = _dtypes.BY_NAME.get(case.dtype)
    if entry is None or case.layout not in LAYOUTS:
        return False
    if case.framework == "numpy":
        return entry.numpy is not None
    return case.framework == "torch" and case.layout not in _NUMPY_ONLY_LAYOUTS


def import_frameworks() -> None:
    """Import torch now, if installed: it takes seconds, better spent before joining dora.

    A node that imports torch on its first message stalls the whole dataflow meanwhile.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        pass


def _torch_dtypes() -> set[str]:
    try:
        import torch
    except ImportError:
        return set()
    return {d.name for d in _dtypes.ALL if d.torch and getattr(torch, d.torch, None) is not None}


def all_cases(sizes: Sequence[int] = DEFAULT_SIZES) -> list[Case]:
    """Every case this installation can make: framework x dtype x layout x size.

    torch cases are included when torch is importable, with the dtypes it has.
    """
    in_torch = _torch_dtypes()
    out: list[Case] = []
    for framework in FRAMEWORKS:
        for entry in _dtypes.ALL:
            if framework == "torch" and entry.name not in in_torch:
                continue
            for layout in LAYOUTS:
                for nbytes in sizes if layout in SIZED_LAYOUTS else (None,):
                    case = Case(framework, entry.name, layout, nbytes)
                    if _valid(case):
                        out.append(case)
    return out


def select_cases(patterns: Sequence[str], sizes: Sequence[int] = DEFAULT_SIZES) -> list[Case]:
    """The cases whose id matches any of the glob ``patterns`` (``*/uint8/*``, ``torch/*``).

    Raises
    ------
    ConfigError
        When the patterns match nothing (a typo would otherwise send an empty run).
    """
    universe = all_cases(sizes)
    chosen = [c for c in universe if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]
    if not chosen:
        example = universe[0].id if universe else "torch/float32/contiguous/4KiB"
        raise ConfigError(
            f"case patterns {list(patterns)} match none of the {len(universe)} cases "
            f"(ids look like {example!r}; sizes {[_config.format_size(s) for s in sizes]})"
        )
    return chosen


def random_bits(key: Sequence[int], nbytes: int) -> np.ndarray:
    """``nbytes`` reproducible pseudo-random bytes (a writable contiguous uint8 array).

    Up to 1 MiB comes straight from a PCG64 stream; beyond, that block is repeated with a
    fresh random 64-bit key XORed into each repetition, which costs one pass instead of a
    full-length generator run and still makes every 8-byte word depend on its position.
    """
    rng = np.random.default_rng(list(key))
    words = -(-nbytes // 8)
    block = min(words, _BLOCK_WORDS)
    top = np.iinfo(np.uint64).max
    base = rng.integers(0, top, size=block, dtype=np.uint64, endpoint=True)
    if words > block:
        nblocks = -(-words // block)
        keys = rng.integers(0, top, size=(nblocks, 1), dtype=np.uint64, endpoint=True)
        base = np.bitwise_xor(base[None, :], keys).reshape(-1)
    return base[:words].view(np.uint8)[:nbytes]


def _case_key(seed: int, case: Case, seq: int) -> list[int]:
    # crc32 rather than hash(): stable across processes and Python versions.
    return [seed, zlib.crc32(case.id.encode()), seq]


def _grid(case: Case, itemsize: int) -> tuple[int, int]:
    """(rows, cols) of the 2-D logical shape for a sized case."""
    n = (case.nbytes or 0) // itemsize
    cols = max(1, min(n, _COLUMNS))
    return n // cols, cols


def _channels_last_shape(n: int) -> tuple[int, int, int, int]:
    if n < 8:
        return (1, 1, 1, n)
    hw = n // 8
    h = next(d for d in range(math.isqrt(hw), 0, -1) if hw % d == 0)  # squarest exact H x W
    return (2, 4, h, hw // h)


def _base_length(case: Case, rows: int, cols: int) -> int:
    n = rows * cols
    if case.layout == "channels_last":
        return math.prod(_channels_last_shape(n))
    return {
        "stepped": 2 * n,
        "expanded": rows,
        "offset": n + 1,
        "scalar": 1,
        "empty": 0,
    }.get(case.layout, n)


class _Ops:
    """The handful of array operations the layouts need, for numpy or torch."""

    def __init__(self, framework: str) -> None:
        self.torch = framework == "torch"

    def transpose(self, x: Any, dims: Sequence[int]) -> Any:
        return x.permute(*dims) if self.torch else x.transpose(dims)

    def expand(self, x: Any, shape: tuple[int, ...]) -> Any:
        return x.expand(*shape) if self.torch else np.broadcast_to(x, shape)

    def stack(self, parts: list[Any], dim: int) -> Any:
        if self.torch:
            import torch

            return torch.stack(parts, dim=dim)
        return np.stack(parts, axis=dim)

    def cat(self, parts: list[Any], dim: int) -> Any:
        if self.torch:
            import torch

            return torch.cat(parts, dim=dim)
        return np.concatenate(parts, axis=dim)


def _apply_layout(case: Case, base: Any, rows: int, cols: int, ops: _Ops) -> Any:
    n = rows * cols
    layout = case.layout
    if layout == "contiguous":
        return base[:n].reshape(rows, cols)
    if layout == "transposed":
        return ops.transpose(base[:n].reshape(cols, rows), (1, 0))
    if layout == "channels_last":
        nb, c, h, w = _channels_last_shape(n)
        return ops.transpose(base.reshape(nb, h, w, c), (0, 3, 1, 2))
    if layout == "stepped":
        return base.reshape(rows, 2 * cols)[:, ::2]
    if layout == "negative":
        return base.reshape(rows, cols)[::-1, ::-1]
    if layout == "expanded":
        return ops.expand(base.reshape(rows, 1), (rows, cols))
    if layout == "offset":
        return base[1:].reshape(rows, cols)
    if layout == "stacked":
        # dora#978: results of torch.stack/cat sent as the wrong memory. Stack strided views.
        grid = base.reshape(rows, cols)
        if cols % 4:
            return ops.stack([grid], dim=1)
        parts = [grid[:, i::4] for i in range(4)]
        return ops.cat([ops.stack(parts[:2], dim=1), ops.stack(parts[2:], dim=1)], dim=0)
    if layout == "scalar":
        return base.reshape(())
    return base.reshape(3, 0, 5)  # empty


def make_tensor(case: Case, seed: int, seq: int, device: str = "cpu") -> Any:
    """The tensor of ``case`` for message ``seq`` of a run seeded with ``seed``.

    The same arguments give the same dtype, shape, strides and bits in any process.

    Parameters
    ----------
    case:
        What to make (see :func:`all_cases`).
    seed, seq:
        The run's seed and the message's sequence number.
    device:
        For torch cases, where the tensor lives (``"cpu"`` or ``"cuda"``); the bits are made
        on the host and moved, so they are identical on every device.

    Returns
    -------
    A ``torch.Tensor`` or a ``numpy.ndarray``.
    """
    entry = _dtypes.BY_NAME[case.dtype]
    rows, cols = _grid(case, entry.itemsize) if case.nbytes is not None else (0, 0)
    count = _base_length(case, rows, cols)
    bits = random_bits(_case_key(seed, case, seq), count * entry.itemsize)
    if case.dtype == "bool":
        np.bitwise_and(bits, 1, out=bits)  # only 0 and 1 are valid bools
    ops = _Ops(case.framework)
    if case.framework == "numpy":
        return _apply_layout(case, bits.view(entry.numpy_dtype), rows, cols, ops)
    import torch

    # Layout ops run on a same-width integer carrier: float8/float4/complex32 lack kernels.
    carrier = bits.view(np.complex128 if entry.itemsize == 16 else f"<u{entry.itemsize}")
    if entry.itemsize in (2, 4, 8):
        carrier = carrier.view(f"<i{entry.itemsize}")  # torch's stack/cat lack some uints
    base = torch.from_numpy(carrier).to(device)
    return _apply_layout(case, base, rows, cols, ops).view(_dtypes.torch_dtype(entry))


def resolve_device(requested: str) -> str:
    """``cpu`` or ``cuda`` for a requested ``auto|cpu|cuda``.

    Raises
    ------
    ConfigError
        When ``cuda`` is requested and torch cannot see a CUDA device.
    """
    if requested == "cpu":
        return "cpu"
    try:
        import torch

        available = bool(torch.cuda.is_available())
    except ImportError:
        available = False
    if available:
        return "cuda"
    if requested == "cuda":
        raise ConfigError(
            "DEVICE='cuda' but torch sees no CUDA device (torch missing, CPU-only build, or "
            "no GPU); use DEVICE=auto to fall back to the CPU, or DEVICE=cpu"
        )
    return "cpu"


# --------------------------------------------------------------------------------------------
# Comparison


def _identity(x: Any) -> tuple[str, str]:
    if isinstance(x, np.ndarray):
        return "numpy", _dtypes.from_numpy(x.dtype).name
    if "torch" in sys.modules:
        import torch

        if isinstance(x, torch.Tensor):
            return "torch", _dtypes.from_torch(x.dtype).name
    raise UnsupportedTensorError(f"expected a tensor, got {type(x).__name__}")


def _host_bits(x: Any) -> np.ndarray:
    """The bits of ``x`` as a numpy array of the same shape and strides (host memory)."""
    if isinstance(x, np.ndarray):
        return x
    from . import _torch

    return _torch.to_numpy_bits(x.cpu())[0]


def _element_strides(bits: np.ndarray) -> list[int]:
    return [s // bits.itemsize for s in bits.strides]


def describe_mismatch(expected: Any, received: Any) -> str | None:
    """How ``received`` differs from ``expected`` after a trip through arrow_tensor, or None.

    Checks, in order: framework and dtype, shape, layout class (the strides the wire format
    promises: the source's own for dense layouts, the closest dense order otherwise) and
    every byte.
    """
    try:
        got = _identity(received)
    except ArrowTensorError as exc:
        return f"type: {exc}"
    want = _identity(expected)
    if got != want:
        return f"dtype: expected {want[0]} {want[1]}, received {got[0]} {got[1]}"
    e_bits, r_bits = _host_bits(expected), _host_bits(received)
    if e_bits.shape != r_bits.shape:
        return f"shape: expected {list(e_bits.shape)}, received {list(r_bits.shape)}"
    if e_bits.size:
        want_strides = _layout.dense_strides(e_bits.shape, plan(e_bits).header.perm)
        got_strides = _element_strides(r_bits)
        real = [i for i, n in enumerate(e_bits.shape) if n > 1]
        if [want_strides[i] for i in real] != [got_strides[i] for i in real]:
            return f"layout: expected strides {want_strides}, received {got_strides}"
    e_raw = np.ascontiguousarray(e_bits).reshape(-1).view(np.uint8)
    r_raw = np.ascontiguousarray(r_bits).reshape(-1).view(np.uint8)
    if not np.array_equal(e_raw, r_raw):
        wrong = np.flatnonzero(e_raw != r_raw)
        return (
            f"bytes: {wrong.size} of {e_raw.size} bytes differ, first at byte {wrong[0]} "
            f"(expected 0x{e_raw[wrong[0]]:02x}, received 0x{r_raw[wrong[0]]:02x})"
        )
    return None


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
    hellos = flow.handshake(lambda: _transport.send(node, config.output, np.array(0), hello))
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
        _transport.send(sender, config.output, tensor, meta, checksum=config.checksum)
        size = int(tensor.nbytes) if isinstance(tensor, np.ndarray) else tensor.nbytes
        flow.sent(seq, size)
        sent += 1
        nbytes_sent += size
        if config.rate > 0:
            time.sleep(max(0.0, start + sent / config.rate - time.monotonic()))
    end_meta = {KEY_END: True, KEY_TOTAL: sent, KEY_SEED: config.seed}
    _transport.send(node, config.output, np.array(sent, dtype=np.int64), end_meta)
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
            data = _flip_byte(data, seq * 7919)
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


def _flip_byte(array: pa.Array, position: int) -> pa.Array:
    width = array.type.bit_width // 8
    length = len(array) * width
    if length == 0:
        return array
    raw = np.frombuffer(array.buffers()[1], np.uint8, count=length, offset=array.offset * width)
    raw = raw.copy()
    raw[position % length] ^= 1
    return pa.Array.from_buffers(array.type, len(array), [None, pa.py_buffer(raw)])


# --------------------------------------------------------------------------------------------
# Validator


@dataclass(frozen=True)
class ValidatorConfig:
    """Settings of ``nodes/validator`` (see :meth:`from_env` for the variables)."""

    report_path: str = "out/arrow_tensor_report.json"
    max_drop_fraction: float = 0.0
    verify: str = "auto"
    progress_interval: float = 1.0
    input: str = "tensors"
    ack_output: str = "ack"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ValidatorConfig:
        """Read the validator settings from environment variables.

        ``REPORT_PATH`` (JSON report, relative to the dataflow's folder),
        ``MAX_DROP_FRACTION`` (0..1: dropped messages alone fail the run above this share),
        ``VERIFY`` (``auto|on|off``: checksum verification; ``auto`` verifies messages that
        carry one) and ``PROGRESS_INTERVAL`` (seconds between progress lines).

        Raises
        ------
        ConfigError
            Naming the variable, the value and what was expected.
        """
        d = cls()
        get = _config.setting
        return cls(
            report_path=get("REPORT_PATH", _config.text, d.report_path, environ=environ),
            max_drop_fraction=get(
                "MAX_DROP_FRACTION", _config.number(0, 1), d.max_drop_fraction, environ=environ
            ),
            verify=get("VERIFY", _config.choice("auto", "on", "off"), d.verify, environ=environ),
            progress_interval=get(
                "PROGRESS_INTERVAL", _config.duration, d.progress_interval, environ=environ
            ),
        )


@dataclass
class _Tally:
    cases: set[str] = field(default_factory=set)
    messages: int = 0
    ok: int = 0
    corrupt: int = 0
    undecodable: int = 0
    bytes: int = 0


class Validator:
    """Checks received messages against regenerated tensors and keeps the counts.

    Feed it every message of the validated input with :meth:`handle`; :meth:`report` gives
    the verdict. Outcomes per message: ``ok``, ``corrupt`` (dtype, shape, layout, bytes or
    checksum differ), ``undecodable`` (ours, but arrow_tensor or the case id rejects it),
    ``foreign`` (not from tensor_source: logged, counted, skipped) or ``end`` (the marker).
    """

    def __init__(self, config: ValidatorConfig | None = None, log: Log = _print) -> None:
        self.config = config or ValidatorConfig()
        self.log = log
        self._receivers = {verify: _transport.Receiver(verify=verify) for verify in (False, True)}
        self.start = time.monotonic()
        self._last_progress = self.start
        self.seen: set[int] = set()
        self.highest = -1
        self.duplicates = self.reordered = self.foreign = 0
        self.announced_total: int | None = None
        self.end_total: int | None = None
        self.seeds: set[int] = set()
        self.classes: dict[str, _Tally] = {}
        self.cases: dict[str, _Tally] = {}
        self.failures: list[dict[str, Any]] = []
        self.last_seq: int | None = None

    # one message ----------------------------------------------------------------------------
    def handle(self, array: Any, metadata: Mapping[str, Any]) -> str:
        """Check one received message; returns its outcome (see the class docstring)."""
        self.last_seq = None
        meta = metadata if isinstance(metadata, Mapping) else {}
        if meta.get(KEY_END) is True:
            total = meta.get(KEY_TOTAL)
            if isinstance(total, int) and total >= 0:
                self.end_total = total
                return "end"
        if meta.get(KEY_HELLO) is True:
            self.last_seq = -1  # acknowledged, so the source knows we are listening
            return "hello"
        if KEY_CASE not in meta or not isinstance(meta.get(KEY_SEQ), int):
            return self.skip(meta, "it has no test.case/test.seq metadata")
        seq, case_id, seed = meta[KEY_SEQ], meta[KEY_CASE], meta.get(KEY_SEED)
        total = meta.get(KEY_TOTAL)
        if isinstance(total, int) and total >= 0:
            self.announced_total = total
        # The source says whether it attached checksums, identically on every chunk of a value.
        verify = self.config.verify == "on" or (
            self.config.verify == "auto" and meta.get(KEY_CHECKSUMMED, "at.checksum" in meta)
        )
        layout = None
        try:
            case = Case.parse(case_id)
            layout = case.layout
            if not isinstance(seed, int):
                raise MetadataError(f"{KEY_SEED!r} must be an int, got {seed!r:.40}")
            received = self._receivers[bool(verify)].receive(array, meta)
        except ArrowTensorError as exc:
            outcome = "corrupt" if isinstance(exc, ChecksumError) else "undecodable"
            self._number(seq)
            self._record(str(case_id), layout, outcome, 0, seq, f"{type(exc).__name__}: {exc}")
            return outcome
        if received is None:
            return "incomplete"  # one chunk of a larger value: numbered once it is whole
        self._number(seq)
        self.seeds.add(seed)
        expected = make_tensor(case, seed, seq)
        problem = describe_mismatch(expected, received)
        outcome = "ok" if problem is None else "corrupt"
        self._record(case.id, layout, outcome, int(_host_bits(expected).nbytes), seq, problem)
        return outcome

    def skip(self, meta: Mapping[str, Any], why: str) -> str:
        """Count (and log, the first ten) a message that is not ours; returns ``"foreign"``."""
        self.foreign += 1
        if self.foreign <= 10:
            keys = sorted(k for k in meta if k != "timestamp")[:8]
            self.log(f"validator: skipping a message that is not ours ({why}; keys {keys})")
        return "foreign"

    def _number(self, seq: int) -> None:
        self.last_seq = seq
        if seq in self.seen:
            self.duplicates += 1
        elif seq < self.highest:
            self.reordered += 1
        self.seen.add(seq)
        self.highest = max(self.highest, seq)

    def _record(
        self, case_id: str, layout: str | None, outcome: str, nbytes: int, seq: int, why: Any
    ) -> None:
        for tally in (
            self.classes.setdefault(layout or "(unknown)", _Tally()),
            self.cases.setdefault(case_id, _Tally()),
        ):
            tally.cases.add(case_id)
            tally.messages += 1
            tally.bytes += nbytes
            setattr(tally, outcome, getattr(tally, outcome) + 1)
        if outcome != "ok":
            if len(self.failures) < _MAX_FAILURES_KEPT:
                self.failures.append({"seq": seq, "case": case_id, "kind": outcome, "detail": why})
            if len(self.failures) <= 10:
                self.log(f"validator: {outcome.upper()} seq {seq} {case_id}: {why}")

    # progress and verdict -------------------------------------------------------------------
    def _sum(self, name: str) -> int:
        return sum(getattr(t, name) for t in self.classes.values())

    def progress_line(self) -> str:
        """One line: messages checked of expected, MiB, problems so far."""
        total = self.end_total if self.end_total is not None else self.announced_total
        of = f"/{total}" if total is not None else ""
        return (
            f"validator: {self._sum('messages')}{of} messages, {self._sum('bytes') / 2**20:.1f} "
            f"MiB checked, {self._sum('corrupt')} corrupt, {self._sum('undecodable')} "
            f"undecodable, {self.reordered} reordered, {self.foreign} foreign"
        )

    def maybe_progress(self) -> None:
        """Log :meth:`progress_line` if ``progress_interval`` has passed since the last one."""
        now = time.monotonic()
        if now - self._last_progress >= self.config.progress_interval:
            self._last_progress = now
            self.log(self.progress_line())

    def _missing(self, total: int | None, limit: int) -> list[int]:
        end = total if total is not None else self.highest + 1
        return [seq for seq in range(end) if seq not in self.seen][:limit]

    def close(self) -> None:
        """End of stream: log chunked values that never completed (their seqs count as drops)."""
        for receiver in self._receivers.values():
            try:
                receiver.close()
            except ArrowTensorError as exc:
                self.log(f"validator: incomplete value(s) at the end of the stream: {exc}")

    def report(self) -> dict[str, Any]:
        """The verdict and every count, as a JSON-ready dict (``passed`` is the verdict)."""
        total = self.end_total if self.end_total is not None else self.announced_total
        unique = len(self.seen)
        dropped = (total if total is not None else self.highest + 1) - unique
        dropped = max(dropped, 0)
        denominator = max(total or 0, unique + dropped, 1)
        corrupt, undecodable = self._sum("corrupt"), self._sum("undecodable")
        reasons = []
        if corrupt:
            reasons.append(f"{corrupt} corrupted message(s)")
        if undecodable:
            reasons.append(f"{undecodable} message(s) could not be decoded")
        if unique == 0:
            reasons.append("no test message arrived")
        if dropped / denominator > self.config.max_drop_fraction:
            reasons.append(
                f"{dropped} of {denominator} messages dropped, more than the allowed "
                f"MAX_DROP_FRACTION={self.config.max_drop_fraction:g}"
            )
        elapsed = time.monotonic() - self.start
        return {
            "passed": not reasons,
            "verdict": "FAIL" if reasons else "PASS",
            "reasons": reasons,
            "expected_total": total,
            "total_known": total is not None,
            "end_marker": self.end_total is not None,
            "seeds": sorted(self.seeds),
            "received": self._sum("messages"),
            "unique": unique,
            "ok": self._sum("ok"),
            "corrupt": corrupt,
            "undecodable": undecodable,
            "dropped": dropped,
            "drop_fraction": dropped / denominator,
            "max_drop_fraction": self.config.max_drop_fraction,
            "missing_seqs": self._missing(total, 100),
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "foreign": self.foreign,
            "bytes": self._sum("bytes"),
            "seconds": round(elapsed, 3),
            "classes": {k: _tally_json(t) for k, t in sorted(self.classes.items())},
            "cases": {k: _tally_json(t, with_cases=False) for k, t in sorted(self.cases.items())},
            "failures": self.failures,
            "config": asdict(self.config),
        }


def _tally_json(tally: _Tally, with_cases: bool = True) -> dict[str, Any]:
    out = asdict(tally)
    out.pop("cases")
    if with_cases:
        out["cases"] = len(tally.cases)
    return out


def format_table(report: Mapping[str, Any]) -> str:
    """The per-layout-class summary table and the verdict line of a validator report."""
    head = f"{'layout class':<14} {'cases':>6} {'msgs':>6} {'ok':>6} {'corrupt':>8} "
    head += f"{'undecod.':>8} {'MiB':>9}"
    lines = [head, "-" * len(head)]
    rows = list(report["classes"].items())
    totals = {
        k: sum(r[k] for _, r in rows) for k in ("cases", "messages", "ok", "corrupt", "bytes")
    }
    totals["undecodable"] = sum(r["undecodable"] for _, r in rows)
    for name, r in [*rows, ("TOTAL", totals)]:
        if name == "TOTAL":
            lines.append("-" * len(head))
        lines.append(
            f"{name:<14} {r['cases']:>6} {r['messages']:>6} {r['ok']:>6} {r['corrupt']:>8} "
            f"{r['undecodable']:>8} {r['bytes'] / 2**20:>9.1f}"
        )
    total = report["expected_total"]
    lines.append(
        f"{report['verdict']}: {report['unique']} of {total if total is not None else '?'} "
        f"messages arrived, {report['corrupt']} corrupt, {report['undecodable']} undecodable, "
        f"{report['dropped']} dropped, {report['reordered']} reordered, "
        f"{report['duplicates']} duplicated, {report['foreign']} foreign, "
        f"in {report['seconds']:.1f} s"
    )
    lines.extend(f"  - {reason}" for reason in report["reasons"])
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``report`` as JSON to ``path`` (parents created, replaced atomically)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(target)
    return target


def run_validator(node: Any, config: ValidatorConfig, log: Log = _print) -> dict[str, Any]:
    """Validate every message on ``config.input`` of ``node`` until its events end.

    Keeps iterating after STOP: dora delivers STOP ahead of inputs still queued. Acks each
    checked message on ``config.ack_output`` when the node declares that output. Writes the
    JSON report to ``config.report_path`` and logs the table.

    Returns
    -------
    The report (see :meth:`Validator.report`).
    """
    validator = Validator(config, log)
    outputs = (node.node_config() or {}).get("outputs") or []
    ack = config.ack_output if config.ack_output in outputs else None
    for event in node:
        kind = event.get("type")
        if kind == "ERROR":
            log(f"validator: dora reported an error: {event.get('error', event)!r:.200}")
        if kind != "INPUT":
            continue
        if event.get("id") != config.input:
            validator.skip(event.get("metadata") or {}, f"it came on input {event.get('id')}")
            continue
        validator.handle(event["value"], event.get("metadata") or {})
        if ack is not None and validator.last_seq is not None:
            node.send_output(ack, pa.array([validator.last_seq], pa.int64()))
        validator.maybe_progress()
    validator.close()
    report = validator.report()
    path = write_report(report, config.report_path)
    log(validator.progress_line())
    log(format_table(report))
    log(f"validator: report written to {path.resolve()}")
    return report
