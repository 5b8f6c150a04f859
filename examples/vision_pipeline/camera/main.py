"""Synthetic camera: uint8 HxWx3 frames of moving shapes, FRAMES of them at FPS.

Env: FRAMES (default 100), FPS (default 15), WIDTH (default 320), HEIGHT (default 240).

No warm-up or handshake is needed: arrow_tensor holds the first frames while a receiver
starts (ARCHITECTURE.md, "Start-up and loss"), and each frame's ``at.seq`` lets receivers
report a frame dora dropped.
Each frame carries ``frame_id``, ``tag`` (``"frame-00012"``), ``t_ns`` (CLOCK_MONOTONIC
at capture, shared by the processes of one machine), ``width`` and ``height``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from arrow_tensor.config import integer, number, setting
from arrow_tensor.node import Node

COLORS = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 240]], dtype=np.uint8)


def render(i: int, height: int, width: int) -> np.ndarray:
    """Frame ``i``: a grey gradient with a red disc, a green square and a blue bar moving."""
    y, x = np.mgrid[0:height, 0:width]
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[...] = (90 + 40 * x / max(width - 1, 1))[..., None].astype(np.uint8)
    r = max(min(height, width) // 10, 2)
    t = i / 20.0
    cx, cy = width * (0.5 + 0.35 * np.cos(t)), height * (0.5 + 0.3 * np.sin(t))
    frame[(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = COLORS[0]
    sx = int((i * 3) % max(width - 2 * r, 1))
    sy = height // 5
    frame[sy : sy + 2 * r, sx : sx + 2 * r] = COLORS[1]
    by = int(height - 2 * r - (i * 2) % max(height - 3 * r, 1))
    frame[by : by + r, width // 6 : width // 6 + 3 * r] = COLORS[2]
    return frame


def main() -> None:
    """Send FRAMES frames at FPS, then return (downstream inputs close, the dataflow ends)."""
    frames = setting("FRAMES", integer(minimum=1), 100)
    fps = setting("FPS", number(minimum=0.1, maximum=1000), 15.0)
    width = setting("WIDTH", integer(minimum=16, maximum=8192), 320)
    height = setting("HEIGHT", integer(minimum=16, maximum=8192), 240)
    node = Node()
    start = time.monotonic()
    for i in range(frames):
        frame = torch.from_numpy(render(i, height, width))
        node.send(
            "frame",
            frame,
            frame_id=i,
            tag=f"frame-{i:05d}",
            t_ns=time.monotonic_ns(),
            width=width,
            height=height,
        )
        time.sleep(max(0.0, start + (i + 1) / fps - time.monotonic()))


if __name__ == "__main__":
    main()
