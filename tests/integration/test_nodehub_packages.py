"""arrow_tensor nodes with dora's real node-hub packages (pinned, from PyPI), through dora run.

The node-hub packages pin numpy<2 while OpenCV pulls numpy>=2, so they live in their own
virtual environment (``.venv-nodehub``, made once by the fixture below) and the dataflows
name their console scripts by absolute path. What the node-hub nodes send or expect is in
``shared/notes/nodehub-facts.md``; our side of each dataflow is ``nodehub_node.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.integration

cv2 = pytest.importorskip("cv2")

ROOT = Path(__file__).resolve().parents[2]
NODE = Path(__file__).with_name("nodehub_node.py")
NODEHUB_VENV = ROOT / ".venv-nodehub"
NODEHUB_PACKAGES = [
    "dora-echo==0.5.0",
    "opencv-video-capture==0.5.0",
    "pyarrow-sender==0.5.0",
    "pyarrow-assert==0.5.0",
]
"""Installed without their dependencies: they declare numpy<2, which OpenCV 5 refuses."""
WIDTH, HEIGHT, FRAMES = 96, 64, 12
ENCODINGS = ["bgr8", "rgb8", "yuv420", "jpeg", "png"]


@pytest.fixture(scope="session")
def nodehub() -> Path:
    """The bin folder of a virtual environment holding the pinned node-hub packages."""
    opencv = f"opencv-python-headless=={metadata.version('opencv-python-headless')}"
    runtime = ["dora-rs==1.1.0", "pyarrow", "numpy", opencv]  # the same OpenCV as ours
    wanted = "\n".join([*NODEHUB_PACKAGES, *runtime])
    stamp = NODEHUB_VENV / "arrow-tensor-packages.txt"
    if stamp.exists() and stamp.read_text() == wanted:
        return NODEHUB_VENV / "bin"
    pip = [str(NODEHUB_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(NODEHUB_VENV)],
        [*pip, "--no-deps", *NODEHUB_PACKAGES],
        [*pip, *runtime],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            pytest.fail(f"could not build {NODEHUB_VENV}: {' '.join(step)}\n{done.stderr[-3000:]}")
    stamp.write_text(wanted)
    return NODEHUB_VENV / "bin"


def write_dataflow(tmp_path: Path, nodes: list[dict[str, Any]]) -> Path:
    path = tmp_path / "dataflow.yml"
    path.write_text(yaml.safe_dump({"nodes": nodes}, sort_keys=False))
    return path


def ours(node_id: str, role: str, **fields: Any) -> dict[str, Any]:
    env = {"ROLE": role, **{k: str(v) for k, v in fields.pop("env", {}).items()}}
    return {"id": node_id, "path": str(NODE), "env": env, **fields}


def frame_digest(frame: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(frame).tobytes(), digest_size=16).hexdigest()


# --- opencv-video-capture -> arrow_tensor Node ---------------------------------------------
def write_clip(path: Path) -> list[np.ndarray]:
    """A small MJPG clip of distinct frames; returns what OpenCV reads back from it."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (WIDTH, HEIGHT))
    assert writer.isOpened()
    ramp = np.linspace(0, 255, WIDTH, dtype=np.uint8)
    for i in range(FRAMES + 4):  # a few more than are read: the camera never hits the end
        frame = np.empty((HEIGHT, WIDTH, 3), np.uint8)
        frame[..., 0] = ramp
        frame[..., 1] = (ramp[::-1].astype(int) + 20 * i) % 256
        frame[..., 2] = np.arange(HEIGHT, dtype=np.uint8)[:, None] * 3
        frame[4 * i % HEIGHT : 4 * i % HEIGHT + 8, 8 * i % WIDTH : 8 * i % WIDTH + 8] = 255
        writer.write(frame)
    writer.release()
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == FRAMES + 4
    assert len({frame_digest(f) for f in frames}) == len(frames), "frames must be distinct"
    return frames


def as_received(frame: np.ndarray, encoding: str) -> np.ndarray:
    """What our Node must deliver for ``frame`` sent in ``encoding`` (OpenCV's own ops)."""
    if encoding == "bgr8":
        return frame
    if encoding == "rgb8":
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)  # the sender's channel order
    if encoding == "yuv420":
        return cv2.cvtColor(cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420), cv2.COLOR_YUV2BGR_I420)
    ok, data = cv2.imencode("." + encoding, frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)


@pytest.mark.timeout(300)
def test_camera_frames_arrive_as_opencv_reads_them_in_every_encoding(
    tmp_path: Path, nodehub: Path, run_dora: Any
) -> None:
    clip = tmp_path / "clip.avi"
    frames = write_clip(clip)
    report = tmp_path / "frames.npz"
    cameras = [
        {
            "id": f"cam_{encoding}",
            "path": str(nodehub / "opencv-video-capture"),
            "inputs": {"tick": {"source": "ticker/tick", "queue_size": 100}},
            "outputs": ["image"],
            "env": {"CAPTURE_PATH": str(clip), "ENCODING": encoding},
        }
        for encoding in ENCODINGS
    ]
    nodes = [
        ours("ticker", "ticker", outputs=["tick"], env={"COUNT": FRAMES, "PERIOD": 0.08}),
        *cameras,
        ours(
            "frames",
            "frames",
            inputs={e: {"source": f"cam_{e}/image", "queue_size": 100} for e in ENCODINGS},
            env={"REPORT": report},
        ),
    ]
    run = run_dora(write_dataflow(tmp_path, nodes), cwd=tmp_path, timeout=240)
    log = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode == 0, log
    assert "FRAMES_ERRORS {}" in run.stdout, log
    assert "arrow_tensor.node" not in run.stderr, log  # no skip, no fallback
    got = np.load(report)
    for encoding in ENCODINGS:
        expected = {frame_digest(as_received(f, encoding)): i for i, f in enumerate(frames)}
        received = got[f"{encoding}/frames"]
        shape = (HEIGHT, WIDTH, 3)
        assert received.shape[1:] == shape, encoding
        # Frame by frame: each one is exactly one of the clip's, in order (dora may drop a
        # tick; the camera then reads the next frame for the next one).
        order = [expected.get(frame_digest(frame)) for frame in received]
        assert None not in order, f"{encoding}: a frame differs from OpenCV's {order}"
        assert order == sorted(set(order)), f"{encoding}: out of order {order}"
        assert len(order) >= FRAMES - 1, f"{encoding}: {len(order)} of {FRAMES} frames"
        assert order[0] == 0


# --- arrow_tensor Node -> dora-echo -> arrow_tensor Node -----------------------------------
@pytest.mark.timeout(300)
def test_values_relayed_by_dora_echo_arrive_exact(
    tmp_path: Path, nodehub: Path, run_dora: Any
) -> None:
    nodes = [
        ours(
            "source",
            "relay_source",
            inputs={"ready": "sink/ready", "done": "sink/done"},
            outputs=["out"],
            shared_memory_pool_size="1GB",
        ),
        {
            "id": "echo",
            "path": str(nodehub / "dora-echo"),
            "inputs": {"out": {"source": "source/out", "queue_size": 100}},
            "outputs": ["out"],
            "shared_memory_pool_size": "1GB",  # a relay forwards dora's big samples too
        },
        ours(
            "sink",
            "relay_sink",
            inputs={"in": {"source": "echo/out", "queue_size": 100}},
            outputs=["ready", "done"],
        ),
    ]
    run = run_dora(write_dataflow(tmp_path, nodes), cwd=tmp_path, timeout=240)
    log = run.stdout[-4000:] + run.stderr[-3000:]
    assert run.returncode == 0, log
    done = re.search(r"RELAY_DONE (\{.*\}) errors=(\{.*\})", run.stdout)
    assert done is not None, log
    results = json.loads(done.group(1))
    assert results == dict.fromkeys(["loaned", "bf16_channels_last", "large", "nested"], True), log
    assert done.group(2) == "{}", log
    # The loan and the tensor past dora's cap went in their messages, never as handles.
    assert "SENT loaned inline" in run.stdout, log
    assert "SENT large chunked" in run.stdout, log
    warned = [line for line in log.splitlines() if "have not opened its shared-memory" in line]
    assert len(warned) == 1
    assert "['echo']" in warned[0]


# --- pyarrow-sender -> arrow_tensor Node -> pyarrow-assert ---------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("wrong", [None, "numbers", "text", "tensor"])
def test_plain_values_and_plain_outputs_satisfy_pyarrow_assert(
    tmp_path: Path, nodehub: Path, run_dora: Any, wrong: str | None
) -> None:
    """pyarrow-assert raises on a value unequal to its DATA. Each control run changes one
    DATA and must fail: that proves each message really reaches its assert."""
    asserts = {
        "numbers": "[1, 2, 3]",  # a flat list of ints: an Int64Array
        "text": "'hello node-hub'",  # a str: a one-element StringArray
        "tensor": "[1.0, 3.0, 2.0, 4.0]",  # a transposed float64 tensor, plain: C order
    }
    if wrong is not None:
        asserts[wrong] = {"numbers": "[1, 2, 4]", "text": "'hello'", "tensor": "[1.0, 2.0]"}[wrong]
    nodes = [
        {
            "id": "sender",
            "path": str(nodehub / "pyarrow-sender"),
            "outputs": ["data"],
            "env": {"DATA": "[1, 2, 3]"},
        },
        ours("bridge", "bridge", inputs={"data": "sender/data"}, outputs=list(asserts)),
        *(
            {
                "id": f"assert_{name}",
                "path": str(nodehub / "pyarrow-assert"),
                "inputs": {"value": f"bridge/{name}"},
                "env": {"DATA": data},
            }
            for name, data in asserts.items()
        ),
    ]
    run = run_dora(write_dataflow(tmp_path, nodes), cwd=tmp_path, timeout=120)
    log = run.stdout[-3000:] + run.stderr[-3000:]
    assert "BRIDGE got ndarray [1, 2, 3]" in run.stdout, log  # a foreign array: a 1-D view
    if wrong is None:
        assert run.returncode == 0, log
    else:
        assert run.returncode != 0, log
        assert re.search(rf"assert_{wrong}.*Expected", log), log
