"""Start-up without loss and visible loss, through the real dora (issue 16).

The camera pipeline is written as the README says, with dora's defaults and no handshake;
the gap dataflows make dora drop messages on purpose (a queue of 2, a receiver that falls
behind) to see the receiving Node name them, and keep them whole with the start-up hold.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent / "dataflows" / "startup"
FRAMES = 20
RUNS = 10


def _spans(missing: list[int]) -> list[str]:
    """``[1, 2, 3, 7]`` -> ``["1-3", "7"]``."""
    spans: list[list[int]] = []
    for n in missing:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return [str(a) if a == b else f"{a}-{b}" for a, b in spans]


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("run", range(RUNS))
def test_the_camera_pipeline_delivers_every_frame_in_order(
    run: int, tmp_path: Path, run_dora: Any
) -> None:
    report = tmp_path / "report.json"
    proc = run_dora(HERE / "dataflow.yml", env={"FRAMES": str(FRAMES), "REPORT": str(report)})
    log = proc.stdout[-4000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    result = json.loads(report.read_text())
    assert result["ids"] == list(range(FRAMES)), log
    assert result["lost"] == {}, log
    assert result["reordered"] == {}, log
    assert "never arrived" not in proc.stdout + proc.stderr, log


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_small_queue_is_reported_with_the_missing_range_and_the_fix(
    tmp_path: Path, run_dora: Any
) -> None:
    report = tmp_path / "report.json"
    proc = run_dora(HERE / "gaps.yml", env={"REPORT": str(report)})
    log = proc.stdout[-4000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    result = json.loads(report.read_text())
    missing = sorted(set(range(40)) - set(result["got"]))
    assert missing, f"dora dropped nothing: the test proves nothing\n{log}"
    assert result["lost"] == {"data": len(missing)}, log
    out = proc.stdout + proc.stderr
    first = _spans(missing)[0]
    warnings = re.findall(
        r"WARN +slow: arrow_tensor\.node: input 'data' \(from burst/out\): (.*)", out
    )
    assert warnings, log
    assert warnings[0].startswith(f"messages {first} never arrived"), warnings[0]
    assert "(queue_size 2)" in warnings[0], warnings[0]
    assert "queue_size: 100}" in warnings[0], warnings[0]
    # Once per input, then a summary line at the end with the exact count.
    assert len([w for w in warnings if "never arrived" in w]) == 1, warnings
    assert any(
        w.endswith(f"{len(missing)} lost ({', '.join(_spans(missing))})") for w in warnings
    ), warnings


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_start_up_hold_keeps_a_small_queue_whole(tmp_path: Path, run_dora: Any) -> None:
    report = tmp_path / "report.json"
    proc = run_dora(HERE / "held.yml", env={"REPORT": str(report)})
    log = proc.stdout[-4000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    result = json.loads(report.read_text())
    assert result["got"] == list(range(40)), log
    assert result["lost"] == {}, log
