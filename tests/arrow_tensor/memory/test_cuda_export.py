"""Exporting CUDA memory and giving it back on every path, and the driver calls, on CPU.

The host stand-in exports as the real backends do (the allocation's base and size, its IPC
handle, the first byte's offset in it) and counts the exports whose memory it still keeps
for receivers, so every path that exported is checked to give the memory back: released
by receivers, refused by a full slot table, a send that failed, a description that failed.
The driver API is exercised against a stand-in library with the driver's signatures; the
real one only runs in tests/gpu.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
from arrow_tensor.codec import _schema
from arrow_tensor.memory._slots import pid_alive, pid_running
from arrow_tensor.memory.cuda import _ipc as _cuda_ipc
from arrow_tensor.memory.cuda import _receive, _runtime
from dora.testing import MockNode

DATAFLOW = str(uuid.UUID(int=0x5EED5))
HANDLE = bytes(range(64))


class Recorder(MockNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__([], **kwargs)
        self.sent: list[tuple[str, pa.Array, dict[str, Any]]] = []

    def send_output(self, output_id: str, data: Any, metadata: Any = None) -> None:
        self.sent.append((output_id, data, dict(metadata or {})))


# --- every export comes back -----------------------------------------------------------------


def test_every_export_comes_back_once_receivers_released(sb: Any) -> None:
    node = Recorder()
    x = sb.allocator.asarray(np.arange(60, dtype=np.float32).reshape(3, 20))
    for view in (x, x[1:], x.T):
        assert at.send(node, "out", view) == "cuda"
    assert sb.exports == 3  # one each, kept while receivers may read
    received = [at.Receiver().receive(a, m) for _, a, m in node.sent]
    for got, view in zip(received, (x, x[1:], x.T), strict=True):
        np.testing.assert_array_equal(got, view.view)
    del received, got
    deadline = time.monotonic() + 5
    while _cuda_ipc.in_flight() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _cuda_ipc.in_flight() == 0
    assert sb.exports == 0, "memory kept for a receiver that released it long ago"


def test_memory_the_driver_cannot_share_takes_the_host_path(sb: Any) -> None:
    sb.ipc_refusal = "CUDA_ERROR_NOT_SUPPORTED (an expandable segment)"
    node = Recorder()
    x = sb.allocator.asarray(np.arange(12, dtype=np.int32))
    assert [at.send(node, "out", x) for _ in range(2)] == ["inline", "inline"]
    assert sb.exports == 0
    assert _cuda_ipc.in_flight() == 0
    np.testing.assert_array_equal(at.decode(node.sent[0][1], node.sent[0][2]), x.view)
    said = [e["message"] for e in node.logs if "cuIpcGetMemHandle failed" in e["message"]]
    assert len(said) == 1, "said once per output and reason"


def test_exhausted_slots_export_nothing_more(sb: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARROW_TENSOR_CUDA_SLOTS", "1")
    node = Recorder()
    x = sb.allocator.asarray(np.arange(8, dtype=np.uint8))
    assert at.send(node, "out", x) == "cuda"
    held = at.decode(node.sent[0][1], node.sent[0][2])
    assert at.send(node, "out", x) == "inline"  # no free slot: this one by the host
    assert sb.exports == 1  # only the memory the held tensor still reads
    del held
    _cuda_ipc.close_all(0)
    assert sb.exports == 0


def test_a_send_that_fails_withdraws_its_descriptor_at_once(sb: Any) -> None:
    class Refusing(Recorder):
        def send_output(self, output_id: str, data: Any, metadata: Any = None) -> None:
            raise RuntimeError("dora refused the message")

    x = sb.allocator.asarray(np.arange(8, dtype=np.float64))
    with pytest.raises(RuntimeError, match="dora refused"):
        at.send(Refusing(), "out", x)
    assert _cuda_ipc.in_flight() == 0
    assert sb.exports == 0


def test_a_failure_while_describing_withdraws_the_export(
    sb: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise MemoryError("no host memory for the checksum copy")

    monkeypatch.setattr(_cuda_ipc, "_host_bytes", broken)
    x = sb.allocator.asarray(np.arange(8, dtype=np.float64))
    with pytest.raises(MemoryError):
        _cuda_ipc.encode_cuda(x, checksum=True)
    assert _cuda_ipc.in_flight() == 0
    assert sb.exports == 0


def test_the_stand_in_opens_only_64_byte_handles(sb: Any) -> None:
    with pytest.raises(at.CudaUnavailableError, match="64 bytes, got 66"):
        sb.open_handle(b"\x02c" + HANDLE, 0)


# --- a zombie producer is a gone producer ---------------------------------------------------


def test_a_zombie_counts_as_exited_where_it_matters() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while pid_running(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert pid_alive(child.pid), "not reaped yet: kill(pid, 0) still answers"
        assert not pid_running(child.pid)
    finally:
        child.wait()
    assert not pid_alive(child.pid)
    assert pid_running(os.getpid())


# --- "cuda" is the current device -------------------------------------------------------------


def test_cuda_without_an_index_is_the_current_device(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    assert _receive._parse_device("cuda") == 0  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert _receive._parse_device("cuda") == 3
    assert _receive._parse_device("cuda:1") == 1
    assert _receive._parse_device("cpu") == "cpu"


# --- the driver API ---------------------------------------------------------------------------


class FakeDriver:
    """libcuda's entry points as the runtime calls them, recording the context stack."""

    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.stack: list[int] = []
        self.calls: list[tuple[str, list[int]]] = []

    def _record(self, name: str) -> int:
        self.calls.append((name, list(self.stack)))
        return 1 if name == self.fail else 0

    def cuInit(self, flags: Any) -> int:
        return self._record("cuInit")

    def cuGetErrorName(self, code: int, out: Any) -> int:
        out._obj.value = b"CUDA_ERROR_INVALID_VALUE"
        return 0

    def cuGetErrorString(self, code: int, out: Any) -> int:
        out._obj.value = b"invalid argument"
        return 0

    def cuDeviceGet(self, out: Any, ordinal: Any) -> int:
        out._obj.value = ordinal.value
        return self._record("cuDeviceGet")

    def cuDevicePrimaryCtxRetain(self, out: Any, dev: Any) -> int:
        out._obj.value = 0x100 + dev.value
        return self._record("cuDevicePrimaryCtxRetain")

    def cuCtxPushCurrent_v2(self, ctx: Any) -> int:
        self.stack.append(ctx.value)
        return 0

    def cuCtxPopCurrent_v2(self, out: Any) -> int:
        out._obj.value = self.stack.pop()
        return 0

    def cuIpcOpenMemHandle_v2(self, out: Any, handle: Any, flags: Any) -> int:
        out._obj.value = 0xA000
        return self._record("cuIpcOpenMemHandle")

    def cuIpcCloseMemHandle(self, ptr: Any) -> int:
        return self._record("cuIpcCloseMemHandle")

    def cuMemGetAddressRange_v2(self, base: Any, size: Any, ptr: Any) -> int:
        base._obj.value, size._obj.value = ptr.value & ~0xFFF, 0x2000
        return self._record("cuMemGetAddressRange")

    def cuIpcGetMemHandle(self, out: Any, base: Any) -> int:
        ctypes.memmove(ctypes.addressof(out._obj), HANDLE, 64)
        return self._record("cuIpcGetMemHandle")


def test_every_driver_call_runs_in_its_devices_primary_context() -> None:
    lib = FakeDriver()
    rt = _runtime.Runtime(lib)
    ptr = rt.ipc_open(HANDLE, 1)
    assert ptr == 0xA000
    assert rt.address_range(0xA123, 1) == (0xA000, 0x2000)
    rt.ipc_close(ptr, 1)
    assert rt.ipc_get(0xA000, 1) == HANDLE
    by_call = dict(lib.calls)
    names = (
        "cuIpcOpenMemHandle",
        "cuMemGetAddressRange",
        "cuIpcCloseMemHandle",
        "cuIpcGetMemHandle",
    )
    for name in names:
        assert by_call[name] == [0x101], f"{name} ran outside device 1's context"
    assert lib.stack == [], "every push is popped"
    assert [n for n, _ in lib.calls].count("cuDevicePrimaryCtxRetain") == 1  # retained once


def test_a_refused_driver_call_is_typed_and_pops_its_context() -> None:
    lib = FakeDriver(fail="cuIpcOpenMemHandle")
    rt = _runtime.Runtime(lib)
    with pytest.raises(
        at.CudaUnavailableError,
        match=r"cuIpcOpenMemHandle failed: CUDA_ERROR_INVALID_VALUE \(1\) invalid argument",
    ):
        rt.ipc_open(HANDLE, 0)
    assert lib.stack == []


def test_no_driver_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> Any:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    with pytest.raises(at.CudaUnavailableError, match="no CUDA driver here"):
        _runtime.Runtime()


def test_descriptors_name_their_block_and_slot(sb: Any) -> None:
    array, meta = _cuda_ipc.encode_cuda(sb.allocator.asarray(np.ones(4)))
    assert meta[_schema.KEY_CUDA_BLOCK].startswith("at-")
    assert len(array) == 128
    _cuda_ipc.withdraw(meta)
    assert _cuda_ipc.in_flight() == 0
    assert sb.exports == 0
