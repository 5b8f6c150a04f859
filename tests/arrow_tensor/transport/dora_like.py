"""A dora.testing.MockNode with what a real dora node has and MockNode lacks: raw samples.

Shared by the transport tests: every send is recorded with its route-level kind.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from dora.testing import MockNode


class _Sample:
    """What ``send_output_raw`` hands out: a writable buffer sent (as uint8) on exit."""

    def __init__(self, node: DoraLikeNode, output_id: str, nbytes: int, meta: dict) -> None:
        self.node, self.output_id, self.meta = node, output_id, dict(meta)
        self.buf = bytearray(nbytes)

    def __enter__(self) -> memoryview:
        self.view = memoryview(self.buf)
        return self.view

    def __exit__(self, *exc: object) -> None:
        self.view.release()  # dora refuses to send while a view is open: same here
        if exc[0] is None:
            array = pa.array(np.frombuffer(bytes(self.buf), dtype=np.uint8))
            self.node.sent.append((self.output_id, array, self.meta, "raw"))


class DoraLikeNode(MockNode):
    """A MockNode that records metadata and, like a real dora node, has raw samples."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[str, pa.Array, dict, str]] = []

    def send_output(self, output_id: str, data: Any, metadata: dict | None = None) -> None:
        self.sent.append((output_id, data, dict(metadata or {}), "inline"))

    def send_output_raw(self, output_id: str, nbytes: int, metadata: dict | None = None) -> Any:
        return _Sample(self, output_id, nbytes, metadata or {})
