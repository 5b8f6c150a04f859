"""Test cases: framework x dtype x layout x size, tensors made from a seed, comparison.

Every tensor is a pure function of (seed, case id, sequence number), so a receiver
regenerates exactly what was sent and compares dtype, shape, layout class and bytes.
"""

from __future__ import annotations

import fnmatch
import math
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import config as _config
from .._errors import ArrowTensorError, ConfigError, MetadataError, UnsupportedTensorError
from ..codec import _dtypes, _layout
from ..codec._tensor import plan

KEY_CASE = "test.case"
KEY_SEQ = "test.seq"
KEY_SEED = "test.seed"
KEY_TOTAL = "test.total"
KEY_END = "test.end"
KEY_HELLO = "test.hello"
KEY_CHECKSUMMED = "test.checksummed"

SIZED_LAYOUTS = (
    "contiguous",
    "transposed",
    "channels_last",
    "stepped",
    "negative",
    "expanded",
    "offset",
    "stacked",
)
FIXED_LAYOUTS = ("scalar", "empty")
LAYOUTS = SIZED_LAYOUTS + FIXED_LAYOUTS
FRAMEWORKS = ("torch", "numpy")
# torch has no negative strides; numpy has no bfloat16/float8/complex32.
_NUMPY_ONLY_LAYOUTS = ("negative",)
DEFAULT_SIZES = (0, 4 << 10, 1 << 20, 64 << 20)
_COLUMNS = 64
_BLOCK_WORDS = 1 << 17  # 1 MiB of fresh random words; larger tensors tile it with block keys
_MAX_FAILURES_KEPT = 50
Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------------------------
# Cases and deterministic tensors


@dataclass(frozen=True, order=True)
class Case:
    """One kind of test message: framework, wire dtype, layout class and target size.

    ``nbytes`` is the logical size aimed at (``numel * itemsize``, rounded down to whole
    rows); it is ``None`` for the size-less layouts ``scalar`` and ``empty``.
    """

    framework: str
    dtype: str
    layout: str
    nbytes: int | None = None

    @property
    def id(self) -> str:
        """``framework/dtype/layout[/size]``, the name used in metadata, filters and reports."""
        parts = [self.framework, self.dtype, self.layout]
        if self.nbytes is not None:
            parts.append(_config.format_size(self.nbytes))
        return "/".join(parts)

    @classmethod
    def parse(cls, case_id: object) -> Case:
        """The case named ``case_id``; raises MetadataError for anything we did not generate."""
        if not isinstance(case_id, str):
            raise MetadataError(f"{KEY_CASE!r} must be a str, got {type(case_id).__name__}")
        parts = case_id.split("/")
        expected = "framework/dtype/layout[/size], e.g. 'torch/float32/transposed/4KiB'"
        if len(parts) not in (3, 4):
            raise MetadataError(f"case id {case_id[:80]!r} is not {expected}")
        framework, dtype, layout = parts[:3]
        nbytes = None
        if len(parts) == 4:
            try:
                nbytes = _config.size(parts[3])
            except ValueError:
                raise MetadataError(f"case id {case_id[:80]!r} is not {expected}") from None
        case = cls(framework, dtype, layout, nbytes)
        if not _valid(case) or (nbytes is None) != (layout in FIXED_LAYOUTS):
            raise MetadataError(f"case id {case_id[:80]!r} names no case this version makes")
        return case


def _valid(case: Case) -> bool:
    entry = _dtypes.BY_NAME.get(case.dtype)
    if entry is None or case.layout not in LAYOUTS:
        return False
    if case.framework == "numpy":
        return entry.numpy is not None
    return case.framework == "torch" and case.layout not in _NUMPY_ONLY_LAYOUTS


def import_frameworks() -> None:
    """Import torch now, if installed: it takes seconds, better spent before joining dora.

    A node that imports torch on its first message stalls the whole dataflow meanwhile.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        pass


def _torch_dtypes() -> set[str]:
    try:
        import torch
    except ImportError:
        return set()
    return {d.name for d in _dtypes.ALL if d.torch and getattr(torch, d.torch, None) is not None}


def all_cases(sizes: Sequence[int] = DEFAULT_SIZES) -> list[Case]:
    """Every case this installation can make: framework x dtype x layout x size.

    torch cases are included when torch is importable, with the dtypes it has.
    """
    in_torch = _torch_dtypes()
    out: list[Case] = []
    for framework in FRAMEWORKS:
        for entry in _dtypes.ALL:
            if framework == "torch" and entry.name not in in_torch:
                continue
            for layout in LAYOUTS:
                for nbytes in sizes if layout in SIZED_LAYOUTS else (None,):
                    case = Case(framework, entry.name, layout, nbytes)
                    if _valid(case):
                        out.append(case)
    return out


def select_cases(patterns: Sequence[str], sizes: Sequence[int] = DEFAULT_SIZES) -> list[Case]:
    """The cases whose id matches any of the glob ``patterns`` (``*/uint8/*``, ``torch/*``).

    Raises
    ------
    ConfigError
        When the patterns match nothing (a typo would otherwise send an empty run).
    """
    universe = all_cases(sizes)
    chosen = [c for c in universe if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]
    if not chosen:
        example = universe[0].id if universe else "torch/float32/contiguous/4KiB"
        raise ConfigError(
            f"case patterns {list(patterns)} match none of the {len(universe)} cases "
            f"(ids look like {example!r}; sizes {[_config.format_size(s) for s in sizes]})"
        )
    return chosen


def random_bits(key: Sequence[int], nbytes: int) -> np.ndarray:
    """``nbytes`` reproducible pseudo-random bytes (a writable contiguous uint8 array).

    Up to 1 MiB comes straight from a PCG64 stream; beyond, that block is repeated with a
    fresh random 64-bit key XORed into each repetition, which costs one pass instead of a
    full-length generator run and still makes every 8-byte word depend on its position.
    """
    rng = np.random.default_rng(list(key))
    words = -(-nbytes // 8)
    block = min(words, _BLOCK_WORDS)
    top = np.iinfo(np.uint64).max
    base = rng.integers(0, top, size=block, dtype=np.uint64, endpoint=True)
    if words > block:
        nblocks = -(-words // block)
        keys = rng.integers(0, top, size=(nblocks, 1), dtype=np.uint64, endpoint=True)
        base = np.bitwise_xor(base[None, :], keys).reshape(-1)
    return base[:words].view(np.uint8)[:nbytes]


def _case_key(seed: int, case: Case, seq: int) -> list[int]:
    # crc32 rather than hash(): stable across processes and Python versions.
    return [seed, zlib.crc32(case.id.encode()), seq]


def _grid(case: Case, itemsize: int) -> tuple[int, int]:
    """(rows, cols) of the 2-D logical shape for a sized case."""
    n = (case.nbytes or 0) // itemsize
    cols = max(1, min(n, _COLUMNS))
    return n // cols, cols


def _channels_last_shape(n: int) -> tuple[int, int, int, int]:
    if n < 8:
        return (1, 1, 1, n)
    hw = n // 8
    h = next(d for d in range(math.isqrt(hw), 0, -1) if hw % d == 0)  # squarest exact H x W
    return (2, 4, h, hw // h)


def _base_length(case: Case, rows: int, cols: int) -> int:
    n = rows * cols
    if case.layout == "channels_last":
        return math.prod(_channels_last_shape(n))
    return {
        "stepped": 2 * n,
        "expanded": rows,
        "offset": n + 1,
        "scalar": 1,
        "empty": 0,
    }.get(case.layout, n)


class _Ops:
    """The handful of array operations the layouts need, for numpy or torch."""

    def __init__(self, framework: str) -> None:
        self.torch = framework == "torch"

    def transpose(self, x: Any, dims: Sequence[int]) -> Any:
        return x.permute(*dims) if self.torch else x.transpose(dims)

    def expand(self, x: Any, shape: tuple[int, ...]) -> Any:
        return x.expand(*shape) if self.torch else np.broadcast_to(x, shape)

    def stack(self, parts: list[Any], dim: int) -> Any:
        if self.torch:
            import torch

            return torch.stack(parts, dim=dim)
        return np.stack(parts, axis=dim)

    def cat(self, parts: list[Any], dim: int) -> Any:
        if self.torch:
            import torch

            return torch.cat(parts, dim=dim)
        return np.concatenate(parts, axis=dim)


def _apply_layout(case: Case, base: Any, rows: int, cols: int, ops: _Ops) -> Any:
    n = rows * cols
    layout = case.layout
    if layout == "contiguous":
        return base[:n].reshape(rows, cols)
    if layout == "transposed":
        return ops.transpose(base[:n].reshape(cols, rows), (1, 0))
    if layout == "channels_last":
        nb, c, h, w = _channels_last_shape(n)
        return ops.transpose(base.reshape(nb, h, w, c), (0, 3, 1, 2))
    if layout == "stepped":
        return base.reshape(rows, 2 * cols)[:, ::2]
    if layout == "negative":
        return base.reshape(rows, cols)[::-1, ::-1]
    if layout == "expanded":
        return ops.expand(base.reshape(rows, 1), (rows, cols))
    if layout == "offset":
        return base[1:].reshape(rows, cols)
    if layout == "stacked":
        # dora#978: results of torch.stack/cat sent as the wrong memory. Stack strided views.
        grid = base.reshape(rows, cols)
        if cols % 4:
            return ops.stack([grid], dim=1)
        parts = [grid[:, i::4] for i in range(4)]
        return ops.cat([ops.stack(parts[:2], dim=1), ops.stack(parts[2:], dim=1)], dim=0)
    if layout == "scalar":
        return base.reshape(())
    return base.reshape(3, 0, 5)  # empty


def make_tensor(case: Case, seed: int, seq: int, device: str = "cpu") -> Any:
    """The tensor of ``case`` for message ``seq`` of a run seeded with ``seed``.

    The same arguments give the same dtype, shape, strides and bits in any process.

    Parameters
    ----------
    case:
        What to make (see :func:`all_cases`).
    seed, seq:
        The run's seed and the message's sequence number.
    device:
        For torch cases, where the tensor lives (``"cpu"`` or ``"cuda"``); the bits are made
        on the host and moved, so they are identical on every device.

    Returns
    -------
    A ``torch.Tensor`` or a ``numpy.ndarray``.
    """
    entry = _dtypes.BY_NAME[case.dtype]
    rows, cols = _grid(case, entry.itemsize) if case.nbytes is not None else (0, 0)
    count = _base_length(case, rows, cols)
    bits = random_bits(_case_key(seed, case, seq), count * entry.itemsize)
    if case.dtype == "bool":
        np.bitwise_and(bits, 1, out=bits)  # only 0 and 1 are valid bools
    ops = _Ops(case.framework)
    if case.framework == "numpy":
        return _apply_layout(case, bits.view(entry.numpy_dtype), rows, cols, ops)
    import torch

    # Layout ops run on a same-width integer carrier: float8/float4/complex32 lack kernels.
    carrier = bits.view(np.complex128 if entry.itemsize == 16 else f"<u{entry.itemsize}")
    if entry.itemsize in (2, 4, 8):
        carrier = carrier.view(f"<i{entry.itemsize}")  # torch's stack/cat lack some uints
    base = torch.from_numpy(carrier).to(device)
    return _apply_layout(case, base, rows, cols, ops).view(_dtypes.torch_dtype(entry))


def resolve_device(requested: str) -> str:
    """``cpu`` or ``cuda`` for a requested ``auto|cpu|cuda``.

    Raises
    ------
    ConfigError
        When ``cuda`` is requested and torch cannot see a CUDA device.
    """
    if requested == "cpu":
        return "cpu"
    try:
        import torch

        available = bool(torch.cuda.is_available())
    except ImportError:
        available = False
    if available:
        return "cuda"
    if requested == "cuda":
        raise ConfigError(
            "DEVICE='cuda' but torch sees no CUDA device (torch missing, CPU-only build, or "
            "no GPU); use DEVICE=auto to fall back to the CPU, or DEVICE=cpu"
        )
    return "cpu"


# --------------------------------------------------------------------------------------------
# Comparison


def _identity(x: Any) -> tuple[str, str]:
    if isinstance(x, np.ndarray):
        return "numpy", _dtypes.from_numpy(x.dtype).name
    if "torch" in sys.modules:
        import torch

        if isinstance(x, torch.Tensor):
            return "torch", _dtypes.from_torch(x.dtype).name
    raise UnsupportedTensorError(f"expected a tensor, got {type(x).__name__}")


def _host_bits(x: Any) -> np.ndarray:
    """The bits of ``x`` as a numpy array of the same shape and strides (host memory)."""
    if isinstance(x, np.ndarray):
        return x
    from ..codec import _torch

    return _torch.to_numpy_bits(x.cpu())[0]


def _element_strides(bits: np.ndarray) -> list[int]:
    return [s // bits.itemsize for s in bits.strides]


def describe_mismatch(expected: Any, received: Any) -> str | None:
    """How ``received`` differs from ``expected`` after a trip through arrow_tensor, or None.

    Checks, in order: framework and dtype, shape, layout class (the strides the wire format
    promises: the source's own for dense layouts, the closest dense order otherwise) and
    every byte.
    """
    try:
        got = _identity(received)
    except ArrowTensorError as exc:
        return f"type: {exc}"
    want = _identity(expected)
    if got != want:
        return f"dtype: expected {want[0]} {want[1]}, received {got[0]} {got[1]}"
    e_bits, r_bits = _host_bits(expected), _host_bits(received)
    if e_bits.shape != r_bits.shape:
        return f"shape: expected {list(e_bits.shape)}, received {list(r_bits.shape)}"
    if e_bits.size:
        want_strides = _layout.dense_strides(e_bits.shape, plan(e_bits).header.perm)
        got_strides = _element_strides(r_bits)
        real = [i for i, n in enumerate(e_bits.shape) if n > 1]
        if [want_strides[i] for i in real] != [got_strides[i] for i in real]:
            return f"layout: expected strides {want_strides}, received {got_strides}"
    e_raw = np.ascontiguousarray(e_bits).reshape(-1).view(np.uint8)
    r_raw = np.ascontiguousarray(r_bits).reshape(-1).view(np.uint8)
    if not np.array_equal(e_raw, r_raw):
        wrong = np.flatnonzero(e_raw != r_raw)
        return (
            f"bytes: {wrong.size} of {e_raw.size} bytes differ, first at byte {wrong[0]} "
            f"(expected 0x{e_raw[wrong[0]]:02x}, received 0x{r_raw[wrong[0]]:02x})"
        )
    return None
