"""The fast paths through the real dora CLI: repeated layouts, every message exact."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

DATAFLOW = Path(__file__).parent / "dataflows" / "fast_path" / "dataflow.yml"
# No numpy form: sent by its data pointer like any torch tensor, but the receiver's fast
# path (a numpy view, then DLPack) does not take it.
RECEIVE_SLOW_ONLY = {"torch_bfloat16_4KiB"}


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_repeated_layouts_take_the_fast_paths_and_arrive_exact(
    tmp_path: Path, run_dora: Any
) -> None:
    """Inline (numpy, torch, channels_last, transposed) and raw (non-dense, threaded 4+ MiB)."""
    proc = run_dora(DATAFLOW, env={"REPORT": str(tmp_path / "report.json")}, timeout=170)
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    assert "SENDER DONE" in proc.stdout, log
    report = json.loads((tmp_path / "report.json").read_text())
    sent = dict(re.findall(r"CASE (\S+) via \S+ fast_entries=(True|False)", proc.stdout))
    assert set(report) == set(sent), (sorted(report), sorted(sent))
    assert len(report) == 8
    for name, result in report.items():
        assert result["errors"] == [], (name, result)
        assert result["received"] == result["ok"] == 6, (name, result)
        assert sent[name] == "True", (name, log)  # the sender learned the layout
        assert result["fast"] == (0 if name in RECEIVE_SLOW_ONLY else 6), (name, result)
