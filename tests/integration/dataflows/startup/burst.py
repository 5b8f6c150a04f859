"""Sends MESSAGES small tensors back to back, each with its index ``i``."""

from __future__ import annotations

import time

import numpy as np
from arrow_tensor.config import integer, setting
from arrow_tensor.node import Node

messages = setting("MESSAGES", integer(minimum=1), 40)
node = Node()
time.sleep(0.5)  # the receiver is in its loop
for i in range(messages):
    node.send("out", np.full(16, i, dtype=np.int64), i=i)
