"""A 30 Hz camera as a new user writes it: 480x640x3 uint8 frames, each with its frame id."""

from __future__ import annotations

import time

import numpy as np
from arrow_tensor.config import integer, number, setting
from arrow_tensor.node import Node

frames = setting("FRAMES", integer(minimum=1), 20)
fps = setting("FPS", number(minimum=1), 30.0)
node = Node()
start = time.monotonic()
for i in range(frames):
    node.send("frame", np.full((480, 640, 3), i % 256, dtype=np.uint8), frame_id=i)
    time.sleep(max(0.0, start + (i + 1) / fps - time.monotonic()))
