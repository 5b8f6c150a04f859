"""The CUDA IPC transport above the device layer, on CPU, against the host stand-in.

``memory.cuda._standin.HostStandIn`` implements the same narrow interface as the real CUDA backends
over owner-only /dev/shm blocks that several arrays share (like a caching allocator's
blocks), so offsets, the handle cache, lifetimes, fallback decisions and descriptor
validation run here for real, including across processes. Nothing here touches a GPU; the
GPU half lives in tests/gpu.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
import yaml
from arrow_tensor import (
    ChecksumError,
    CudaUnavailableError,
    MetadataError,
    PayloadError,
    PoolExhaustedError,
    ShmHandleError,
    StaleHandleError,
)
from arrow_tensor.codec import _dtypes, _schema
from arrow_tensor.memory import _blocks
from arrow_tensor.memory.cuda import _descriptor, _handles, _pyarrow, _receive, _select
from arrow_tensor.memory.cuda import _ipc as _cuda_ipc
from arrow_tensor.memory.cuda import _standin as _cuda_backend
from arrow_tensor.memory.cuda._torch import TorchCudaBackend
from arrow_tensor.transport import _facts
from dora.testing import MockNode
from hypothesis import given
from hypothesis import strategies as st

DATAFLOW = str(uuid.UUID(int=0x5EED))


def as_node(node_id: str) -> None:
    """Act as node ``node_id`` of the test dataflow (receiver index lookups use it)."""
    _blocks.set_identity(_blocks.Identity(DATAFLOW, node_id))
    _receive.forget_blocks()


def host(sb: _cuda_backend.HostStandIn, a: np.ndarray) -> _cuda_backend.StandInArray:
    return sb.allocator.asarray(a)


# --- offsets inside allocations (dora-rs/dora#978) ----------------------------------------


def test_stacked_small_tensors_round_trip_at_their_offsets(sb: Any) -> None:
    """The #978 repro: small tensors share one block; each must arrive from its own offset."""
    rng = np.random.default_rng(978)
    for _ in range(100):
        a = host(sb, rng.standard_normal(3).astype(np.float32))
        b = host(sb, rng.standard_normal(3).astype(np.float32))
        stacked = sb.allocator.stack([a, b])
        assert stacked.block is a.block
        assert stacked.offset > 0
        array, meta = at.encode(stacked)
        assert meta["at.cuda.offset"] == stacked.offset
        out = at.decode(array, meta)
        np.testing.assert_array_equal(out, np.stack([a.view, b.view]))
        del out
    assert _cuda_ipc.in_flight() == 0


def test_no_payload_bytes_travel(sb: Any) -> None:
    x = host(sb, np.arange(1 << 16, dtype=np.float64))
    array, meta = at.encode(x)
    assert array.type == pa.uint8()
    assert len(array) == 128
    assert array.buffers()[1].to_pybytes()[:64].rstrip(b"\0").decode() == x.block.name
    assert meta["at.kind"] == "cuda"
    assert meta["at.cuda.alloc_size"] == x.block.size


LAYOUTS = {
    "contiguous": lambda x: x,
    "transposed": lambda x: x.T,
    "permuted": lambda x: x.transpose(1, 0, 2),
    "stepped": lambda x: x[:, ::2],
    "negative": lambda x: x[::-1],
    "offset_view": lambda x: x[1:],
    "expanded": lambda x: _cuda_backend.StandInArray(
        np.broadcast_to(x.view[:1], x.shape), x.block, x.storage
    ),
    "scalar": lambda x: x[0, 0, 0],
    "empty": lambda x: x[:, :0],
}
DENSE = {"contiguous", "transposed", "permuted", "offset_view", "scalar"}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [e.numpy for e in _dtypes.ALL if e.numpy is not None], ids=str)
def test_every_layout_and_dtype_is_exact(sb: Any, layout: str, dtype: str) -> None:
    dt = np.dtype(dtype)
    raw = np.random.default_rng(7).integers(0, 256, 4 * 6 * 5 * dt.itemsize, dtype=np.uint8)
    if dt.kind == "b":
        raw &= 1
    base = host(sb, raw.view(dt).reshape(4, 6, 5))
    x = LAYOUTS[layout](base)
    array, meta = at.encode(x)
    out = at.decode(array, meta)
    expected = x.view
    assert out.shape == expected.shape
    assert out.dtype == expected.dtype
    same_bytes = np.ascontiguousarray(out).view(np.uint8)
    np.testing.assert_array_equal(same_bytes, np.ascontiguousarray(expected).view(np.uint8))
    assert not out.flags.writeable or out.size == 0
    if x.view.size and layout in DENSE:  # sent as it lies: same block, same offset
        assert meta["at.cuda.offset"] == x.offset
        assert out.strides == expected.strides
    elif x.view.size:  # compacted once into memory only the transport references
        assert meta["at.cuda.offset"] != x.offset or meta["at.cuda.alloc_size"] != x.block.size
    else:
        assert len(array) == 0
        assert meta["at.cuda.block"] == ""


# --- the handle cache -----------------------------------------------------------------------


def test_each_handle_opens_once_and_closes_after_the_last_tensor(sb: Any) -> None:
    a = host(sb, np.arange(4, dtype=np.int32))
    b = host(sb, np.arange(4, 8, dtype=np.int32))
    assert a.block is b.block
    ya = at.decode(*at.encode(a))
    yb = at.decode(*at.encode(b))
    view_of_b = yb[1:]  # a view must keep the mapping alive on its own
    assert sb.opens == 1
    assert _handles.opened.refs() == 2
    del ya
    assert sb.closes == 0
    del yb
    assert sb.closes == 0
    assert list(view_of_b) == [5, 6, 7]
    del view_of_b
    assert sb.closes == 1
    assert len(_handles.opened) == 0
    again = at.decode(*at.encode(a))  # a closed handle can be opened again
    assert sb.opens == 2
    assert list(again) == [0, 1, 2, 3]


def test_event_is_waited_before_the_tensor_is_built(sb: Any) -> None:
    x = host(sb, np.ones(8, np.float32))
    array, meta = at.encode(x)
    at.decode(array, meta)
    assert sb.waited == [array.buffers()[1].to_pybytes()[64:128]]


# --- lifetimes ------------------------------------------------------------------------------


def test_the_device_encoder_refuses_what_no_decoder_accepts(sb: Any) -> None:
    """The same bound as the host encoder: an empty tensor of huge dimensions."""
    as_node("producer")
    x = host(sb, np.empty((0, 2**62 + 1), np.int8))
    with pytest.raises(at.UnsupportedTensorError, match=r"spans more than 2\*\*62 bytes"):
        _cuda_ipc.encode_cuda(x, receivers=("left",))
    fine = host(sb, np.empty((0, 2**58), np.int8))
    array, meta = _cuda_ipc.encode_cuda(fine, receivers=("left",))
    as_node("left")
    assert at.decode(array, meta).shape == (0, 2**58)


def test_memory_stays_referenced_until_every_receiver_released(sb: Any) -> None:
    as_node("producer")
    x = host(sb, np.arange(16, dtype=np.uint8))
    array, meta = _cuda_ipc.encode_cuda(x, receivers=("left", "right"))
    del x  # the producer drops its own reference: the transport keeps one
    assert _cuda_ipc.in_flight() == 1
    as_node("left")
    left = at.decode(array, meta)
    as_node("right")
    right = at.decode(array, meta)
    del left
    assert _cuda_ipc.in_flight() == 1  # "right" still reads it
    assert list(right) == list(range(16))
    del right
    assert _cuda_ipc.in_flight() == 0


def test_dropped_messages_are_reclaimed(sb: Any) -> None:
    """dora drops silently: a later message taken by the receiver frees the skipped ones."""
    messages = [at.encode(host(sb, np.full(4, i, np.int16))) for i in range(3)]
    assert _cuda_ipc.in_flight() == 3
    last = at.decode(*messages[2])  # messages 0 and 1 were "dropped" by dora
    deadline = time.monotonic() + 10  # the overtake grace of _slots is 50 ms
    while _cuda_ipc.in_flight() > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _cuda_ipc.in_flight() == 1
    with pytest.raises(StaleHandleError, match=r"reused|no longer holds"):
        at.decode(*messages[0])  # arrives after it was presumed dropped
    assert list(last) == [2, 2, 2, 2]


def test_in_flight_is_bounded_and_exhaustion_raises(
    sb: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARROW_TENSOR_CUDA_SLOTS", "2")
    held = [at.decode(*at.encode(host(sb, np.zeros(4, np.float32)))) for _ in range(2)]
    with pytest.raises(PoolExhaustedError, match="2 in-flight CUDA slots"):
        at.encode(host(sb, np.zeros(4, np.float32)))
    held.pop()
    array, meta = at.encode(host(sb, np.ones(4, np.float32)))
    assert list(at.decode(array, meta)) == [1, 1, 1, 1]


def test_a_received_tensor_is_read_only_and_writable_gives_a_private_copy(sb: Any) -> None:
    x = host(sb, np.arange(6, dtype=np.float32).reshape(2, 3))
    array, meta = at.encode(x)
    view = at.decode(array, meta)
    with pytest.raises(ValueError, match="read-only"):
        view[0, 0] = 1
    mine = at.decode(array, meta, writable=True)
    mine[0, 0] = 42
    assert view[0, 0] == 0
    assert x.view[0, 0] == 0


@pytest.mark.parametrize("device", ["cpu", "cuda:0", "cuda"])
def test_decode_device(sb: Any, device: str) -> None:
    x = host(sb, np.arange(6, dtype=np.int64).reshape(2, 3).T.copy())
    array, meta = at.encode(x)
    out = at.decode(array, meta, device=device)
    np.testing.assert_array_equal(out, x.view)
    if device == "cpu":
        assert out.flags.writeable
        assert not np.shares_memory(out, x.view)


def test_checksum_detects_a_change_of_the_producer_memory(sb: Any) -> None:
    x = host(sb, np.arange(32, dtype=np.uint32))
    array, meta = at.encode(x, checksum=True)
    assert list(at.decode(array, meta, verify=True)) == list(range(32))
    x.view[3] = 99  # the producer wrote into memory it had sent
    with pytest.raises(ChecksumError):
        at.decode(array, meta, verify=True)


# --- across processes: real mappings, a crashed producer --------------------------------------

PRODUCER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import arrow_tensor as at
    from arrow_tensor.memory.cuda import _standin as _cuda_backend
    sb = _cuda_backend.standin()
    out = []
    for i in range(3):
        x = sb.allocator.asarray(np.arange(i, i + 1000, dtype=np.float32))
        array, meta = at.encode(x[::-1])
        out.append([list(array.buffers()[1].to_pybytes()), meta])
    print(json.dumps(out), flush=True)
    time.sleep(60)
    """
)


def _spawn_producer() -> tuple[subprocess.Popen[str], list[tuple[pa.Array, dict[str, Any]]]]:
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    messages = [(pa.array(raw, pa.uint8()), meta) for raw, meta in json.loads(line)]
    return proc, messages


def test_another_process_reads_exactly_and_a_killed_producer_gives_a_clear_error(
    sb: Any,
) -> None:
    proc, messages = _spawn_producer()
    try:
        first = at.decode(*messages[0])
        np.testing.assert_array_equal(first, np.arange(999, -1, -1, dtype=np.float32))
        assert sb.opens == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        with pytest.raises(StaleHandleError, match="exited or crashed"):
            at.decode(*messages[1])
        # Host pages outlive their creator while mapped (CUDA memory would not: see SPEC).
        assert first[0] == 999
    finally:
        proc.kill()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()
        for name in os.listdir("/dev/shm"):
            if f"-{proc.pid}-" in name:
                os.unlink(os.path.join("/dev/shm", name))


# --- fallback decisions from a real dataflow descriptor ---------------------------------------

DATAFLOW_YAML = """
nodes:
  - id: camera
    path: camera.py
    outputs: [frames, remote_frames, cpu_frames, forced_frames]
  - id: detector
    path: detector.py
    inputs:
      frames: camera/frames
  - id: recorder
    path: recorder.py
    inputs:
      frames: {source: camera/frames, queue_size: 4}
  - id: uplink
    path: uplink.py
    deploy: {machine: cloud}
    inputs:
      frames: camera/remote_frames
  - id: logger
    path: logger.py
    env: {CUDA_VISIBLE_DEVICES: ""}
    inputs:
      frames: camera/cpu_frames
  - id: archiver
    path: archiver.py
    env: {ARROW_TENSOR_TRANSPORT: host}
    inputs:
      frames: camera/forced_frames
"""


@pytest.mark.parametrize(
    ("output", "environ", "expected"),
    [
        ("frames", {}, None),
        ("frames", {"ARROW_TENSOR_TRANSPORT": "host"}, "ARROW_TENSOR_TRANSPORT=host"),
        ("remote_frames", {}, "another machine"),
        ("remote_frames", {"DORA_MACHINE_ID": "cloud"}, None),
        ("frames", {"DORA_MACHINE_ID": "cloud"}, "another machine"),
        ("cpu_frames", {}, "no CUDA device"),
        ("forced_frames", {}, "asks for the host path"),
    ],
)
def test_host_fallback_decisions_from_the_dataflow_yaml(
    output: str, environ: dict[str, str], expected: str | None
) -> None:
    descriptor = yaml.safe_load(DATAFLOW_YAML)
    receivers = _facts.receivers_of(descriptor, "camera", output)
    machine = _facts.own_machine(descriptor, "camera", environ)
    reason = _facts.cuda_reason(descriptor, receivers, machine, environ)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None
        assert expected in reason


def test_expandable_segments_are_detected_without_a_gpu() -> None:
    torch = pytest.importorskip("torch")
    env = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128,expandable_segments:True"}
    problem = _cuda_ipc.legacy_ipc_problem(torch.zeros(1), env)
    assert problem is not None
    assert "expandable segments" in problem
    assert _cuda_ipc.legacy_ipc_problem(torch.zeros(1), {}) is None


# --- hostile descriptors --------------------------------------------------------------------


def _valid(sb: Any) -> tuple[pa.Array, dict[str, Any]]:
    array, meta = at.encode(host(sb, np.arange(64, dtype=np.float32).reshape(8, 8)))
    assert meta[_schema.KEY_TENSOR] == "numpy;float32;8,8;0,1"
    return array, meta


def _with_header(meta: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """``meta`` with some of its ``at.tensor`` fields replaced, unvalidated."""
    header = _schema.parse_text(meta[_schema.KEY_TENSOR])
    values = {
        "framework": header.framework,
        "dtype": header.dtype.name,
        "shape": header.shape,
        "perm": header.perm,
        **fields,
    }
    return {**meta, _schema.KEY_TENSOR: _schema.pack(**values)}


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a, m: (pa.array(np.zeros(100, np.uint8)), m), PayloadError, "128 bytes"),
        (lambda a, m: (a.cast(pa.uint16()), m), PayloadError, "holds 256 bytes"),
        (
            lambda a, m: (a, {**m, "at.cuda.offset": m["at.cuda.alloc_size"]}),
            MetadataError,
            "past the end",
        ),
        (lambda a, m: (a, _with_header(m, shape=[8, 1 << 40])), MetadataError, "past the end"),
        # A negative dimension has no canonical decimal form: refused as such.
        (lambda a, m: (a, _with_header(m, shape=[8, -8])), MetadataError, "no signs"),
        (
            lambda a, m: (a, _with_header(m, shape=[1 << 40] * 3, perm=[0, 1, 2])),
            MetadataError,
            r"spans more than 2\*\*62 bytes",
        ),
        (lambda a, m: (a, _with_header(m, perm=[0, 2])), MetadataError, "permutation"),
        (lambda a, m: (a, _with_header(m, framework="jax")), MetadataError, "must be one of"),
        (
            lambda a, m: (a, {**m, "at.tensor": m["at.tensor"].encode()}),
            MetadataError,
            "'at.tensor' must be str",
        ),
        (lambda a, m: (a, {**m, "at.cuda.offset": -1}), MetadataError, "must be in"),
        (lambda a, m: (a, {**m, "at.cuda.offset": 2}), MetadataError, "not aligned"),
        (lambda a, m: (a, {**m, "at.cuda.device_uuid": "GPU-../../x"}), MetadataError, "look like"),
        (
            lambda a, m: (a, {**m, "at.cuda.device_uuid": "GPU-0000-not-here"}),
            CudaUnavailableError,
            "not visible",
        ),
        (lambda a, m: (a, {**m, "at.cuda.pci_bus_id": "bus 1"}), MetadataError, "look like"),
        (lambda a, m: (a, {**m, "at.cuda.block": "/etc/passwd"}), MetadataError, "control block"),
        (
            lambda a, m: (a, {**m, "at.cuda.block": "at-" + "0" * 32 + "-1-" + "f" * 32}),
            (ShmHandleError, StaleHandleError),
            "another dataflow|no longer exists",
        ),
        (lambda a, m: (a, {**m, "at.cuda.backend": "rocm"}), MetadataError, "must be one of"),
        (lambda a, m: (a, {**m, "at.cuda.event": "yes"}), MetadataError, "bool"),
        (lambda a, m: (a, {**m, "at.cuda.gen": 0}), MetadataError, "positive"),
        (lambda a, m: (a, {**m, "at.cuda.slot": 10_000}), MetadataError, "outside"),
        (
            lambda a, m: (a, {k: v for k, v in m.items() if k != "at.cuda.offset"}),
            MetadataError,
            "lacks",
        ),
    ],
)
def test_hostile_descriptors_are_refused_with_a_specific_error(
    sb: Any, change: Any, error: type[Exception], match: str
) -> None:
    array, meta = change(*_valid(sb))
    with pytest.raises(error, match=match):
        at.decode(array, meta)


def test_a_handle_whose_block_is_smaller_than_claimed_is_refused(sb: Any) -> None:
    """The sender's alloc_size is not trusted: the opened block's real size is checked."""
    array, meta = _valid(sb)
    lie = {**meta, "at.cuda.alloc_size": 1 << 40, "at.cuda.offset": sb.allocator.block_size}
    with pytest.raises(PayloadError, match=r"outside the .* allocation the handle opened"):
        at.decode(array, lie)
    assert len(_handles.opened) == 0  # nothing left open by the refusal


def test_a_handle_naming_a_foreign_file_is_refused(sb: Any) -> None:
    array, meta = _valid(sb)
    raw = bytearray(array.buffers()[1].to_pybytes())
    raw[:64] = b"../../etc/passwd".ljust(64, b"\0")
    with pytest.raises(CudaUnavailableError, match="names no stand-in block"):
        at.decode(pa.array(np.frombuffer(bytes(raw), np.uint8)), meta)


@given(
    shape=st.lists(st.integers(0, 1 << 20), min_size=0, max_size=4),
    offset=st.integers(0, 1 << 22),
    alloc=st.integers(0, 1 << 22),
)
def test_descriptor_bounds_property(shape: list[int], offset: int, alloc: int) -> None:
    """Whatever the numbers, a parsed descriptor's bytes lie inside its allocation."""
    meta = {
        "at.version": _schema.VERSION,
        "at.kind": "cuda",
        "at.tensor": _schema.pack("numpy", "float32", shape, range(len(shape))),
        "at.cuda.backend": "standin",
        "at.cuda.offset": offset,
        "at.cuda.alloc_size": alloc,
        "at.cuda.device_uuid": _cuda_backend.STANDIN_UUID,
        "at.cuda.pci_bus_id": "",
        "at.cuda.event": False,
        "at.cuda.block": "at-" + "0" * 32 + "-1-" + "0" * 32,
        "at.cuda.slot": 0,
        "at.cuda.gen": 1,
        "at.cuda.seq": 1,
    }
    nbytes = 4 * int(np.prod(shape, dtype=object)) if shape else 4
    array = pa.array(np.zeros(0 if nbytes == 0 else 128, np.uint8))
    try:
        desc = _descriptor.parse_descriptor(array, meta)
    except MetadataError:
        assert offset + nbytes > alloc or offset % 4
        return
    assert desc.offset + desc.header.nbytes <= desc.alloc_size


# --- without CUDA ----------------------------------------------------------------------------


def test_a_real_cuda_descriptor_on_a_machine_without_cuda_says_so(sb: Any) -> None:
    pytest.importorskip("torch")
    array, meta = _valid(sb)
    real = {
        **_with_header(meta, framework="torch"),
        "at.cuda.backend": "cuda",
        "at.cuda.device_uuid": "GPU-6a0b4b1e-3c5d-4f00-9e8f-1234567890ab",
    }
    with pytest.raises(CudaUnavailableError, match="not visible to this process"):
        at.decode(array, real)


def test_pyarrow_cuda_is_guarded() -> None:
    try:
        import pyarrow.cuda  # noqa: F401

        has_cuda = True
    except ImportError:
        has_cuda = False
    assert (_pyarrow.pyarrow_cuda() is not None) == has_cuda
    if not has_cuda:
        with pytest.raises(CudaUnavailableError, match="built without CUDA"):
            _pyarrow.PyarrowCudaBackend()
        pytest.importorskip("torch")
        chosen = _select.backend_for_receiver("cuda", "pyarrow.cuda")
        assert isinstance(chosen, TorchCudaBackend)


def test_device_arrays_are_recognised_without_importing_frameworks() -> None:
    code = (
        "import sys, numpy as np, arrow_tensor as at\n"
        "from arrow_tensor.memory.cuda import _select, _standin\n"
        "assert not _select.is_device_array(np.zeros(1))\n"
        "assert _select.is_device_array(_standin.standin().allocator.asarray(np.zeros(1)))\n"
        "_standin.standin().allocator.close()\n"
        "assert 'torch' not in sys.modules and 'cupy' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the transport decision (send / Receiver) ---------------------------------------------------


class RecordingMock(MockNode):
    """MockNode that keeps the metadata of what was sent."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__([], **kwargs)
        self.sent: list[tuple[str, pa.Array, dict[str, Any]]] = []

    def send_output(self, output_id: str, data: Any, metadata: Any = None) -> None:
        self.sent.append((output_id, data, dict(metadata or {})))


def test_send_shares_cuda_memory_and_the_receiver_rebuilds_it(sb: Any) -> None:
    node = RecordingMock()
    x = host(sb, np.arange(20, dtype=np.float32).reshape(4, 5))
    assert at.send(node, "out", x.T, {"frame": 7}) == "cuda"
    (_, array, meta), *_ = node.sent
    assert meta["at.kind"] == "cuda"
    assert meta["frame"] == 7
    out = at.Receiver().receive(array, meta)
    np.testing.assert_array_equal(out, x.view.T)


def test_behind_a_relay_a_cuda_descriptor_is_refused_clearly(sb: Any) -> None:
    """CUDA descriptors are not relay-safe (README): the far end says why, never guesses."""
    relayed = {
        "nodes": [
            {"id": "cam", "inputs": {}},
            {"id": "echo", "inputs": {"x": "cam/out"}},
            {"id": "far", "inputs": {"x": "echo/out"}},
        ]
    }
    as_node("cam")
    node = RecordingMock(dataflow_descriptor=relayed, dataflow_id=DATAFLOW)
    x = host(sb, np.arange(6, dtype=np.float32))
    assert at.send(node, "out", x) == "cuda"
    _, array, meta = node.sent[-1]
    as_node("far")  # dora-echo forwarded the message unchanged
    with pytest.raises(ShmHandleError, match="'far' is not a receiver"):
        at.Receiver().receive(array, meta)


@pytest.mark.parametrize(
    ("descriptor", "environ", "reason"),
    [
        ({}, {"ARROW_TENSOR_TRANSPORT": "host"}, "ARROW_TENSOR_TRANSPORT=host"),
        (yaml.safe_load(DATAFLOW_YAML), {}, "another machine"),
    ],
)
def test_send_takes_the_host_path_when_told_or_when_receivers_are_remote(
    sb: Any,
    monkeypatch: pytest.MonkeyPatch,
    descriptor: dict[str, Any],
    environ: dict[str, str],
    reason: str,
) -> None:
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    as_node("camera")
    node = RecordingMock(dataflow_descriptor=descriptor)
    x = host(sb, np.arange(12, dtype=np.int16).reshape(3, 4))
    for _ in range(2):
        assert at.send(node, "remote_frames", x) == "inline"
    assert _cuda_ipc.in_flight() == 0  # nothing of the device is referenced by the host path
    (_, array, meta), *_ = node.sent
    assert meta["at.kind"] == "tensor"
    np.testing.assert_array_equal(at.decode(array, meta), x.view)
    warnings = [e["message"] for e in node.logs if reason in e["message"]]
    assert len(warnings) == 1  # said once per output


def test_exhausted_in_flight_slots_send_by_the_host_path(
    sb: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARROW_TENSOR_CUDA_SLOTS", "1")
    node = RecordingMock()
    x = host(sb, np.arange(8, dtype=np.uint8))
    assert at.send(node, "out", x) == "cuda"
    held = at.decode(node.sent[0][1], node.sent[0][2])
    assert at.send(node, "out", x) == "inline"
    assert any("in-flight CUDA slots" in e["message"] for e in node.logs)
    np.testing.assert_array_equal(at.decode(node.sent[1][1], node.sent[1][2]), held)


def test_a_device_without_legacy_ipc_sends_by_the_host_path(sb: Any) -> None:
    sb.ipc_problem = "PyTorch expandable segments are enabled (no legacy CUDA IPC handles)"
    node = RecordingMock()
    x = host(sb, np.arange(6, dtype=np.float64))
    assert at.send(node, "out", x) == "inline"
    assert any("expandable segments" in e["message"] for e in node.logs)
    np.testing.assert_array_equal(at.decode(node.sent[0][1], node.sent[0][2]), x.view)


# --- through real dora dataflows, on the stand-in ---------------------------------------------

CUDA_NODE = Path(__file__).parents[2] / "gpu" / "cuda_node.py"
VENV_BIN = Path(sys.executable).parent
DORA = shutil.which("dora", path=str(VENV_BIN)) or shutil.which("dora")


def run_dataflow(tmp_path: Path, producer_env: dict[str, Any], receivers: dict[str, Any]) -> dict:
    """Run producer -> receivers with ``cuda_node.py``; return every node's JSON report."""
    if DORA is None:
        pytest.skip("the dora CLI is not installed")
    nodes = [
        {
            "id": "producer",
            "path": str(CUDA_NODE),
            "outputs": ["out"],
            "env": {"ROLE": "producer", "REPORT": str(tmp_path / "producer.json"), **producer_env},
        }
    ]
    for rid, env in receivers.items():
        nodes.append(
            {
                "id": rid,
                "path": str(CUDA_NODE),
                "inputs": {"x": {"source": "producer/out", "queue_size": 1000}},
                "env": {"ROLE": "receiver", "REPORT": str(tmp_path / f"{rid}.json"), **env},
            }
        )
    spec = tmp_path / "dataflow.yml"
    spec.write_text(yaml.safe_dump({"nodes": nodes}))
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [DORA, "run", str(spec)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=240,
        check=False,
    )
    _cuda_backend.sweep_standin()  # blocks of a producer dora (or the test) killed
    reports = {}
    for name in ["producer", *receivers]:
        path = tmp_path / f"{name}.json"
        if path.exists():
            reports[name] = json.loads(path.read_text())
    return reports


@pytest.mark.integration
def test_stack_repro_fans_out_to_two_receivers_through_dora(tmp_path: Path) -> None:
    common = {"BACKEND": "standin", "MODE": "stack"}
    reports = run_dataflow(
        tmp_path,
        {**common, "COUNT": 100},
        {"left": {**common, "HOLD": 5}, "right": common},
    )
    assert reports["producer"]["paths"] == {"cuda": 100}
    for name in ("left", "right"):
        report = reports[name]
        assert report["received"] >= 50  # dora may drop some at start-up; never corrupt them
        assert report["corrupt"] == 0
        assert report["errors"] == {}
        assert set(report["kinds"]) == {"cuda"}
        assert report["open_handles"] == 0  # closed after the last tensor was freed


@pytest.mark.integration
def test_a_killed_producer_leaves_receivers_running_with_clear_errors(tmp_path: Path) -> None:
    common = {"BACKEND": "standin", "MODE": "stack"}
    reports = run_dataflow(
        tmp_path, {**common, "COUNT": 200, "KILL_AT": 60}, {"left": {**common, "HOLD": 3}}
    )
    assert "producer" not in reports  # it was killed before writing one
    report = reports["left"]  # the receiver finished its loop and wrote its report
    assert report["corrupt"] == 0
    assert set(report["errors"]) <= {"StaleHandleError"}
    assert report["received"] + sum(report["errors"].values()) <= 60


def test_decode_device_on_host_messages() -> None:
    torch = pytest.importorskip("torch")
    x = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    array, meta = at.encode(x)
    assert torch.equal(at.decode(array, meta, device="cpu"), x)
    with pytest.raises(CudaUnavailableError, match="no CUDA device"):
        at.decode(array, meta, device="cuda:0")
    with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
        at.decode(array, meta, device="gpu0")


RECEIVER = textwrap.dedent(
    """
    import json, sys, time
    import pyarrow as pa
    import arrow_tensor as at
    raw, meta = json.loads(sys.stdin.readline())
    held = at.decode(pa.array(raw, pa.uint8()), meta)
    print(int(held.sum()), flush=True)
    time.sleep(60)
    """
)


def test_a_killed_receiver_gives_its_slots_back(sb: Any) -> None:
    """A consumer that dies holding a tensor must not pin the producer's memory forever."""
    as_node("producer")
    array, meta = _cuda_ipc.encode_cuda(host(sb, np.arange(10, dtype=np.int64)), receivers=("rx",))
    env = {**os.environ, "DORA_NODE_CONFIG": f"dataflow_id: {DATAFLOW}\nnode_id: rx\n"}
    proc = subprocess.Popen(
        [sys.executable, "-c", RECEIVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        proc.stdin.write(json.dumps([list(array.buffers()[1].to_pybytes()), meta]) + "\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "45"  # it read the producer's memory
        assert _cuda_ipc.in_flight() == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert _cuda_ipc.in_flight() == 0  # a dead receiver holds nothing
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdin.close()
        proc.stdout.close()


def test_a_process_cannot_open_its_own_cuda_handles(
    sb: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA refuses it; the error says so instead of a raw CUDA error code."""
    pytest.importorskip("torch")
    array, meta = _valid(sb)
    real = {**_with_header(meta, framework="torch"), "at.cuda.backend": "cuda"}
    # Play a machine where the producer's device is visible (there is no GPU here).
    monkeypatch.setattr(TorchCudaBackend, "local_device", lambda *_: 0)
    with pytest.raises(CudaUnavailableError, match="open its own IPC handles"):
        at.decode(array, real)
