"""Sink: per-frame results, end-to-end latency (p50/p90) and a PNG of the latest frame.

Inputs: ``detections`` ({"boxes", "scores", "labels"} per frame, with the frame's metadata)
and ``frame`` (the camera's images, to draw on). Env: OUTPUT_PNG (default
``out/latest_frame.png`` under the dataflow's folder; ``out/`` is git-ignored),
SCORE_THRESHOLD (boxes drawn and printed, default 0.5), REPORT (optional path of a JSON
report: every frame id received in order, its metadata, its number of boxes, the frame ids
that never came, latency statistics). A gap in the frame ids is printed when it is seen:
dora's delivery is lossy under congestion, and a lost frame should not go unnoticed.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (imported up front: the first message would pay for it)
from arrow_tensor.config import number, setting, text
from arrow_tensor.node import Node

PALETTE = np.array([[255, 255, 0], [255, 0, 255], [0, 255, 255]], dtype=np.uint8)


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an HxWx3 uint8 image as PNG (8-bit RGB, no filtering) with numpy and zlib only."""
    height, width, _ = rgb.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    png += chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b"")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png)


def draw_boxes(rgb: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A copy of ``rgb`` with 2-pixel box outlines, coloured by label."""
    out = rgb.copy()
    height, width, _ = out.shape
    for (x1, y1, x2, y2), label in zip(boxes.astype(int), labels, strict=True):
        x1, x2 = np.clip([x1, x2], 0, width - 2)
        y1, y2 = np.clip([y1, y2], 0, height - 2)
        color = PALETTE[int(label) % len(PALETTE)]
        out[y1 : y1 + 2, x1 : x2 + 2] = color
        out[y2 : y2 + 2, x1 : x2 + 2] = color
        out[y1 : y2 + 2, x1 : x1 + 2] = color
        out[y1 : y2 + 2, x2 : x2 + 2] = color
    return out


def main() -> None:
    """Print one line per frame; at the end latency statistics, the PNG and the report."""
    png_path = setting("OUTPUT_PNG", text, "out/latest_frame.png")
    report_path = setting("REPORT", text, "")
    threshold = setting("SCORE_THRESHOLD", number(minimum=0, maximum=1), 0.5)
    node = Node()
    frames: dict[int, np.ndarray] = {}
    received: list[dict] = []
    latencies: list[float] = []
    latest = None
    missing: list[int] = []
    for input_id, value, metadata in node:
        if input_id == "frame":
            # A copy: holding the received view would pin the camera's shared-memory sample.
            frames[metadata["frame_id"]] = value.numpy().copy()
            for old in [k for k in frames if k < metadata["frame_id"] - 16]:
                del frames[old]
            continue
        frame_id = metadata["frame_id"]
        expected = received[-1]["metadata"]["frame_id"] + 1 if received else 0
        if frame_id > expected:
            missing.extend(range(expected, frame_id))
            gap = f"{expected}" if frame_id == expected + 1 else f"{expected}..{frame_id - 1}"
            print(f"sink: frame {gap} never arrived (dora dropped it on the way)", flush=True)
        latency_ms = (time.monotonic_ns() - metadata["t_ns"]) / 1e6
        latencies.append(latency_ms)
        boxes, scores = value["boxes"].numpy(), value["scores"].numpy()
        labels = value["labels"].numpy()
        keep = scores >= threshold
        received.append({"metadata": metadata, "boxes": len(boxes), "latency_ms": latency_ms})
        found = ", ".join(
            f"label {k} ({p:.2f})" for k, p in zip(labels[keep], scores[keep], strict=True)
        )
        print(
            f"frame {metadata['frame_id']:5d}: {latency_ms:6.1f} ms, {found or 'nothing'}",
            flush=True,
        )
        if metadata["frame_id"] in frames:
            latest = (frames[metadata["frame_id"]], boxes[keep].copy(), labels[keep].copy())
    p50, p90 = np.percentile(latencies, [50, 90]) if latencies else (float("nan"),) * 2
    print(f"sink: {len(received)} frames, latency p50 {p50:.1f} ms, p90 {p90:.1f} ms")
    if latest is not None:
        write_png(png_path, draw_boxes(*latest))
        print(f"sink: wrote {png_path}")
    if report_path:
        report = {
            "frame_ids": [r["metadata"]["frame_id"] for r in received],
            "frames": received,
            "missing": missing,
            "latency_ms": {"p50": float(p50), "p90": float(p90)},
            "decode_errors": dict(node.errors),
            "png": str(Path(png_path).resolve()) if latest is not None else None,
        }
        Path(report_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
