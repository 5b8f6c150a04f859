"""The tensors of the large-tensor check: deterministic, so the receiver can rebuild them."""

from __future__ import annotations

from typing import Any

import torch

GIB = 1 << 30

CASES = {
    # 1 GiB contiguous float32: five chunks of dora's raw samples.
    "contiguous_1GiB": lambda: (
        torch.arange(GIB // 4, dtype=torch.int32).view(torch.float32).view(4096, -1)
    ),
    # 288 MiB payload of a non-dense view (x[:, ::2]): compacted chunk by chunk.
    "non_dense_288MiB": lambda: torch.arange(2 * 72 * 2**20, dtype=torch.int32).view(-1, 1024)[
        :, ::2
    ],
    # A channels_last uint8 batch just over the cap, numpy this time.
    "channels_last_numpy_260MiB": lambda: (
        torch.arange(260 * 2**20, dtype=torch.int32)
        .to(torch.uint8)
        .view(65, 1024, 1024 // 64, 256)
        .numpy()
        .transpose(0, 3, 1, 2)
    ),
}


def make(name: str) -> Any:
    """The tensor of case ``name``."""
    return CASES[name]()
