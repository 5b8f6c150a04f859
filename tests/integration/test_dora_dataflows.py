"""The shipped dataflows under the real dora CLI, judged by the validator's JSON report."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from arrow_tensor import testing as tt

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DATAFLOWS = Path(__file__).resolve().parent / "dataflows"
BIN = Path(sys.executable).parent  # the venv running pytest also runs the python nodes


def dora_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # dora starts nodes with `python`
    env.update(extra)
    return env


def dora(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dora"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def expected_cases(dataflow: Path) -> set[str]:
    """The case ids the dataflow's tensor_source is configured to send."""
    nodes = {n["id"]: n for n in yaml.safe_load(dataflow.read_text())["nodes"]}
    env = {k: str(v) for k, v in (nodes["tensor_source"].get("env") or {}).items()}
    config = tt.SourceConfig.from_env(env)
    return {case.id for case in tt.select_cases(config.cases, config.sizes)}


def read_report(path: Path, result: subprocess.CompletedProcess) -> dict[str, Any]:
    assert path.exists(), f"no report; dora said:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    return json.loads(path.read_text())


def assert_every_case_passed(report: dict[str, Any], dataflow: Path) -> None:
    cases = expected_cases(dataflow)
    assert report["passed"], report["reasons"]
    assert report["verdict"] == "PASS"
    assert report["corrupt"] == report["undecodable"] == 0
    assert report["expected_total"] == len(cases)
    assert report["end_marker"]
    assert all(t["ok"] == t["messages"] >= 1 for t in report["cases"].values())
    seen = set(report["cases"])
    assert seen <= cases
    # A case may be missing only because dora dropped its message, within the threshold.
    assert len(cases - seen) == report["dropped"] <= report["max_drop_fraction"] * len(cases)
    assert set(report["classes"]) == set(tt.LAYOUTS)


def test_default_dataflow_passes(tmp_path):
    report_path = tmp_path / "report.json"
    result = dora("run", "dataflow.yml", env=dora_env(REPORT_PATH=str(report_path)), cwd=ROOT)
    report = read_report(report_path, result)
    assert result.returncode == 0, result.stdout[-4000:]
    assert_every_case_passed(report, ROOT / "dataflow.yml")
    assert "PASS: " in result.stdout
    assert "layout class" in result.stdout
    assert max(cfg_size for cfg_size in _sizes(report)) == 64 << 20


def _sizes(report: dict[str, Any]) -> list[int]:
    return [tt.Case.parse(case).nbytes or 0 for case in report["cases"]]


def test_small_dataflow_passes_from_another_directory(tmp_path):
    report_path = tmp_path / "report.json"
    dataflow = DATAFLOWS / "small.yml"
    result = dora("run", str(dataflow), env=dora_env(REPORT_PATH=str(report_path)), cwd=tmp_path)
    report = read_report(report_path, result)
    assert result.returncode == 0, result.stdout[-4000:]
    assert_every_case_passed(report, dataflow)


def test_corrupting_source_makes_the_validator_fail(tmp_path):
    report_path = tmp_path / "report.json"
    dataflow = DATAFLOWS / "corrupt.yml"
    result = dora("run", str(dataflow), env=dora_env(REPORT_PATH=str(report_path)), cwd=ROOT)
    report = read_report(report_path, result)
    assert result.returncode != 0
    assert "Node `validator` failed" in result.stdout + result.stderr
    assert not report["passed"]
    assert report["verdict"] == "FAIL"
    # every message with at least one payload byte was corrupted, and each one was caught
    with_bytes = [c for c in report["cases"] if not c.endswith("/0B") and "/empty" not in c]
    assert report["corrupt"] == sum(report["cases"][c]["messages"] for c in with_bytes) > 0
    assert report["ok"] == report["received"] - report["corrupt"]
    assert report["failures"][0]["detail"].startswith("bytes: 1 of ")


def _dora_processes(port: int) -> list[str]:
    """Command lines of live dora coordinators/daemons bound to ``port``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a in ("coordinator", "daemon") for a in args) and str(port) in args:
            found.append(" ".join(args))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_small_dataflow_with_dora_up_start_attach_down(tmp_path):
    report_path = tmp_path / "report.json"
    dataflow = DATAFLOWS / "small.yml"
    # Our own coordinator: lifecycle commands reach whatever coordinator owns the port, and
    # coordinators sharing a HOME fight over the lock of ~/.dora/coordinator.redb.
    home = tmp_path / "home"
    home.mkdir()
    port = _free_port()
    env = dora_env(DORA_COORDINATOR_PORT=str(port), HOME=str(home))
    up = dora("up", env=env, cwd=tmp_path, timeout=60)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        # Nodes are spawned by the daemon: pass the report path with --env.
        result = dora(
            "start",
            str(dataflow),
            "--attach",
            "--env",
            f"REPORT_PATH={report_path}",
            env=env,
            cwd=tmp_path,
        )
    finally:
        down = dora("down", env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert_every_case_passed(read_report(report_path, result), dataflow)
    # dora 1.1.0's `down` sometimes reports "WS connection closed" because the coordinator
    # exits before answering; what matters is that nothing of this instance is left running.
    assert down.returncode == 0 or "WS connection closed" in down.stdout + down.stderr, (
        down.stdout + down.stderr
    )
    deadline = time.monotonic() + 10  # processes may take a moment to exit after `down`
    while _dora_processes(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _dora_processes(port) == []
