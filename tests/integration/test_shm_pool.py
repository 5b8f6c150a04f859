"""Loaned shared-memory tensors through real dora dataflows (``dora run``).

Every receiver checks every message it gets against the content the producer wrote for that
sequence number, on receipt and again when it lets go of the view (it holds several), so
a slot overwritten while held or a torn write is counted. Dora may drop messages (start-up,
queue limits), so counts are bounded below, never asserted exact.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

NODE = Path(__file__).with_name("shm_pool_node.py")
VENV_BIN = Path(sys.executable).parent
DORA = shutil.which("dora", path=str(VENV_BIN)) or shutil.which("dora")
if DORA is None:
    pytest.skip("the dora CLI is not installed", allow_module_level=True)
if not os.path.isdir("/dev/shm"):
    pytest.skip("POSIX shared memory (/dev/shm) is not available", allow_module_level=True)


def producer(**env: Any) -> dict[str, Any]:
    return {
        "id": "prod",
        "path": str(NODE),
        "outputs": ["out", "done"],
        "env": {"ROLE": "producer", **env},
    }


def receiver(node_id: str, **env: Any) -> dict[str, Any]:
    return {
        "id": node_id,
        "path": str(NODE),
        "inputs": {"x": "prod/out"},
        "outputs": ["ready"],
        "env": {"ROLE": "receiver", **env},
    }


def run(tmp_path: Path, nodes: list[dict[str, Any]]) -> tuple[int, str, str]:
    """Run the dataflow; (exit code, node output, dataflow id in /dev/shm names).

    The producer (first node) starts sending once every receiver has said it is ready.
    """
    receivers = [n["id"] for n in nodes[1:]]
    nodes[0]["inputs"] = {f"ready_{r}": f"{r}/ready" for r in receivers}
    nodes[0]["env"]["READY"] = ",".join(receivers)
    spec = tmp_path / "dataflow.yml"
    spec.write_text(yaml.safe_dump({"nodes": nodes}))
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [DORA, "run", str(spec)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    runs = [p.name for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return done.returncode, done.stdout + done.stderr, runs[0].replace("-", "")


def report(output: str, node_id: str, tag: str) -> dict[str, int]:
    """The ``key=value`` counts of the ``tag`` line printed by ``node_id``."""
    for line in output.splitlines():
        if f" {node_id}: {tag} " in line:
            return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line.split(tag, 1)[1])}
    raise AssertionError(f"{node_id} printed no {tag} line:\n{output[-4000:]}")


def leftovers(dataflow_hex: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"at-{dataflow_hex}")]


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_fan_out_to_two_receivers_holding_views(tmp_path: Path, framework: str) -> None:
    count = 150
    nodes = [
        # One torch thread: torch's 2-thread copy waits for a scheduler slot on a busy box.
        producer(COUNT=count, FRAMEWORK=framework, ARROW_TENSOR_SHM_SLOTS=16, OMP_NUM_THREADS=1),
        receiver("rx1", HOLD=3, FRAMEWORK=framework),
        receiver("rx2", HOLD=6, FRAMEWORK=framework),
    ]
    code, output, dataflow = run(tmp_path, nodes)
    assert code == 0, output[-4000:]
    sent = report(output, "prod", "PRODUCER_DONE")
    assert sent["shm"] + sent["message"] == count
    assert sent["shm"] >= count // 2
    for node_id in ("rx1", "rx2"):
        got = report(output, node_id, "RECEIVER_DONE")
        assert got["torn"] == 0, output[-4000:]
        assert got["error"] == 0, output[-4000:]
        assert got["shm"] >= count // 3
    assert leftovers(dataflow) == []


def test_sigkill_of_the_producer(tmp_path: Path) -> None:
    # "idle" never maps the pool, so its name outlives the producer: receivers remove it.
    # Handles go to "idle" only because the producer trusts the descriptor; by default
    # they wait for every receiver to open the pool (next test).
    nodes = [
        producer(COUNT=400, KILL_AT=120, ARROW_TENSOR_SHM_TRUST="descriptor"),
        receiver("rx1", HOLD=3),
        receiver("rx2", HOLD=5),
        receiver("idle", DECODE=0),
    ]
    code, output, dataflow = run(tmp_path, nodes)
    assert code != 0  # dora reports the killed node
    assert "PRODUCER_KILLING_SELF at 120" in output
    for node_id in ("rx1", "rx2"):
        got = report(output, node_id, "RECEIVER_DONE")
        assert got["torn"] == 0, output[-4000:]
        assert got["error"] == 0, output[-4000:]
        assert 40 <= got["shm"] <= 120
    assert leftovers(dataflow) == []


def test_a_receiver_that_never_opens_the_pool_gets_whole_messages(tmp_path: Path) -> None:
    # Relay-safe handles (Note [Relay-safe handles]): "idle" (like a relay or a recorder)
    # never opens the pool, so no handle is sent; the receiver that decodes gets every
    # value in its message, probes included, and nothing is left in /dev/shm.
    count = 40
    nodes = [producer(COUNT=count), receiver("rx1", HOLD=3), receiver("idle", DECODE=0)]
    code, output, dataflow = run(tmp_path, nodes)
    assert code == 0, output[-4000:]
    sent = report(output, "prod", "PRODUCER_DONE")
    assert sent == {"shm": 0, "message": count}, output[-4000:]
    warned = [line for line in output.splitlines() if "have not opened its shared-memory" in line]
    assert len(warned) == 1, warned  # said once, on the first send
    assert "'idle'" in warned[0]
    got = report(output, "rx1", "RECEIVER_DONE")
    assert got["torn"] == 0
    assert got["error"] == 0
    assert got["message"] >= count // 2
    assert leftovers(dataflow) == []


def test_sigkill_of_a_consumer_holding_views(tmp_path: Path) -> None:
    # 5 slots: without reclaiming the dead receiver's 4 slots, the survivor (holding 4)
    # would leave the producer nothing and almost everything would go by message.
    count = 300
    nodes = [
        producer(COUNT=count, ARROW_TENSOR_SHM_SLOTS=5),
        receiver("doomed", HOLD=3, KILL_AT=30),
        receiver("survivor", HOLD=3),
    ]
    code, output, dataflow = run(tmp_path, nodes)
    assert "RECEIVER_KILLING_SELF" in output
    assert code != 0
    sent = report(output, "prod", "PRODUCER_DONE")
    assert sent["shm"] + sent["message"] == count
    assert sent["shm"] >= count * 3 // 4, output[-4000:]
    got = report(output, "survivor", "RECEIVER_DONE")
    assert got["torn"] == 0
    assert got["error"] == 0
    assert got["shm"] + got["message"] >= count // 2
    assert leftovers(dataflow) == []


def test_pool_exhaustion_under_a_slow_consumer_falls_back_to_messages(tmp_path: Path) -> None:
    # Each iteration of the producer waits at most 20 ms in ``loan`` and 20 ms more in
    # ``send`` (which copies a fallen-back loan into a slot if one frees up meanwhile).
    # The consumer frees a slot every 200 ms, so most sends must go as messages. (With
    # 50 ms, two waits plus the period matched the consumer's pace in 1 run of 3 and
    # every send found a slot.)
    count = 40
    nodes = [
        producer(COUNT=count, PERIOD=0.005, ARROW_TENSOR_SHM_SLOTS=2, ARROW_TENSOR_SHM_WAIT="20ms"),
        receiver("slow", HOLD=1, DELAY=0.2),
    ]
    code, output, dataflow = run(tmp_path, nodes)
    assert code == 0, output[-4000:]
    sent = report(output, "prod", "PRODUCER_DONE")
    assert sent["shm"] + sent["message"] == count
    assert sent["shm"] >= 2
    assert sent["message"] >= 1
    got = report(output, "slow", "RECEIVER_DONE")
    assert got["torn"] == 0
    assert got["error"] == 0
    assert got["shm"] >= 2
    assert "falling back to ordinary messages" in output
    assert leftovers(dataflow) == []


def test_hostile_handles_are_refused_and_the_receiver_keeps_going(tmp_path: Path) -> None:
    nodes = [
        producer(COUNT=40, FORGE=1),
        receiver("rx1", HOLD=2),
    ]
    code, output, dataflow = run(tmp_path, nodes)
    assert code == 0, output[-4000:]
    got = report(output, "rx1", "RECEIVER_DONE")
    assert got["torn"] == 0
    assert got["error"] >= 4  # every forged handle was refused, none read
    assert got["shm"] >= 20
    assert "ShmHandleError" in output
    assert "StaleHandleError" in output
    # Each forged handle (shm_pool_node.forged_handles) for its own reason, none for its
    # envelope or header: they are current-version handles with a well-formed at.tensor.
    assert "VersionError" not in output
    assert "MetadataError" not in output
    for reason in (
        "must name an arrow_tensor block",
        "belongs to dataflow",
        "slot 99999 outside pool",
        "no longer holds generation",
        "bytes [1099511627776, ",  # at.shm.offset 1 << 40
        "bytes [0, 8796093022208) are not an aligned range inside a slot",  # 1 << 40 int64s
    ):
        assert reason in output, reason
    assert leftovers(dataflow) == []
