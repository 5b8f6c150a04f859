"""Structured payloads with thousands of leaves through a real dataflow, via the node API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

NODE = Path(__file__).resolve().parent / "structured_node.py"


@pytest.mark.timeout(240)
def test_thousands_of_leaves_arrive_exact_and_verified(tmp_path: Path, run_dora: Any) -> None:
    report = tmp_path / "report.json"
    spec = {
        "nodes": [
            {"id": "sender", "path": str(NODE), "outputs": ["out"], "env": {"ROLE": "sender"}},
            {
                "id": "receiver",
                "path": str(NODE),
                "inputs": {"x": {"source": "sender/out", "queue_size": 100}},
                "env": {"ROLE": "receiver", "REPORT": str(report)},
            },
        ]
    }
    dataflow = tmp_path / "dataflow.yml"
    dataflow.write_text(yaml.safe_dump(spec))
    run = run_dora(dataflow, cwd=tmp_path, timeout=220)
    assert run.returncode == 0, run.stdout[-4000:]
    result = json.loads(report.read_text())
    assert result["errors"] == {}
    assert result["results"] == [
        {"seq": 0, "note": "message 0", "same": True},
        {"seq": 1, "note": "message 1", "same": True},
    ]
