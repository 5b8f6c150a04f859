"""Preprocess: uint8 HxWx3 frame -> normalized float32 CxHxW (a permuted view, sent as is)."""

from __future__ import annotations

import torch
from arrow_tensor.node import run

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def preprocess(frame: torch.Tensor, metadata: dict) -> torch.Tensor:
    # HWC math, then a CHW view: non-contiguous, travels with its layout and no copy.
    return ((frame.float() / 255.0 - MEAN) / STD).permute(2, 0, 1)


if __name__ == "__main__":
    run(preprocess)
