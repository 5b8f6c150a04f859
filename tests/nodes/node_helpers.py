"""Helpers for node tests: load a node's main.py and drive it with dora's MockNode."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import arrow_tensor as at
import pytest

dora_testing = pytest.importorskip("dora.testing")
ROOT = Path(__file__).resolve().parents[2]


def load_node(name: str) -> ModuleType:
    """Import ``nodes/<name>/main.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"node_{name}", ROOT / "nodes" / name / "main.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordingMock(dora_testing.MockNode):
    """MockNode that records every send with its metadata, and can idle like a real node.

    An event ``"IDLE"`` in the script makes ``next(timeout)`` wait out the timeout and
    return dora's timeout error, as a real node does when nothing arrives.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[str, Any, dict[str, Any]]] = []

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        event = super().next(timeout)
        if event is not None and event.get("id") == "IDLE":
            assert timeout is not None, "the node blocked forever on an idle input"
            time.sleep(timeout)
            return {"type": "ERROR", "error": "Timeout event stream error: Receiver timed out"}
        return event

    def send_output(self, output_id: str, data: Any, metadata: Any = None) -> None:
        self.sent.append((output_id, data, dict(metadata or {})))
        super().send_output(output_id, data, metadata)

    def decoded(self) -> list[tuple[Any, dict[str, Any]]]:
        """(value, user metadata) of every send, in order."""
        return [
            (at.decode(d, m), {k: v for k, v in m.items() if not k.startswith("at.")})
            for _, d, m in self.sent
        ]


def item_event(value: Any, input_id: str = "in", **metadata: Any) -> dict[str, Any]:
    """An INPUT event carrying ``value`` encoded as dora would deliver it."""
    array, meta = at.encode(value)
    meta.update(metadata)
    return {"type": "INPUT", "id": input_id, "value": array, "metadata": meta}


IDLE: dict[str, Any] = {"type": "INPUT", "id": "IDLE", "value": None, "metadata": {}}
