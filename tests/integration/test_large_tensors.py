"""Tensors past dora's 256 MiB message cap round-trip through a real dataflow (chunked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

DATAFLOW = Path(__file__).parent / "dataflows" / "large_tensors" / "dataflow.yml"


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_tensors_past_the_message_cap_round_trip(tmp_path: Path, run_dora: Any) -> None:
    """1 GiB contiguous, a 288 MiB non-dense view and a 260 MiB channels_last numpy array.

    The receiver checks the checksum over the exact bytes sent, the content against a
    rebuilt copy, and (numpy) the strides; every case must need more than one message.
    """
    proc = run_dora(DATAFLOW, env={"REPORT": str(tmp_path / "report.json")}, timeout=280)
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    report = json.loads((tmp_path / "report.json").read_text())
    cases = {k: v for k, v in report.items() if not k.startswith("_")}
    assert set(cases) == {"contiguous_1GiB", "non_dense_288MiB", "channels_last_numpy_260MiB"}
    for name, result in cases.items():
        assert result["ok"], (name, result, log)
        assert result["messages"] >= 2, (name, result)
    assert cases["contiguous_1GiB"]["shape"] == [4096, 65536]
    # The receiver holds one reassembly buffer plus the rebuilt reference, not the chunks.
    assert report["_max_rss_mib"] < 6 * 1024, report["_max_rss_mib"]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_too_small_pool_is_said_once_per_output_with_the_yaml_fix(run_dora: Any) -> None:
    """A sender with dora's default 8 MB pool sends 16 MiB inline and raw messages."""
    dataflow = Path(__file__).parent / "dataflows" / "small_pool" / "dataflow.yml"
    proc = run_dora(dataflow, timeout=100)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "RECEIVED 6" in out, out[-4000:]
    warnings = [line for line in out.splitlines() if "shared_memory_pool_size" in line]
    assert len(warnings) == 2, warnings  # once per output, not once per message
    for output in ("dense", "strided"):
        (line,) = [w for w in warnings if f"output '{output}'" in w]
        assert "`shared_memory_pool_size: 64MB`" in line
        assert "node sender" in line
