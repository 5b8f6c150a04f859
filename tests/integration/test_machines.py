"""Several machines on dora's own cluster: a coordinator and two daemons, A and B, on this host.

Daemon B runs in a mount namespace with a /dev/shm of its own, so nothing can pass through
shared memory by accident: what B's nodes get crossed dora's inter-daemon path, as between
two computers. Every address is on loopback. The namespace needs root (``unshare -m``);
elsewhere the tests skip, saying so. On a failure the daemons' logs are in the message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DORA = shutil.which("dora", path=str(VENV_BIN)) or shutil.which("dora")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_shm_works() -> str | None:
    """Why daemon B cannot get a private /dev/shm here, or None."""
    if DORA is None:
        return "the dora CLI is not installed"
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "a private /dev/shm for daemon B needs root and unshare(1)"
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs t /dev/shm"],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if probe.returncode == 0 else f"unshare -m failed: {probe.stderr.strip()}"


class Cluster:
    """A coordinator and daemons A and B; ``run(spec)`` starts a dataflow and waits for it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self._files: list[Any] = []

    def start(self) -> None:
        """Start the coordinator, then daemons A and B; return once both registered."""
        self.port = free_port()
        zenoh = free_port()
        env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env = env
        daemon = [DORA, "daemon", "--coordinator-port", str(self.port)]
        peer = ["--zenoh-peer", f"tcp/127.0.0.1:{zenoh}"]
        self._spawn(
            "coordinator", [DORA, "coordinator", "--port", str(self.port), "--store", "memory"]
        )
        self._wait_for("coordinator", "Listening on port")
        machine_a = ["--machine-id", "A", "--local-listen-port", str(free_port())]
        self._spawn("A", [*daemon, *machine_a, *peer])
        shm = 'mount -t tmpfs -o size=4g tmpfs /dev/shm && exec "$@"'
        machine_b = ["--machine-id", "B", "--local-listen-port", str(free_port())]
        namespace = ["unshare", "-m", "--propagation", "private", "sh", "-c", shm, "sh"]
        self._spawn("B", [*namespace, *daemon, *machine_b, *peer])
        self._wait_for("coordinator", "daemon A-", "daemon B-")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        out = log.open("wb")
        self._files.append(out)
        self.procs[name] = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # its own process group: stopped with every child
        )

    def _wait_for(self, name: str, *needles: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.logs[name].read_text(errors="replace")
            if all(n in text for n in needles):
                return
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail(f"{name} did not say {needles}:\n{self.tail()}")

    def run(self, spec: dict[str, Any], timeout: float = 240) -> subprocess.CompletedProcess[str]:
        path = self.workdir / f"dataflow-{len(list(self.workdir.glob('dataflow-*')))}.yml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return subprocess.run(
            [DORA, "start", str(path), "--coordinator-port", str(self.port), "--attach"],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )

    def tail(self, chars: int = 1500) -> str:
        return "\n".join(
            f"--- {name} ({log}):\n{log.read_text(errors='replace')[-chars:]}"
            for name, log in self.logs.items()
        )

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for out in self._files:
            out.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    why = private_shm_works()
    if why is not None:
        pytest.skip(why)
    running = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


def place(spec: dict[str, Any], machines: dict[str, str], workdir: Path) -> dict[str, Any]:
    """``spec`` with every node deployed on its machine, paths absolute, cwd ``workdir``."""
    for node in spec["nodes"]:
        node["deploy"] = {"machine": machines[node["id"]], "working_dir": str(workdir)}
    return spec


def report_of(run: subprocess.CompletedProcess[str], cluster: Cluster) -> str:
    return f"{run.stdout[-5000:]}\n{run.stderr[-3000:]}\n{cluster.tail()}"


@pytest.mark.timeout(300)
def test_the_default_pipeline_with_the_validator_on_another_machine(
    cluster: Cluster, tmp_path: Path
) -> None:
    spec = yaml.safe_load((ROOT / "dataflow.yml").read_text())
    for node in spec["nodes"]:
        node["path"] = str(ROOT / node["path"])
    report = tmp_path / "report.json"
    spec["nodes"][1]["env"]["REPORT_PATH"] = str(report)
    run = cluster.run(place(spec, {"tensor_source": "A", "validator": "B"}, tmp_path))
    log = report_of(run, cluster)
    assert run.returncode == 0, log
    result = json.loads(report.read_text())
    assert result["verdict"] == "PASS", log
    # dora's cross-machine path loses a message now and then (benchmarks/README.md, "Across
    # machines"): the validator's own bound on drops applies; nothing may arrive wrong.
    assert result["expected_total"] > 800, log
    assert result["received"] >= result["expected_total"] * 0.99, log
    assert result["corrupt"] == 0, log
    said = [line for line in run.stdout.splitlines() if "reaches receivers on other" in line]
    assert len(said) == 1, log  # the route is said once, as a warning
    assert "WARN" in said[0]
    assert "'validator' on 'B'" in said[0]


@pytest.mark.timeout(300)
def test_tensors_past_dora_s_cap_cross_machines_exact_or_said_lost(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Each value arrives bit-exact, or the receiver names the chunk dora lost, in bounded
    time: never a silent drop, a wrong value, a blocked sender or a PASS without data.

    Without a way for receivers to acknowledge chunks (dora's extension table is per
    daemon; no dataflow edge goes back), a lost chunk loses its value: the 1 GiB one
    lost a chunk in 4 of 5 runs here (README, "Running on several machines").
    """
    folder = ROOT / "tests" / "integration" / "dataflows" / "large_tensors"
    spec = yaml.safe_load((folder / "dataflow.yml").read_text())
    report = tmp_path / "large.json"
    for node in spec["nodes"]:
        node["path"] = str(folder / node["path"])
        node["env"] = {"TRANSPORT": "", "REPORT": str(report)}  # the library's choice
    started = time.monotonic()
    run = cluster.run(place(spec, {"sender": "A", "receiver": "B"}, tmp_path))
    log = report_of(run, cluster)
    assert time.monotonic() - started < 200, log  # nobody blocked for minutes
    result = json.loads(report.read_text())
    cases = {"contiguous_1GiB", "non_dense_288MiB", "channels_last_numpy_260MiB"}
    assert cases <= result.keys(), log  # every value arrived, or was reported lost
    for name in cases:
        outcome = result[name]
        assert (
            outcome["ok"]
            or "a chunk was lost" in outcome["error"]
            or ("(lost or reordered)" in outcome["error"])
        ), log
    assert any(result[name]["ok"] for name in cases), log
    passed = all(result[name]["ok"] for name in cases)
    assert ("LARGE TENSORS PASS" in run.stdout) == passed, log
    assert (run.returncode == 0) == passed, log
    sent = re.findall(r"sent (\w+) via (\w+)", run.stdout)
    assert {route for _, route in sent} == {"chunked"}, log  # never a handle across machines


@pytest.mark.timeout(300)
def test_loaned_tensors_reach_another_machine_as_messages(cluster: Cluster, tmp_path: Path) -> None:
    node_path = str(ROOT / "tests" / "integration" / "shm_pool_node.py")
    count = 40
    spec = {
        "nodes": [
            {
                "id": "prod",
                "path": node_path,
                "inputs": {"ready_rx": "rx/ready"},
                "outputs": ["out", "done"],
                "env": {"ROLE": "producer", "COUNT": count, "READY": "rx", "PERIOD": 0.02},
            },
            {
                "id": "rx",
                "path": node_path,
                "inputs": {"x": {"source": "prod/out", "queue_size": 100}},
                "outputs": ["ready"],
                "env": {"ROLE": "receiver", "HOLD": 3},
            },
        ]
    }
    run = cluster.run(place(spec, {"prod": "A", "rx": "B"}, tmp_path))
    log = report_of(run, cluster)
    assert run.returncode == 0, log
    sent = re.search(r"PRODUCER_DONE shm=(\d+) message=(\d+)", run.stdout)
    got = re.search(r"RECEIVER_DONE shm=(\d+) message=(\d+) torn=(\d+) error=(\d+)", run.stdout)
    assert sent is not None, log
    assert got is not None, log
    assert sent.groups() == ("0", str(count)), log  # a loan across machines: a message
    assert got.group(1) == "0", log
    assert int(got.group(2)) >= count - 2, log  # content checked per message; dora may drop
    assert got.groups()[2:] == ("0", "0"), log
