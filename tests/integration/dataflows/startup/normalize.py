"""uint8 frames to float32 in [0, 1], with run(fn): the frame id flows through."""

from __future__ import annotations

import torch
from arrow_tensor.node import run


def normalize(frame, metadata):
    return torch.as_tensor(frame).float().div(255.0)


run(normalize)
