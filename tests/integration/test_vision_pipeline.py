"""The vision pipeline example, run with the real dora CLI: every frame back once, in order."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import yaml

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vision_pipeline"
FRAMES, WIDTH, HEIGHT = 24, 160, 120


def dataflow_in(tmp_path: Path) -> Path:
    """The example's dataflow with absolute node paths, so dora's out/ lands in tmp_path."""
    spec = yaml.safe_load((EXAMPLE / "dataflow.yml").read_text())
    for node in spec["nodes"]:
        node["path"] = str((EXAMPLE / node["path"]).resolve())
    path = tmp_path / "dataflow.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def load_example_node(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"vision_{name}", EXAMPLE / name / "main.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_default_picture_lands_where_git_ignores_it(tmp_path: Path) -> None:
    """`make example` must not leave an untracked file in the user's checkout (the default
    path itself is what the dataflow test below uses)."""
    if shutil.which("git") is None or not (EXAMPLE.parents[1] / ".git").exists():
        pytest.skip("not a git checkout")
    target = EXAMPLE / "out" / "latest_frame.png"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(target)], cwd=EXAMPLE)
    assert ignored.returncode == 0, f"{target} would show up as untracked"


def test_png_writer_and_box_drawing(tmp_path: Path) -> None:
    image = pytest.importorskip("matplotlib.image")
    sink = load_example_node("sink")
    rgb = np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    sink.write_png(tmp_path / "x.png", rgb)
    back = image.imread(tmp_path / "x.png")
    assert (np.round(back * 255).astype(np.uint8) == rgb).all()
    drawn = sink.draw_boxes(np.zeros((20, 30, 3), np.uint8), np.array([[2.0, 3, 12, 15]]), [1])
    assert drawn[3, 2:14].tolist() == [sink.PALETTE[1].tolist()] * 12
    assert drawn[9, 5].tolist() == [0, 0, 0]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_every_frame_comes_back_once_in_order_with_its_metadata(
    tmp_path: Path, run_dora: Any
) -> None:
    # OUTPUT_PNG left at its default: relative to the dataflow's folder, under out/.
    report_path, png_path = tmp_path / "report.json", tmp_path / "out" / "latest_frame.png"
    env = {
        "FRAMES": str(FRAMES),
        "FPS": "20",
        "WIDTH": str(WIDTH),
        "HEIGHT": str(HEIGHT),
        "REPORT": str(report_path),
    }
    run = run_dora(dataflow_in(tmp_path), env=env, cwd=tmp_path, timeout=280)
    log = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, log
    assert report_path.exists(), log
    report = json.loads(report_path.read_text())

    # No handshake in the example: the start-up hold and the zenoh drop wait
    # (transport._startup) bring every frame, once and in order, exact.
    ids = report["frame_ids"]
    assert report["decode_errors"] == {}, log
    assert ids == list(range(FRAMES)), log
    assert report["missing"] == [], log
    for i, frame in zip(ids, report["frames"], strict=True):
        metadata = frame["metadata"]
        assert set(metadata) == {"frame_id", "tag", "t_ns", "width", "height"}
        assert metadata["frame_id"] == i
        assert metadata["tag"] == f"frame-{i:05d}"
        assert (metadata["width"], metadata["height"]) == (WIDTH, HEIGHT)
        assert isinstance(metadata["t_ns"], int)
        assert frame["boxes"] == 5
        assert frame["latency_ms"] > 0
    assert [f["metadata"]["t_ns"] for f in report["frames"]] == sorted(
        f["metadata"]["t_ns"] for f in report["frames"]
    )
    # The batcher carried the frames and nothing else (no warm-up frames).
    batched = re.search(r"batcher: (\d+) items in \d+ batches, 0 rejected", run.stdout)
    assert batched is not None, log
    assert int(batched.group(1)) == FRAMES
    assert "never arrived" not in run.stdout + run.stderr, log

    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (WIDTH, HEIGHT)


def test_the_sink_names_a_frame_that_never_arrived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gap in the frame ids is printed and reported, not silently skipped."""
    testing = pytest.importorskip("dora.testing")
    torch = pytest.importorskip("torch")
    import arrow_tensor as at
    from arrow_tensor.node import Node

    def detections(frame_id: int) -> dict[str, Any]:
        value = {
            "boxes": torch.zeros(1, 4),
            "scores": torch.ones(1),
            "labels": torch.ones(1, dtype=torch.int64),
        }
        array, meta = at.encode(value)
        meta.update(frame_id=frame_id, t_ns=time.monotonic_ns())
        return {"type": "INPUT", "id": "detections", "value": array, "metadata": meta}

    events = [detections(i) for i in (0, 1, 3, 6)]
    sink = load_example_node("sink")
    monkeypatch.setattr(sink, "Node", lambda: Node(testing.MockNode(events)))
    monkeypatch.setenv("REPORT", str(tmp_path / "report.json"))
    monkeypatch.setenv("OUTPUT_PNG", str(tmp_path / "latest.png"))
    sink.main()

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["frame_ids"] == [0, 1, 3, 6]
    assert report["missing"] == [2, 4, 5]
    printed = capsys.readouterr().out
    assert "sink: frame 2 never arrived" in printed
    assert "sink: frame 4..5 never arrived" in printed
