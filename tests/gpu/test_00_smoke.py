"""The 30-second two-process smoke check (``smoke.py``), first of the GPU tests to run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import smoke

pytestmark = pytest.mark.gpu


@pytest.mark.timeout(120)
def test_two_processes_exchange_every_case_exactly_and_leave_nothing_behind() -> None:
    report = smoke.run(smoke.Torch(), seconds=30, max_bytes=smoke.SIZES[-1])
    assert report["messages"] > 0, report
    assert report["failures"] == [], report
    assert report["peer_open_handles"] == 0, report
    assert report["in_flight_at_end"] == 0, report
    assert report["leftover"] <= 0, f"device memory not back at its baseline: {report}"
