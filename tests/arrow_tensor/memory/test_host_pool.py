"""Shared-memory pools in one process: loans, handles, lifetimes, hostile handles, cleanup."""

from __future__ import annotations

import gc
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
from arrow_tensor import pool
from arrow_tensor.codec import _schema
from arrow_tensor.memory import Identity, _blocks, _host_mapped, _host_pool
from arrow_tensor.memory._host_pool import OutputPool
from arrow_tensor.transport import _facts
from dora.testing import MockNode

torch = pytest.importorskip("torch")
if not _blocks.available():
    pytest.skip("POSIX shared memory (/dev/shm) is not available", allow_module_level=True)

DATAFLOW = str(uuid.UUID(int=0x0123456789ABCDEF0123456789ABCDEF))
HEX = uuid.UUID(DATAFLOW).hex
DESCRIPTOR = {
    "nodes": [
        {"id": "prod", "inputs": {}},
        {"id": "rx", "inputs": {"x": "prod/out"}},
        {"id": "rx2", "inputs": {"y": {"source": "prod/out", "queue_size": 4}}},
        {"id": "other", "inputs": {}},
    ]
}


class RecordingNode(MockNode):
    """A MockNode that keeps (output, array, metadata) of every send."""

    def __init__(self, descriptor: dict[str, Any] = DESCRIPTOR) -> None:
        super().__init__([], dataflow_descriptor=descriptor, dataflow_id=DATAFLOW)
        self.sent: list[tuple[str, Any, dict[str, Any]]] = []

    def send_output(self, output_id: str, data: Any, metadata: Any = None) -> None:
        self.sent.append((output_id, data, dict(metadata or {})))


def pool_files() -> list[str]:
    return sorted(n for n in os.listdir(_blocks.SHM_DIR) if n.startswith(f"at-{HEX}-"))


@pytest.fixture(autouse=True)
def producer_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_host_pool, "LINGER_S", 0.0)  # nobody else will map these pools
    # These receivers decode handles they were never probed for: trust the descriptor
    # (test_relay_safe.py covers how receivers prove themselves).
    monkeypatch.setenv("ARROW_TENSOR_SHM_TRUST", "descriptor")
    _blocks.set_identity(Identity(DATAFLOW, "prod"))
    yield
    pool.close()
    _host_mapped.forget_pools()
    _blocks.set_identity(None)
    _facts._STATES.clear()
    assert pool_files() == [], "a test left pool files in /dev/shm"


def receive(message: tuple[str, Any, dict[str, Any]], as_node: str = "rx", **kw: Any) -> Any:
    """Decode ``message`` as node ``as_node`` would (then become the producer again)."""
    _blocks.set_identity(Identity(DATAFLOW, as_node))
    try:
        return at.decode(message[1], message[2], **kw)
    finally:
        _blocks.set_identity(Identity(DATAFLOW, "prod"))


def output_pool(node: Any, output_id: str = "out", **options: Any) -> OutputPool:
    """``output_id``'s pool with test settings (``receivers`` also overrides the dataflow's)."""
    state = _facts.state_of(node, output_id)
    receivers = options.pop("receivers", None)
    if receivers is not None:
        peers = tuple(_facts.Peer(r, None) for r in receivers)
        state.facts = replace(state.facts, receivers=peers, shm_reason=None)
    assert state.pool is None, "make the pool before the output's first loan or send"
    state.pool = OutputPool(_blocks.identity(), output_id, state.facts.receiver_ids, **options)
    return state.pool


CASES = [
    ("numpy", np.float32, (3, 4, 5)),
    ("numpy", np.uint8, (1000,)),
    ("numpy", np.complex64, (2, 3)),
    ("numpy", np.bool_, (7,)),
    ("numpy", np.int16, ()),
    ("torch", torch.float32, (3, 4, 5)),
    ("torch", torch.bfloat16, (8, 3)),
    ("torch", torch.int64, (5,)),
    ("torch", torch.float16, ()),
]


@pytest.mark.parametrize(("framework", "dtype", "shape"), CASES)
def test_loaned_tensor_arrives_exactly_as_a_handle(framework: str, dtype: Any, shape: Any) -> None:
    node = RecordingNode()
    t = pool.loan(node, "out", shape, dtype)
    if framework == "torch":
        assert isinstance(t, torch.Tensor)
        t.copy_(torch.arange(t.numel()).reshape(shape).to(dtype))
        expected = t.clone()
    else:
        assert isinstance(t, np.ndarray)
        t[...] = np.arange(t.size).reshape(shape).astype(dtype)
        expected = t.copy()
    assert pool.send(node, "out", t, {"frame": 3}) == "shm"
    _, array, meta = node.sent[-1]
    assert len(array) == 0
    assert meta["at.kind"] == "shm"
    assert meta["frame"] == 3
    got = receive(node.sent[-1])
    assert type(got) is type(expected)
    if framework == "torch":
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected)
    else:
        assert got.dtype == expected.dtype
        assert np.array_equal(got, expected)
        assert not got.flags.writeable


def test_ordinary_tensors_are_copied_once_into_a_slot_with_their_layout() -> None:
    node = RecordingNode()
    non_dense = np.arange(40_000, dtype=np.float64).reshape(200, 200)[:, ::2]
    channels_last = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    channels_last = channels_last.to(memory_format=torch.channels_last)
    assert pool.send(node, "out", non_dense) == "shm"
    assert pool.send(node, "out", channels_last) == "shm"
    a, b = receive(node.sent[0]), receive(node.sent[1])
    assert np.array_equal(a, non_dense)
    assert torch.equal(b, channels_last)
    assert b.stride() == channels_last.stride()


def test_receivers_get_views_of_the_same_mapped_memory() -> None:
    node = RecordingNode()
    t = pool.loan(node, "out", (256,), torch.int32)
    t.fill_(7)
    pool.send(node, "out", t)
    first, second = receive(node.sent[0]), receive(node.sent[0])
    assert first.data_ptr() == second.data_ptr()
    assert len(_host_mapped._mapped) == 1  # the pool is mapped once
    assert int(first.sum()) == 7 * 256


def test_slot_is_not_reused_while_a_receiver_holds_a_view() -> None:
    node = RecordingNode()
    out = output_pool(node, "out", slots=2, wait_s=0.0, receivers=["rx"])
    for value in (1, 2):
        t = out.loan((1024,), np.int64)
        t[:] = value
        pool.send(node, "out", t)
        del t
    held = [receive(m) for m in node.sent]
    spare = out.loan((1024,), np.int64)
    assert not out.owns(spare.ctypes.data)  # pool full: an ordinary array instead
    spare[:] = 3
    assert pool.send(node, "out", spare) == "message"
    assert [int(h[0]) for h in held] == [1, 2]  # nothing overwritten
    assert int(receive(node.sent[-1])[0]) == 3
    del held
    gc.collect()
    again = out.loan((1024,), np.int64)
    assert out.owns(again.ctypes.data)


def test_unsent_loans_are_returned_when_garbage_collected() -> None:
    node = RecordingNode()
    out = output_pool(node, "out", slots=2, wait_s=0.0, receivers=["rx"])
    t = out.loan((16,), np.float32)
    view = t[2:5]
    del t
    gc.collect()
    assert out.busy() == 1  # a view keeps the loan alive
    del view
    gc.collect()
    assert out.busy() == 0


def test_dropped_messages_give_their_slot_back_after_the_lease() -> None:
    node = RecordingNode()
    out = output_pool(node, "out", slots=1, wait_s=0.5, lease_s=0.05, receivers=["rx"])
    pool.send(node, "out", np.ones(100))  # never received: as if dora dropped it
    assert out.busy() == 1
    assert pool.send(node, "out", np.full(100, 2.0)) == "shm"  # waited for the lease, then reused
    with pytest.raises(at.StaleHandleError, match="no longer holds generation"):
        receive(node.sent[0])
    assert receive(node.sent[1])[0] == 2.0


def test_writable_decode_is_a_private_copy_that_frees_the_slot() -> None:
    node = RecordingNode()
    out = output_pool(node, "out", slots=1, wait_s=0.0, receivers=["rx"])
    pool.send(node, "out", np.arange(10.0))
    copy = receive(node.sent[0], writable=True)
    copy[0] = 42.0
    assert out.busy() == 0
    assert receive(node.sent[0])[0] == 0.0


def test_checksum_detects_a_producer_writing_after_send() -> None:
    node = RecordingNode()
    t = pool.loan(node, "out", (64,), np.uint8)
    t[:] = 1
    pool.send(node, "out", t, checksum=True)
    assert receive(node.sent[0], verify=True)[0] == 1
    t[0] = 9  # breaks the contract: receivers may be reading
    with pytest.raises(at.ChecksumError):
        receive(node.sent[0], verify=True)


def test_pool_grows_and_retires_the_smaller_file() -> None:
    node = RecordingNode()
    out = output_pool(node, "out", receivers=["rx"])
    pool.send(node, "out", np.zeros(10, np.uint8))
    small = out.segment_names()
    assert len(small) == 1
    pool.send(node, "out", np.zeros(1 << 20, np.uint8))
    assert len(out.segment_names()) == 2
    node.sent.clear()  # the small pool's message was never received: it waits for its lease
    out._retired[0].slots.lease_s = 0.0
    pool.send(node, "out", np.zeros(1 << 20, np.uint8))  # invalidates the expired slot...
    time.sleep(0.01)
    pool.send(node, "out", np.zeros(1 << 20, np.uint8))  # ...and, after the fence, retires the pool
    assert small[0] not in out.segment_names()
    assert small[0] not in pool_files()


def test_pool_files_are_private_and_unguessable() -> None:
    node = RecordingNode()
    pool.send(node, "out", np.zeros(8))
    output_pool(node, "out2", receivers=["rx"])
    pool.send(node, "out2", np.zeros(8))
    names = pool_files()
    assert len(names) == 2
    tokens = set()
    for name in names:
        info = os.stat(os.path.join(_blocks.SHM_DIR, name))
        assert stat.S_IMODE(info.st_mode) == 0o600
        prefix, dataflow, pid, token = name.split("-")
        assert (prefix, dataflow, pid) == ("at", HEX, str(os.getpid()))
        assert len(token) == 32
        tokens.add(token)
    assert len(tokens) == 2


def test_name_is_unlinked_once_every_receiver_has_mapped_it() -> None:
    node = RecordingNode()
    pool.send(node, "out", np.arange(5))
    name = node.sent[0][2]["at.shm.pool"]
    a = receive(node.sent[0], as_node="rx")
    _host_mapped.forget_pools()
    b = receive(node.sent[0], as_node="rx2")
    assert name in pool_files()
    pool.send(node, "out", np.arange(5))  # the producer notices both mapped
    assert name not in pool_files()
    assert a[4] == 4
    assert b[4] == 4


def test_handle_to_a_closed_pool_is_a_clear_error() -> None:
    node = RecordingNode()
    pool.send(node, "out", np.arange(5))
    pool.close()
    with pytest.raises(at.StaleHandleError, match=r"no longer exists .* is alive"):
        receive(node.sent[0])


def test_start_up_sweep_removes_orphans_of_dead_producers_only() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = f"at-{HEX}-{int(done.stdout)}-{'ab' * 16}"
    live = f"at-{HEX}-{os.getppid()}-{'cd' * 16}"
    foreign = f"at-{'0' * 32}-{int(done.stdout)}-{'ef' * 16}"
    for name in (orphan, live, foreign):
        fd = os.open(os.path.join(_blocks.SHM_DIR, name), os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    try:
        removed = _blocks.sweep_orphans(Identity(DATAFLOW, "prod"))
        assert removed == [orphan]
        assert pool_files() == [live]
    finally:
        for name in (orphan, live, foreign):
            _blocks.unlink(name)


def test_remote_receiver_sends_the_whole_output_by_the_message_path() -> None:
    descriptor = {
        "nodes": [
            {"id": "prod", "inputs": {}, "deploy": {"machine": "a"}},
            {"id": "rx", "inputs": {"x": "prod/out"}, "deploy": {"machine": "b"}},
        ]
    }
    node = RecordingNode(descriptor)
    assert "another machine" in _facts.state_of(node, "out").facts.shm_reason
    t = pool.loan(node, "out", (4,), np.float32)
    t[:] = 1.5
    assert pool.send(node, "out", t) == "message"
    assert node.sent[0][2]["at.kind"] == "tensor"
    assert pool_files() == []
    assert np.array_equal(at.decode(node.sent[0][1], node.sent[0][2]), t)


def test_the_pool_needs_receivers_on_this_machine() -> None:
    node = RecordingNode()
    facts = _facts.state_of(node, "out").facts
    assert facts.shm_reason is None
    assert facts.receiver_ids == ("rx", "rx2")
    assert "no receivers" in _facts.state_of(node, "nobody").facts.shm_reason


def test_auto_sends_take_the_pool_for_loans_and_large_tensors_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ARROW_TENSOR_SHM_MIN_BYTES", "1MiB")
    node = RecordingNode()
    assert at.send(node, "out", np.zeros(10)) == "inline"
    assert at.send(node, "out", {"a": 1}) == "inline"
    assert at.send(node, "out", np.zeros(1 << 17)) == "shm"  # 1 MiB
    loaned = pool.loan(node, "out", (3,), np.float32)
    assert at.send(node, "out", loaned) == "shm"
    assert [m[2]["at.kind"] for m in node.sent] == ["tensor", "tree", "shm", "shm"]


def _valid_message() -> tuple[RecordingNode, tuple[str, Any, dict[str, Any]]]:
    node = RecordingNode()
    pool.send(node, "out", np.arange(1024, dtype=np.float32))
    return node, node.sent[0]


HOSTILE = [
    ("at.shm.pool", "../../etc/passwd", at.ShmHandleError, "must name an arrow_tensor block"),
    ("at.shm.pool", f"at-{'1' * 32}-1-{'2' * 32}", at.ShmHandleError, "belongs to dataflow"),
    ("at.shm.slot", 10_000, at.ShmHandleError, "outside pool"),
    ("at.shm.slot", -1, at.ShmHandleError, "must be in 0"),
    ("at.shm.slot", True, at.MetadataError, "must be int"),
    ("at.shm.offset", 1 << 40, at.ShmHandleError, "inside a slot"),
    ("at.shm.offset", 2, at.ShmHandleError, "aligned range"),
    ("at.shm.gen", 123456, at.StaleHandleError, "no longer holds generation"),
    ("at.shm.gen", 0, at.ShmHandleError, "generation must be positive"),
    (
        "at.tensor",
        _schema.pack("numpy", "float32", [1 << 40], [0]),
        at.ShmHandleError,
        "inside a slot",
    ),
    (
        "at.tensor",
        _schema.pack("numpy", "float32", [1 << 30] * 3, [0, 1, 2]),
        at.MetadataError,
        r"spans more than 2\*\*62 bytes",
    ),
    (
        "at.tensor",
        _schema.pack("numpy", "float32", [-1024], [0]),
        at.MetadataError,
        "no signs",
    ),
    ("at.tensor", _schema.pack("numpy", "float32", [1024], [1]), at.MetadataError, "permutation"),
    ("at.tensor", b"numpy;float32;1024;0", at.MetadataError, "'at.tensor' must be str"),
    # a CUDA descriptor's framework over host memory (it used to come back as numpy)
    ("at.tensor", "cupy;float32;1024;0", at.MetadataError, "host memory decodes to one of"),
    ("at.shm.seq", "1", at.MetadataError, "must be int"),
]


@pytest.mark.parametrize(("key", "value", "error", "match"), HOSTILE)
def test_hostile_handles_never_read_outside_the_pool(
    key: str, value: Any, error: type[Exception], match: str
) -> None:
    _, (output, array, meta) = _valid_message()
    assert meta[_schema.KEY_TENSOR] == "numpy;float32;1024;0"
    meta[key] = value
    with pytest.raises(error, match=match):
        receive((output, array, meta))


def test_handle_from_a_node_that_is_not_a_receiver_is_refused() -> None:
    _, message = _valid_message()
    with pytest.raises(at.ShmHandleError, match="'other' is not a receiver"):
        receive(message, as_node="other")


@pytest.mark.parametrize("problem", ["mode", "garbage", "symlink", "short"])
def test_forged_pool_files_are_refused(problem: str) -> None:
    _, (output, array, meta) = _valid_message()
    forged = f"at-{HEX}-{os.getpid()}-{'9' * 32}"
    path = os.path.join(_blocks.SHM_DIR, forged)
    if problem == "symlink":
        os.symlink(os.path.join(_blocks.SHM_DIR, meta["at.shm.pool"]), path)
    else:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        os.write(fd, b"\x01" * (4096 if problem != "short" else 100) * 4)
        os.close(fd)
        if problem == "mode":
            os.chmod(path, 0o644)
    meta["at.shm.pool"] = forged
    try:
        with pytest.raises(at.ShmHandleError):
            receive((output, array, meta))
    finally:
        _blocks.unlink(forged)


def test_outside_dora_decoding_a_handle_says_why_it_cannot() -> None:
    _, message = _valid_message()
    _blocks.set_identity(None)
    env = os.environ.pop("DORA_NODE_CONFIG", None)
    try:
        with pytest.raises(at.ShmHandleError, match="inside a dora node"):
            at.decode(message[1], message[2])
    finally:
        if env is not None:
            os.environ["DORA_NODE_CONFIG"] = env
        _blocks.set_identity(Identity(DATAFLOW, "prod"))


def test_loan_rejects_bad_requests() -> None:
    node = RecordingNode()
    with pytest.raises(at.UnsupportedTensorError, match="negative"):
        pool.loan(node, "out", (-1, 3), np.float32)
    with pytest.raises(at.UnsupportedTensorError, match="no numpy form"):
        pool.loan(node, "out", (3,), "bfloat16", framework="numpy")
    with pytest.raises(at.UnsupportedTensorError, match="dtype must be a numpy dtype"):
        pool.loan(node, "out", (3,), "float33")
    for device_framework in ("cupy", "pyarrow.cuda"):  # host slots decode to numpy or torch
        with pytest.raises(at.UnsupportedTensorError, match="must be 'numpy' or 'torch'"):
            pool.loan(node, "out", (3,), np.float32, framework=device_framework)
    with pytest.raises(at.TransportError, match="a structure travels inline or chunked"):
        pool.send(node, "out", [1, 2.5])
    with pytest.raises(at.TransportError, match="a plain value travels inline"):
        pool.send(node, "out", [1, 2, 3])
    with pytest.raises(at.UnsupportedTensorError, match="numpy scalar"):
        pool.send(node, "out", np.float32(3))
    with pytest.raises(at.MetadataError, match="reserved"):
        pool.send(node, "out", np.zeros(3), {"at.kind": "x"})
    assert pa.array([], pa.uint8()).equals(pa.array([], pa.uint8()))


@pytest.fixture
def pool_from_1mib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ordinary tensors from 1 MiB go through the pool (the default threshold is 256 MiB)."""
    monkeypatch.setenv("ARROW_TENSOR_SHM_MIN_BYTES", "1MiB")


@pytest.mark.usefixtures("pool_from_1mib")
def test_transport_send_routes_same_machine_tensors_through_the_pool() -> None:
    node = RecordingNode()
    big = np.arange(1 << 18, dtype=np.float64)  # 2 MiB
    loaned = pool.loan(node, "out", (4,), np.int32)
    loaned[:] = 5
    assert at.send(node, "out", big, {"k": 1}) == "shm"
    assert at.send(node, "out", loaned) == "shm"
    assert at.send(node, "out", np.zeros(4)) == "inline"  # small: not worth a slot
    assert at.send(node, "out", big, transport="inline") == "inline"
    assert np.array_equal(receive(node.sent[0]), big)
    assert node.sent[0][2]["k"] == 1
    assert receive(node.sent[1]).tolist() == [5, 5, 5, 5]


@pytest.mark.usefixtures("pool_from_1mib")
def test_transport_send_never_waits_for_a_full_pool_with_ordinary_tensors() -> None:
    node = RecordingNode()
    out = output_pool(node, "out", slots=1, wait_s=60.0)
    big = np.ones(1 << 18)
    assert at.send(node, "out", big) == "shm"
    held = receive(node.sent[0])
    assert at.send(node, "out", big) == "inline"  # no 60 s wait: straight by message
    assert out.sent == 1
    assert np.array_equal(at.decode(node.sent[1][1], node.sent[1][2]), held)


def test_receivers_forget_retired_pools_they_no_longer_use() -> None:
    node = RecordingNode()
    out = output_pool(node, "out", receivers=["rx"])
    pool.send(node, "out", np.zeros(10, np.uint8))
    first = node.sent[0][2]["at.shm.pool"]
    small = receive(node.sent[0])
    pool.send(node, "out", np.zeros(1 << 20, np.uint8))  # grows: the small pool retires
    del small
    pool.send(node, "out", np.zeros(1 << 20, np.uint8))  # the retired pool is free now: closed
    assert first not in out.segment_names()
    receive(node.sent[-1])
    assert first not in _host_mapped._mapped


def test_a_torch_op_can_write_its_result_straight_into_a_loan() -> None:
    node = RecordingNode()
    a, b = torch.arange(12.0).reshape(3, 4), torch.full((3, 4), 0.5)
    out = pool.loan(node, "out", (3, 4), torch.float32)
    torch.add(a, b, out=out)
    pool.send(node, "out", out)
    assert torch.equal(receive(node.sent[0]), a + b)


def test_identity_comes_from_the_node_config_dora_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    config = f"dataflow_id: {DATAFLOW}\nnode_id: 'cam-left'\nrun_config:\n  inputs: {{}}\n"
    monkeypatch.setenv("DORA_NODE_CONFIG", config)
    _blocks.set_identity(None)
    assert _blocks.identity() == Identity(DATAFLOW, "cam-left")
    assert _blocks.identity().dataflow_hex == HEX


def test_a_receiver_writing_to_its_view_faults_instead_of_corrupting_others() -> None:
    node = RecordingNode()
    t = pool.loan(node, "out", (1024,), torch.float32)
    t.fill_(1.0)
    pool.send(node, "out", t)
    writer = f"""
import torch
import arrow_tensor as at
from arrow_tensor.memory import Identity, set_identity
set_identity(Identity({DATAFLOW!r}, "rx"))
view = at.decode(None, {node.sent[0][2]!r})
view[0] = 5.0  # breaks the read-only contract
"""
    done = subprocess.run([sys.executable, "-c", writer], capture_output=True, check=False)
    assert done.returncode == -signal.SIGSEGV
    assert float(receive(node.sent[0])[0]) == 1.0


def test_ordinary_tensors_below_dora_cap_stay_dora_messages_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ARROW_TENSOR_SHM_MIN_BYTES", raising=False)
    node = RecordingNode()
    facts = _facts.state_of(node, "out").facts
    assert facts.shm_min_bytes == 256 << 20
    assert at.send(node, "out", np.ones(8 << 20)) == "inline"  # 64 MiB
    assert at.send(node, "out", np.ones(256 << 20, dtype=np.uint8)) == "shm"
