"""Tensors sent again and again with one layout each: after the first, the fast paths carry
them (Note [The fast path] in arrow_tensor.codec._tensor). Content changes with the message index,
so a stale or misplaced payload cannot pass."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

REPEATS = 6


def _numbers(n: int, i: int) -> torch.Tensor:
    """n float32 values, different for every message i, with NaN payloads mixed in."""
    return torch.arange(i, n + i, dtype=torch.int32).mul_(2654435761 % 2**31).view(torch.float32)


CASES = {
    # inline: the tensor's own memory
    "numpy_contiguous_4KiB": lambda i: _numbers(1024, i).numpy().reshape(1, 8, 8, 16),
    "torch_contiguous_4KiB": lambda i: _numbers(1024, i).view(1, 8, 8, 16),
    "torch_channels_last_64KiB": lambda i: (
        _numbers(16384, i).view(1, 32, 32, 16).permute(0, 3, 1, 2)
    ),
    "numpy_transposed_1MiB": lambda i: _numbers(1 << 18, i).numpy().reshape(512, 512).T,
    # raw: compacted into dora's sample (on torch's threads from 4 MiB)
    "numpy_non_dense_64KiB": lambda i: _numbers(32768, i).numpy().reshape(64, 512)[:, ::2],
    "torch_non_dense_4MiB": lambda i: _numbers(1 << 21, i).view(1024, 2048)[:, ::2],
    "torch_contiguous_8MiB": lambda i: _numbers(1 << 21, i).view(2, 1024, 1024),
    # the full path every time: no numpy form
    "torch_bfloat16_4KiB": lambda i: _numbers(1024, i).view(torch.bfloat16).view(64, 32),
}


def make(name: str, i: int) -> Any:
    """The tensor of case ``name`` for message ``i``."""
    return CASES[name](i)


def bits(x: Any) -> bytes:
    """The values' bytes in logical order (exact, NaN payloads included)."""
    if isinstance(x, torch.Tensor):
        x = x.contiguous().view(torch.uint8).numpy() if x.dtype == torch.bfloat16 else x.numpy()
    return np.ascontiguousarray(x).tobytes()
