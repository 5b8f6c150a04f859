"""A small torch model over the batcher's batches (NHWC in, 4 scores per frame out)."""

from __future__ import annotations

import torch
from arrow_tensor.node import run

torch.manual_seed(0)
conv = torch.nn.Conv2d(3, 4, 3, stride=8)


def model(batch, metadata):
    with torch.no_grad():
        return conv(batch.permute(0, 3, 1, 2)).mean(dim=(2, 3))


run(model)
