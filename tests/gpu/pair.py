"""A producer's end of ``ipc_peer.py``: start the receiving process, ask, read its answers."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

INLINE_MAX = 1 << 20
"""Bigger message bytes go through a file in /dev/shm, not hex in a JSON line."""

PEER = Path(__file__).with_name("ipc_peer.py")


class Peer:
    """One receiving process; every request is answered within ``timeout`` seconds.

    ``log`` keeps the requests, the answers and the peer's stderr, to print when a test
    fails.
    """

    def __init__(self, env: dict[str, str] | None = None, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.log: list[str] = []
        # stderr to a file: a pipe nobody reads would block a chatty peer.
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request, return its answer (``AssertionError`` with the log on timeout)."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        line = json.dumps({"op": op, **fields})
        self.log.append(f"> {line[:300]}")
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.timeout
        while not selector.select(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                raise AssertionError(f"peer gave no answer to {op!r}:\n{self.dump()}")
        answer = self.proc.stdout.readline()
        if not answer:
            raise AssertionError(f"peer exited during {op!r}:\n{self.dump()}")
        self.log.append(f"< {answer.strip()[:600]}")
        return json.loads(answer)

    def decode(self, message: tuple[pa.Array, dict[str, Any]], **fields: Any) -> dict[str, Any]:
        """Have the peer decode one message (``fields``: decode options, ``expect``...)."""
        array, meta = message
        data = array.buffers()[1].to_pybytes() if len(array) else b""
        if len(data) <= INLINE_MAX:
            return self.ask("decode", array=data.hex(), meta=meta, **fields)
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.NamedTemporaryFile(dir=folder, prefix="peer-") as f:
            f.write(data)
            f.flush()
            return self.ask("decode", array_file=f.name, meta=meta, **fields)

    def ok(self, answer: dict[str, Any]) -> dict[str, Any]:
        """``answer``, after asserting it says ``ok`` (the log in the message otherwise)."""
        assert answer.get("ok"), f"{answer}\n{self.dump()}"
        return answer

    def dump(self) -> str:
        """Requests, answers and the peer's stderr so far."""
        self.stderr.seek(0)
        err = self.stderr.read()[-4000:]
        return "\n".join([*self.log[-40:], "--- peer stderr ---", err])

    def close(self) -> None:
        """Ask the peer to quit; kill it if it does not."""
        if self.proc.poll() is None:
            try:
                self.ask("quit")
            except AssertionError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self.stderr.close()
