"""dora's node-hub conventions, both ways: foreign messages in, image keys out.

Note [Foreign messages]
A message without a single ``at.`` key was written by a node that does not use this library,
typically one of dora's node-hub packages. ``decode_foreign`` gives what its sender meant,
by the node-hub conventions (SPEC.md, "Messages from other nodes"):

- an *image*: metadata ``encoding`` with int ``width`` and ``height``. The raw encodings
  (``RAW_IMAGES``) become a read-only zero-copy ``(H, W, C)`` numpy view in the sender's
  channel order, ``(H, W)`` for mono; ``yuv420`` (I420) and the compressed encodings
  (``ENCODED_IMAGES``) are decoded with OpenCV when it is installed, to OpenCV's BGR order
  (the order node-hub cameras encode from), and otherwise arrive as their bytes with a
  ``Fallback`` saying what to install;
- a *plain numeric array* (fixed-width integers or floats, no nulls): a read-only 1-D numpy
  view;
- anything else (strings, structs, lists, nulls): the ``pyarrow`` array as received.

Malformed images (a size that does not match ``width`` x ``height``, nulls, a compressed
frame that declares more pixels than its metadata) raise a typed error: a wrong picture is
never delivered, and no allocation is sized by unchecked bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .._errors import MetadataError, PayloadError
from . import _schema
from ._tensor import read_payload

RAW_IMAGES: dict[str, tuple[int | None, str]] = {
    "bgr8": (3, "uint8"),
    "rgb8": (3, "uint8"),
    "bgra8": (4, "uint8"),
    "rgba8": (4, "uint8"),
    "mono8": (None, "uint8"),
    "mono16": (None, "uint16"),
    "rgb16": (3, "uint16"),
    "rgba16": (4, "uint16"),
}
"""Uncompressed encodings: channels (None: a single-plane ``(H, W)`` image) and element type."""
YUV_IMAGES = ("yuv420",)
"""Planar YUV 4:2:0 (I420): ``H * W * 3 / 2`` bytes."""
ENCODED_IMAGES = ("jpeg", "jpg", "jpe", "png", "bmp", "webp")
"""Compressed image files (OpenCV's ``imdecode``)."""
MAX_SIDE = 1 << 16
"""Largest ``width`` or ``height`` accepted (what image formats themselves allow)."""
OPENCV_HINT = "pip install 'arrow-tensor[opencv]' (or opencv-python-headless)"


@dataclass(frozen=True)
class Fallback:
    """A foreign message delivered other than its convention promised, and why."""

    reason: str
    """A short key, the same for every message that falls back the same way."""
    text: str
    """The sentence to show the user (once)."""


def is_foreign(meta: object) -> bool:
    """True for metadata without any ``at.`` key (a message some other node wrote)."""
    if not isinstance(meta, Mapping):
        return False
    prefix = _schema.PREFIX
    return not any(isinstance(k, str) and k.startswith(prefix) for k in meta)


def decode_foreign(
    array: Any, meta: Mapping[str, Any], writable: bool = False
) -> tuple[Any, Fallback | None]:
    """The value a foreign message means (Note [Foreign messages]), and any fallback taken.

    Raises
    ------
    MetadataError, PayloadError
        For an image whose metadata or bytes do not agree; the message says how.
    """
    encoding = meta.get("encoding")
    if isinstance(encoding, str) and ("width" in meta or "height" in meta):
        return _image(array, meta, encoding.lower(), writable)
    return _plain(array, writable), None


def _plain(array: Any, writable: bool) -> Any:
    """A 1-D numpy view of a fixed-width numeric array without nulls, else the array."""
    if not isinstance(array, pa.Array):
        return array
    t = array.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)) or array.null_count:
        return array
    flat = array.to_numpy(zero_copy_only=True)
    return flat.copy() if writable else flat


def _side(meta: Mapping[str, Any], key: str) -> int:
    value = _schema.require(meta, key, int)
    if not 1 <= value <= MAX_SIDE:
        raise MetadataError(f"image {key!r} must be in 1..{MAX_SIDE}, got {value}")
    return value


def _image(
    array: Any, meta: Mapping[str, Any], encoding: str, writable: bool
) -> tuple[Any, Fallback | None]:
    width, height = _side(meta, "width"), _side(meta, "height")
    what = f"{encoding} image"
    size = f"width {width} x height {height}"
    if encoding in RAW_IMAGES:
        channels, dtype = RAW_IMAGES[encoding]
        shape = (height, width) if channels is None else (height, width, channels)
        itemsize = np.dtype(dtype).itemsize
        nbytes = width * height * (channels or 1) * itemsize
        buf = read_payload(array, nbytes, what, f"{size} need")
        view = np.frombuffer(buf, np.dtype(dtype).newbyteorder("<")).reshape(shape)
        if writable:
            return view.copy(), None
        view.flags.writeable = False  # the read-only contract: the sample is shared
        return view, None
    if encoding not in YUV_IMAGES and encoding not in ENCODED_IMAGES:
        known = sorted((*RAW_IMAGES, *YUV_IMAGES, *ENCODED_IMAGES))
        return _plain(array, writable), Fallback(
            f"encoding {encoding[:20]}",
            f"image encoding {encoding[:40]!r} is not one arrow_tensor decodes ({known}); "
            f"its frames arrive as their bytes",
        )
    cv2 = opencv()
    if cv2 is None:
        return _plain(array, writable), Fallback(
            f"no OpenCV for {encoding}",
            f"{encoding} frames arrive as their encoded bytes (a 1-D uint8 array): "
            f"OpenCV decodes them, {OPENCV_HINT}",
        )
    if encoding in YUV_IMAGES:
        if width % 2 or height % 2:
            raise MetadataError(f"a yuv420 image needs an even {size}")
        buf = read_payload(array, width * height * 3 // 2, what, f"{size} need")
        planes = np.frombuffer(buf, np.uint8).reshape(height * 3 // 2, width)
        return cv2.cvtColor(planes, cv2.COLOR_YUV2BGR_I420), None
    buf = read_payload(array, None, what)
    data = np.frombuffer(buf, np.uint8)
    declared = declared_size(data, encoding)
    if declared is not None and declared != (width, height):
        raise PayloadError(
            f"the {encoding} frame declares {declared[0]} x {declared[1]} pixels, "
            f"its metadata {size}"
        )
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise PayloadError(f"OpenCV cannot decode this {len(data)}-byte {encoding} frame")
    if image.shape[:2] != (height, width):
        raise PayloadError(
            f"the {encoding} frame decodes to {image.shape[1]} x {image.shape[0]} pixels, "
            f"its metadata says {size}"
        )
    return image, None


def declared_size(data: np.ndarray, encoding: str) -> tuple[int, int] | None:
    """(width, height) a PNG, JPEG or BMP file's header declares; None where unknown.

    Read before decoding so that no frame allocates more than its metadata announced.
    """
    raw = data[: 1 << 16].tobytes()
    if encoding == "png":
        if len(raw) >= 24 and raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR":
            return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
        return None
    if encoding == "bmp":
        if len(raw) >= 26 and raw[:2] == b"BM":
            w = int.from_bytes(raw[18:22], "little", signed=True)
            h = int.from_bytes(raw[22:26], "little", signed=True)
            return abs(w), abs(h)
        return None
    if encoding in ("jpeg", "jpg", "jpe"):
        return _jpeg_size(raw)
    return None


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(raw: bytes) -> tuple[int, int] | None:
    """The frame size in a JPEG's start-of-frame segment (within the first 64 KiB)."""
    if raw[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(raw):
        if raw[i] != 0xFF:
            return None
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(raw[i + 2 : i + 4], "big")
        if marker in _SOF_MARKERS:
            height = int.from_bytes(raw[i + 5 : i + 7], "big")
            width = int.from_bytes(raw[i + 7 : i + 9], "big")
            return width, height
        if length < 2:
            return None
        i += 2 + length
    return None


IMAGE_ENCODINGS = {
    (3, "uint8"): "rgb8",
    (4, "uint8"): "rgba8",
    (None, "uint8"): "mono8",
    (None, "uint16"): "mono16",
    (3, "uint16"): "rgb16",
    (4, "uint16"): "rgba16",
}
"""The ``encoding`` a plain output gives an image-shaped tensor, by channels and dtype."""


def image_keys(shape: tuple[int, ...], dtype: str, encoding: object = None) -> dict[str, Any]:
    """The node-hub image keys for a tensor of ``shape`` and wire ``dtype``, or {}.

    ``(H, W, 3|4)`` and ``(H, W)`` uint8/uint16 tensors are images to node-hub consumers
    (opencv-plot, dora-rerun): ``encoding``, ``width``, ``height`` and ``primitive:
    "image"``. RGB order is assumed; a sender of BGR frames says so with its own
    ``encoding`` (passed here), which wins. The size always comes from the shape, never
    from keys forwarded with the tensor (a crop keeps its camera's metadata).
    """
    if len(shape) == 3:
        channels: int | None = shape[2]
    elif len(shape) == 2:
        channels = None
    else:
        return {}
    derived = IMAGE_ENCODINGS.get((channels, dtype))
    if derived is None or not (1 <= shape[0] <= MAX_SIDE and 1 <= shape[1] <= MAX_SIDE):
        return {}
    chosen = encoding if isinstance(encoding, str) else derived
    return {"encoding": chosen, "width": shape[1], "height": shape[0], "primitive": "image"}


@functools.cache
def opencv() -> Any | None:
    """The ``cv2`` module if OpenCV is installed (imported on first use), else None."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2
