"""The start-up hold (Note [Start-up hold]) over a stand-in for dora's extension table."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from arrow_tensor.transport import _startup
from arrow_tensor.transport._startup import DONE, Acks, Edge, Hold, ack_key, rx_key


class Table:
    """dora's extension table as two nodes see it: one dict, shared."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], bytes] = {}
        self.loads = 0

    def node(self) -> Any:
        table = self

        class _Node:
            def extension_store(self, ns: str, key: str, value: bytes) -> None:
                table.entries[(ns, key)] = bytes(value)

            def extension_load(self, ns: str, key: str, remove: bool = False) -> bytes | None:
                table.loads += 1
                return table.entries.get((ns, key))

        return _Node()


def _hold(table: Table, queue: int = 3, timeout: float = 5.0, **kw: Any) -> tuple[Hold, list]:
    said: list[tuple[str, str]] = []
    hold = Hold(
        table.node(),
        "out",
        [Edge("rx", "in", queue)],
        timeout,
        lambda t, s: said.append((t, s)),
        **kw,
    )
    return hold, said


def test_messages_within_the_queue_go_without_asking() -> None:
    table = Table()
    hold, _ = _hold(table, queue=3)
    for _ in range(3):
        hold.admit()
    assert table.loads == 0
    assert hold.waited_s == 0


def test_a_sender_waits_until_the_receiver_took_a_message() -> None:
    table = Table()
    receiver = Acks(table.node(), "rx", {"in": 3}, hold_s=60)
    assert table.entries[(_startup.STARTUP_NS, rx_key("rx", "in"))] == b"3"
    hold, said = _hold(table, queue=3)
    for _ in range(3):
        hold.admit()

    def take() -> None:
        time.sleep(0.2)
        receiver.took("in")  # ack_every(3) == 1: reported at once

    threading.Thread(target=take).start()
    t0 = time.monotonic()
    hold.admit()
    assert time.monotonic() - t0 >= 0.15
    assert hold.sent == 4
    assert said == []


def test_done_releases_and_the_hold_finishes() -> None:
    table = Table()
    receiver = Acks(table.node(), "rx", {"in": 2}, hold_s=0.0001)
    hold, _ = _hold(table, queue=2)
    hold.admit()
    receiver.took("in")  # the first message starts the receiver's hold_s
    time.sleep(0.01)
    receiver.took("in")  # past hold_s: done
    assert table.entries[(_startup.STARTUP_NS, ack_key("rx", "in"))] == DONE
    assert not receiver.active
    hold.admit()
    hold.admit()  # would overflow a queue of 2: asks, reads done
    assert hold.finished


def test_a_receiver_without_arrow_tensor_is_let_go_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_startup, "GRACE", 0.1)
    table = Table()
    hold, _ = _hold(table, queue=1)
    hold.admit()
    t0 = time.monotonic()
    hold.admit()  # no rx entry: waits the grace, then sends
    assert 0.05 <= time.monotonic() - t0 < 2
    assert hold.finished


def test_a_receiver_that_takes_nothing_is_named_after_the_timeout() -> None:
    table = Table()
    Acks(table.node(), "rx", {"in": 1}, hold_s=60)
    hold, said = _hold(table, queue=1, timeout=0.2)
    hold.admit()
    hold.admit()
    assert hold.finished
    assert len(said) == 1
    topic, text = said[0]
    assert topic == "startup:rx/in"
    assert "receiver rx/in" in text
    assert "ARROW_TENSOR_STARTUP_TIMEOUT" in text


def test_waiting_calls_back_so_a_node_can_take_its_own_inputs() -> None:
    table = Table()
    receiver = Acks(table.node(), "rx", {"in": 1}, hold_s=60)
    calls: list[int] = []

    def waiting() -> None:
        calls.append(1)
        if len(calls) == 3:
            receiver.took("in")

    hold, _ = _hold(table, queue=1, waiting=waiting)
    hold.admit()
    hold.admit()
    assert len(calls) == 3


def test_a_receiver_whose_entries_vanished_exited() -> None:
    table = Table()
    Acks(table.node(), "rx", {"in": 1}, hold_s=60)
    hold, _ = _hold(table, queue=1)
    hold.admit()
    table.entries.clear()  # the daemon dropped them: the node exited
    hold.admit()
    assert hold.finished


def test_acks_report_every_quarter_queue_and_close_says_done() -> None:
    table = Table()
    receiver = Acks(table.node(), "rx", {"in": 8}, hold_s=60)
    key = (_startup.STARTUP_NS, ack_key("rx", "in"))
    receiver.took("in")
    assert key not in table.entries
    receiver.took("in")
    assert table.entries[key] == b"2"
    receiver.took("other")  # not a reporting input: ignored
    receiver.close()
    assert table.entries[key] == DONE


def test_no_table_no_reports() -> None:
    receiver = Acks(object(), "rx", {"in": 8}, hold_s=60)
    assert not receiver.active
    receiver.took("in")


def test_zenoh_overlay_sets_the_drop_waits_unless_zenoh_is_configured(tmp_path: Any) -> None:
    env: dict[str, str] = {"ARROW_TENSOR_ZENOH_DROP_WAIT": "50ms"}
    path = _startup.zenoh_overlay(env)
    assert path is not None
    assert env["DORA_ZENOH_CONFIG_OVERLAY"] == path
    text = Path(path).read_text()
    assert '"transport/link/tx/queue/congestion_control/drop/wait_before_drop": 50000' in text
    assert _startup.zenoh_overlay({"DORA_ZENOH_CONFIG_OVERLAY": "/mine.json5"}) is None
    assert _startup.zenoh_overlay({"ZENOH_CONFIG": "/z.json5"}) is None
    assert _startup.zenoh_overlay({"ARROW_TENSOR_ZENOH_DROP_WAIT": "0"}) is None
