"""Fixtures of the memory room's tests: a fresh host stand-in of a GPU per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from arrow_tensor.memory import _blocks
from arrow_tensor.memory.cuda import _handles, _receive, _standin
from arrow_tensor.memory.cuda import _ipc as _cuda_ipc


@pytest.fixture
def sb(monkeypatch: pytest.MonkeyPatch) -> Iterator[_standin.HostStandIn]:
    """A fresh stand-in device and fresh transport state; everything unlinked afterwards."""
    fresh = _standin.HostStandIn()
    monkeypatch.setattr(_standin, "_STANDIN", [fresh])
    monkeypatch.setattr(_handles, "opened", _handles.HandleCache())
    monkeypatch.setenv("ARROW_TENSOR_CUDA_WAIT", "50ms")
    _cuda_ipc.close_all(0)
    _receive.forget_blocks()
    yield fresh
    _cuda_ipc.close_all(0)
    _receive.forget_blocks()
    _blocks.set_identity(None)
    fresh.allocator.close()
