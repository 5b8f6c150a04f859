"""Micro-batching: stack items into one batch and split a model's batched output per item.

Note [Batches and their items]
``stack`` turns B items into one value: tensors are stacked along a new leading dimension,
dicts are stacked key by key, and every other leaf (scalars, str, None, lists, tuples) is
gathered into a list of length B. ``split`` is its inverse on a *model's* output: a tensor
gives row ``i``, a dict and a tuple are split member by member (a model returning
``{"boxes", "scores", "labels"}`` or a tuple of batched tensors), a list must have length B
and gives element ``i`` (one result per image, as torchvision detectors return), and a
scalar is the same for every item. Per-item metadata never enters the tensors: it travels
beside the batch in dora metadata (``batch_items``, a JSON list of each item's own metadata,
in order), which a model node forwards untouched, so the unbatcher gives every item back
exactly the metadata it came with.

Items of different shapes: with ``shapes="split"`` (the default) a batch only ever holds
items of one signature (structure, framework, dtype, shape); an item that differs closes
the pending batch and starts the next one. ``"pad"`` zero-pads tensors at the end of each
dimension to the largest item and records every item's original shape in ``batch_shapes``
(JSON ``{path: [shape, ...]}``): the model masks with ``index < shape``. ``"error"``
rejects the differing item.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._errors import BatchError

__all__ = [
    "KEY_INDEX",
    "KEY_ITEMS",
    "KEY_SEQ",
    "KEY_SHAPES",
    "KEY_SIZE",
    "POLICIES",
    "batch_metadata",
    "item_metadata",
    "signature",
    "split",
    "stack",
]

KEY_ITEMS = "batch_items"
KEY_SEQ = "batch_seq"
KEY_SIZE = "batch_size"
KEY_INDEX = "batch_index"
KEY_SHAPES = "batch_shapes"
POLICIES = ("split", "pad", "error")


def _is_torch(x: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_tensor(x: object) -> bool:
    return isinstance(x, np.ndarray) or _is_torch(x)


def signature(x: Any, with_shapes: bool = True) -> Any:
    """What must match for items to share a batch: structure, framework, dtype (and shape)."""
    if _is_tensor(x):
        shape = tuple(x.shape) if with_shapes else len(x.shape)
        return ("tensor", "torch" if _is_torch(x) else "numpy", str(x.dtype), shape)
    if isinstance(x, dict):
        return ("dict", tuple((k, signature(v, with_shapes)) for k, v in x.items()))
    return ("gathered",)


def stack(items: Sequence[Any], pad: bool = False) -> tuple[Any, dict[str, list[list[int]]]]:
    """Stack ``items`` into one batched value (see Note [Batches and their items]).

    Returns
    -------
    (batched, shapes)
        ``shapes`` maps the path of every padded tensor to the original shape of each item
        (empty when nothing was padded).

    Raises
    ------
    BatchError
        When items differ in structure, framework or dtype, or in shape without ``pad``.
    """
    if not items:
        raise BatchError("cannot stack an empty batch")
    shapes: dict[str, list[list[int]]] = {}
    return _stack(list(items), "value", pad, shapes), shapes


def _stack(items: list[Any], path: str, pad: bool, shapes: dict[str, list[list[int]]]) -> Any:
    first = items[0]
    if _is_tensor(first):
        kinds = {signature(x, with_shapes=False) for x in items}
        if len(kinds) != 1:
            raise BatchError(
                f"{path}: items differ in framework, dtype or rank: {sorted(map(str, kinds))}"
            )
        item_shapes = [tuple(x.shape) for x in items]
        if len(set(item_shapes)) > 1:
            if not pad:
                raise BatchError(
                    f"{path}: items have different shapes {sorted(set(item_shapes))}; batch "
                    f"them with shapes='split' or 'pad'"
                )
            shapes[path] = [list(s) for s in item_shapes]
            items = _padded(items, item_shapes)
        if _is_torch(first):
            import torch

            return torch.stack(items)
        return np.stack(items)
    if isinstance(first, dict):
        keys = list(first)
        for x in items:
            if not isinstance(x, dict) or list(x) != keys:
                raise BatchError(
                    f"{path}: items must be dicts with the same keys in the same order as the "
                    f"first item {keys[:10]}, got {type(x).__name__}"
                    f" {list(x)[:10] if isinstance(x, dict) else ''}"
                )
        return {
            k: _stack([x[k] for x in items], f"{path}[{json.dumps(k)}]", pad, shapes) for k in keys
        }
    return list(items)


def _padded(items: list[Any], item_shapes: list[tuple[int, ...]]) -> list[Any]:
    target = tuple(max(dims) for dims in zip(*item_shapes, strict=True))
    out = []
    for x, shape in zip(items, item_shapes, strict=True):
        if shape == target:
            out.append(x)
            continue
        if _is_torch(x):
            import torch

            z = torch.zeros(target, dtype=x.dtype)
        else:
            z = np.zeros(target, dtype=x.dtype)
        z[tuple(slice(0, n) for n in shape)] = x
        out.append(z)
    return out


def split(batched: Any, size: int, path: str = "value") -> list[Any]:
    """Split a batched value into ``size`` per-item values (see Note [Batches and their items]).

    Raises
    ------
    BatchError
        When a tensor's leading dimension or a list's length is not ``size``.
    """
    if _is_tensor(batched):
        if len(batched.shape) == 0 or batched.shape[0] != size:
            raise BatchError(
                f"{path}: expected a leading batch dimension of {size}, got shape "
                f"{list(batched.shape)}"
            )
        return [batched[i, ...] for i in range(size)]  # numpy: 0-d arrays, not scalars
    if isinstance(batched, dict):
        parts = {k: split(v, size, f"{path}[{json.dumps(k)}]") for k, v in batched.items()}
        return [{k: parts[k][i] for k in batched} for i in range(size)]
    if isinstance(batched, tuple):
        members = [split(v, size, f"{path}[{j}]") for j, v in enumerate(batched)]
        return [tuple(m[i] for m in members) for i in range(size)]
    if isinstance(batched, list):
        if len(batched) != size:
            raise BatchError(
                f"{path}: a list in a batched output must hold one entry per item ({size}), "
                f"got {len(batched)}; return a tuple for a fixed number of batched outputs"
            )
        return list(batched)
    return [batched] * size


def batch_metadata(
    metadata: Sequence[Mapping[str, Any]],
    seqs: Sequence[int],
    index: int,
    shapes: Mapping[str, list[list[int]]],
) -> dict[str, Any]:
    """The dora metadata carried beside a batch: every item's own metadata, in order."""
    meta: dict[str, Any] = {
        KEY_SIZE: len(metadata),
        KEY_INDEX: index,
        KEY_SEQ: list(seqs),
        KEY_ITEMS: json.dumps([dict(m) for m in metadata], default=str),
    }
    if shapes:
        meta[KEY_SHAPES] = json.dumps(shapes)
    return meta


def item_metadata(metadata: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each item's own metadata, from the metadata of a batch (or of a model's output)."""
    raw = metadata.get(KEY_ITEMS)
    if not isinstance(raw, str):
        raise BatchError(
            f"metadata has no {KEY_ITEMS!r} JSON string (got {type(raw).__name__}); the model "
            f"node between batcher and unbatcher must forward its input's metadata"
        )
    try:
        items = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BatchError(f"{KEY_ITEMS!r} is not valid JSON: {str(exc)[:80]}") from exc
    if not isinstance(items, list) or not all(isinstance(m, dict) for m in items):
        raise BatchError(f"{KEY_ITEMS!r} must be a JSON list of objects, got {raw[:80]!r}")
    if not items:
        raise BatchError(f"{KEY_ITEMS!r} is empty; a batch holds at least one item")
    return items
