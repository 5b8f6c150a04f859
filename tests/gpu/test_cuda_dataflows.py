"""CUDA IPC through real dora dataflows, on a real GPU (``make test-gpu``).

Each test starts ``dora run`` on a small dataflow of ``cuda_node.py`` (producer / receivers)
or of the shipped ``tensor_source`` / ``validator`` with ``DEVICE=cuda``, and asserts on the
JSON reports the nodes write: every byte checked against what the producer made, the path
each message took (``at.kind == "cuda"``: a handle, no payload bytes), errors by type.
Speed is printed, never asserted. See tests/gpu/conftest.py for how this directory is
skipped without a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

ROOT = Path(__file__).parents[2]
CUDA_NODE = Path(__file__).with_name("cuda_node.py")
VENV_BIN = Path(sys.executable).parent
DORA = shutil.which("dora", path=str(VENV_BIN)) or shutil.which("dora")


@pytest.fixture(autouse=True)
def _real_gpu() -> None:
    """Belt and braces: a test body never runs without a CUDA device."""
    import torch

    assert torch.cuda.is_available(), "GPU tests must not run without a CUDA device"
    assert DORA is not None, "the dora CLI is required"


def run(tmp_path: Path, nodes: list[dict[str, Any]], timeout: int = 600) -> dict[str, Any]:
    """``dora run`` the nodes; every node's JSON report by node id."""
    spec = tmp_path / "dataflow.yml"
    spec.write_text(yaml.safe_dump({"nodes": nodes}))
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [str(DORA), "run", str(spec)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    reports = {}
    for node in nodes:
        path = Path(node["env"]["REPORT"])
        if path.exists():
            reports[node["id"]] = json.loads(path.read_text())
    # Every node's log lines (dora prefixes them with the node id), for failure messages.
    reports["_output"] = (done.stdout[-6000:] + "\n" + done.stderr[-3000:]).strip()
    return reports


def producer(tmp_path: Path, **env: Any) -> dict[str, Any]:
    return {
        "id": "producer",
        "path": str(CUDA_NODE),
        "outputs": ["out"],
        "env": {
            "ROLE": "producer",
            "BACKEND": "torch",
            "REPORT": str(tmp_path / "p.json"),
            **{k: str(v) for k, v in env.items()},
        },
    }


def receiver(tmp_path: Path, node_id: str, **env: Any) -> dict[str, Any]:
    return {
        "id": node_id,
        "path": str(CUDA_NODE),
        "inputs": {"x": {"source": "producer/out", "queue_size": 1000}},
        "env": {
            "ROLE": "receiver",
            "BACKEND": "torch",
            "REPORT": str(tmp_path / f"{node_id}.json"),
            **{k: str(v) for k, v in env.items()},
        },
    }


def assert_exact(reports: dict[str, Any], name: str, minimum: int) -> None:
    """Node ``name`` received at least ``minimum`` messages, every one exact, as handles."""
    assert name in reports, f"node {name} wrote no report:\n{reports['_output']}"
    report, log = reports[name], reports["_output"]
    assert report["received"] >= minimum, (report, log)  # dora may drop a few at start-up
    assert report["corrupt"] == 0, (report, log)
    assert report["errors"] == {}, (report, log)
    assert set(report["kinds"]) == {"cuda"}, (report, log)  # handles only, never payloads
    assert report["open_handles"] == 0, (report, log)  # closed after the last tensor


def test_978_stack_of_two_small_cuda_tensors_round_trips_exactly(tmp_path: Path) -> None:
    """dora-rs/dora#978: ``torch.stack`` of two small CUDA tensors, sent 100 times."""
    reports = run(
        tmp_path,
        [
            producer(tmp_path, MODE="stack", COUNT=100),
            receiver(tmp_path, "rx", MODE="stack", HOLD=4),
        ],
    )
    assert reports["producer"]["paths"] == {"cuda": 100}, reports["_output"]
    assert_exact(reports, "rx", 90)


def test_fan_out_to_two_receivers_holding_views(tmp_path: Path) -> None:
    nodes = [
        producer(tmp_path, MODE="sizes", SIZES="4096,1048576", COUNT=200),
        receiver(tmp_path, "left", MODE="sizes", HOLD=8),
        receiver(tmp_path, "right", MODE="sizes", HOLD=0),
    ]
    reports = run(tmp_path, nodes)
    assert reports["producer"]["paths"] == {"cuda": 400}, reports["_output"]
    assert_exact(reports, "left", 350)
    assert_exact(reports, "right", 350)


def test_a_producer_killed_mid_stream_gives_clear_errors_not_a_crash(tmp_path: Path) -> None:
    nodes = [
        producer(tmp_path, MODE="sizes", SIZES="65536", COUNT=500, KILL_AT=150),
        receiver(tmp_path, "rx", MODE="sizes", HOLD=16),
    ]
    reports = run(tmp_path, nodes)
    assert "producer" not in reports  # SIGKILLed before it could write a report
    report = reports["rx"]  # the receiver kept running and finished its loop
    assert report["corrupt"] == 0, report
    assert set(report["errors"]) <= {"StaleHandleError"}, report
    assert report["received"] + sum(report["errors"].values()) <= 150


def test_10k_messages_without_memory_growth(tmp_path: Path) -> None:
    nodes = [
        producer(tmp_path, MODE="sizes", SIZES="1048576", COUNT=10_000),
        receiver(tmp_path, "rx", MODE="sizes", HOLD=2),
    ]
    reports = run(tmp_path, nodes, timeout=1200)
    prod = reports["producer"]
    assert prod["paths"].get("cuda", 0) >= 9_000, prod  # exhaustion may send a few by host
    memory = prod["memory"]
    # Bounded in-flight: device memory at the end is what it was after the first 1,000.
    assert max(memory[1:]) <= memory[0] + 40 * (1 << 20), memory
    assert prod["in_flight_at_end"] <= 32
    report = reports["rx"]
    assert report["corrupt"] == 0
    assert report["open_handles"] == 0


DTYPE_CASES = "torch/*/4KiB,torch/*/1MiB,torch/*/scalar,torch/*/empty"


def test_every_dtype_and_layout_class_through_the_integrity_check(tmp_path: Path) -> None:
    """The shipped tensor_source -> validator pipeline with DEVICE=cuda, plus an observer
    that checks every message went as a CUDA descriptor."""
    source = {
        "id": "tensor_source",
        "path": str(ROOT / "nodes/tensor_source/main.py"),
        "inputs": {"ack": {"source": "validator/ack", "queue_size": 100}},
        "outputs": ["tensors"],
        "env": {
            "SEED": "3",
            "CASES": DTYPE_CASES,
            "SIZES": "4KiB,1MiB",
            "DEVICE": "cuda",
            "CHECKSUM": "true",
            "WINDOW": "4",
            "REPORT": str(tmp_path / "none.json"),
        },
    }
    validator = {
        "id": "validator",
        "path": str(ROOT / "nodes/validator/main.py"),
        "inputs": {"tensors": {"source": "tensor_source/tensors", "queue_size": 1000}},
        "outputs": ["ack"],
        "env": {
            "REPORT_PATH": str(tmp_path / "validator.json"),
            "REPORT": str(tmp_path / "validator.json"),
        },
    }
    observer = {
        "id": "observer",
        "path": str(CUDA_NODE),
        "inputs": {"x": {"source": "tensor_source/tensors", "queue_size": 1000}},
        "env": {
            "ROLE": "receiver",
            "BACKEND": "torch",
            "MODE": "observe",
            "REPORT": str(tmp_path / "observer.json"),
        },
    }
    reports = run(tmp_path, [source, validator, observer])
    assert reports["validator"]["passed"], reports["_output"]
    kinds = reports["observer"]["kinds"]
    assert kinds.get("cuda", 0) > 0, kinds
    assert reports["observer"]["errors"] == {}


def test_latency_versus_size_against_the_host_path(tmp_path: Path) -> None:
    """Benchmark, printed: one-way latency until the receiver holds a synchronized tensor."""
    sizes = "4096,65536,1048576,16777216,67108864"
    table = {}
    for path, env in (("cuda-ipc", {}), ("host", {"ARROW_TENSOR_TRANSPORT": "host"})):
        run_dir = tmp_path / path
        run_dir.mkdir()
        prod = producer(run_dir, MODE="sizes", SIZES=sizes, COUNT=50, **env)
        prod["shared_memory_pool_size"] = "1GB"
        reports = run(run_dir, [prod, receiver(run_dir, "rx", MODE="sizes")])
        assert reports["rx"]["corrupt"] == 0
        table[path] = reports["rx"]["latency_ms"]
    print("\none-way latency, median ms (dora run, same GPU)")
    print(f"{'bytes':>12} {'cuda-ipc':>10} {'host path':>10}")
    for size in sizes.split(","):
        cuda, host = table["cuda-ipc"].get(size), table["host"].get(size)
        print(f"{int(size):>12} {cuda or float('nan'):>10.3f} {host or float('nan'):>10.3f}")
