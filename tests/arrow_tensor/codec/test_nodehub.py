"""The node-hub conventions: foreign images and arrays in, image keys out (codec._nodehub)."""

from __future__ import annotations

import sys
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
from arrow_tensor.codec import _nodehub
from hypothesis import given
from hypothesis import strategies as st

RNG = np.random.default_rng(7)
H, W = 6, 10


def image_meta(encoding: str, width: int = W, height: int = H, **extra: Any) -> dict[str, Any]:
    """What opencv-video-capture sends beside a frame."""
    return {"encoding": encoding, "width": width, "height": height, "primitive": "image", **extra}


@pytest.mark.parametrize(
    ("encoding", "channels", "dtype"),
    [
        ("bgr8", 3, np.uint8),
        ("rgb8", 3, np.uint8),
        ("bgra8", 4, np.uint8),
        ("rgba8", 4, np.uint8),
        ("mono8", None, np.uint8),
        ("mono16", None, np.uint16),
        ("rgb16", 3, np.uint16),
    ],
)
def test_raw_images_become_zero_copy_read_only_views(
    encoding: str, channels: int | None, dtype: type
) -> None:
    shape = (H, W) if channels is None else (H, W, channels)
    frame = RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    array = pa.array(frame.ravel())  # exactly what the node-hub camera sends
    value, fallback = _nodehub.decode_foreign(array, image_meta(encoding))
    assert fallback is None
    assert value.shape == shape
    assert value.dtype == dtype
    assert np.array_equal(value, frame)  # the sender's channel order, untouched
    assert not value.flags.writeable
    assert np.shares_memory(value, np.frombuffer(array.buffers()[1], np.uint8))
    copy, _ = _nodehub.decode_foreign(array, image_meta(encoding), writable=True)
    assert copy.flags.writeable
    assert np.array_equal(copy, frame)


def test_a_uint16_image_may_arrive_as_its_bytes() -> None:
    frame = RNG.integers(0, 65535, (H, W), dtype=np.uint16)
    value, _ = _nodehub.decode_foreign(pa.array(frame.view(np.uint8).ravel()), image_meta("mono16"))
    assert np.array_equal(value, frame)


def test_a_sliced_frame_is_read_from_its_offset() -> None:
    frame = RNG.integers(0, 255, (H, W, 3), dtype=np.uint8)
    array = pa.array(np.concatenate([np.zeros(5, np.uint8), frame.ravel()]))[5:]
    value, _ = _nodehub.decode_foreign(array, image_meta("bgr8"))
    assert np.array_equal(value, frame)


@pytest.mark.parametrize(
    ("meta", "array", "error", "fragment"),
    [
        (image_meta("bgr8"), pa.array(np.zeros(H * W * 3 - 1, np.uint8)), at.PayloadError, "need"),
        (image_meta("mono8"), pa.array([1, None] * 30, pa.uint8()), at.PayloadError, "nulls"),
        (image_meta("bgr8", width=0), pa.array([], pa.uint8()), at.MetadataError, "in 1..65536"),
        (image_meta("bgr8", width=1 << 20), pa.array([], pa.uint8()), at.MetadataError, "in 1.."),
        (image_meta("bgr8", width=True), pa.array([], pa.uint8()), at.MetadataError, "must be int"),
        (image_meta("bgr8", width="10"), pa.array([], pa.uint8()), at.MetadataError, "must be int"),
        ({"encoding": "bgr8", "width": W}, pa.array([], pa.uint8()), at.MetadataError, "height"),
        (image_meta("bgr8"), pa.array(["x"] * (H * W * 3)), at.PayloadError, "got type string"),
    ],
    ids=["short", "nulls", "zero-width", "huge", "bool", "str", "no-height", "strings"],
)
def test_malformed_images_are_refused_with_a_reason(
    meta: dict[str, Any], array: pa.Array, error: type, fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        _nodehub.decode_foreign(array, meta)


def test_plain_numeric_arrays_become_1d_views_and_the_rest_stays_arrow() -> None:
    floats = pa.array(np.linspace(0, 1, 7, dtype=np.float32))
    value, fallback = _nodehub.decode_foreign(floats, {})
    assert fallback is None
    assert value.dtype == np.float32
    assert np.array_equal(value, floats.to_numpy())
    assert not value.flags.writeable
    for other in (
        pa.array(["a", "b"]),
        pa.array([1, None, 3]),
        pa.array([True, False]),
        pa.array([{"x": 1}]),
    ):
        assert _nodehub.decode_foreign(other, {"primitive": "text"})[0] is other


def test_an_encoding_key_without_image_size_is_not_an_image() -> None:
    value, fallback = _nodehub.decode_foreign(pa.array([1, 2], pa.int16()), {"encoding": "utf-8"})
    assert value.tolist() == [1, 2]
    assert fallback is None


def test_unknown_encodings_arrive_as_their_bytes_with_a_reason() -> None:
    array = pa.array(np.arange(12, dtype=np.uint8))
    value, fallback = _nodehub.decode_foreign(array, image_meta("nv12"))
    assert value.tolist() == list(range(12))
    assert fallback is not None
    assert "nv12" in fallback.text


@given(st.sampled_from(["yuv420", "jpeg", "png"]))
def test_without_opencv_encoded_frames_arrive_as_bytes_saying_what_to_install(
    encoding: str,
) -> None:
    # OpenCV absent, as on a machine without the extra: `import cv2` raises ImportError.
    sys.modules["cv2"], saved = None, sys.modules.get("cv2")  # type: ignore[assignment]
    _nodehub.opencv.cache_clear()
    try:
        array = pa.array(np.arange(H * W * 3 // 2, dtype=np.uint8))
        value, fallback = _nodehub.decode_foreign(array, image_meta(encoding))
    finally:
        sys.modules.pop("cv2")
        if saved is not None:
            sys.modules["cv2"] = saved
        _nodehub.opencv.cache_clear()
    assert np.array_equal(value, np.arange(H * W * 3 // 2, dtype=np.uint8))
    assert fallback is not None
    assert fallback.reason == f"no OpenCV for {encoding}"
    assert "opencv-python-headless" in fallback.text


class TestWithOpenCV:
    cv2 = pytest.importorskip("cv2")
    frame = RNG.integers(0, 255, (H * 4, W * 4, 3), dtype=np.uint8)

    def test_yuv420_is_opencvs_own_conversion(self) -> None:
        cv2 = self.cv2
        yuv = cv2.cvtColor(self.frame, cv2.COLOR_BGR2YUV_I420)
        meta = image_meta("yuv420", W * 4, H * 4)
        value, fallback = _nodehub.decode_foreign(pa.array(yuv.ravel()), meta)
        assert fallback is None
        assert np.array_equal(value, cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR_I420))
        with pytest.raises(at.MetadataError, match="even"):
            _nodehub.decode_foreign(pa.array(yuv.ravel()), image_meta("yuv420", 5, 4))

    @pytest.mark.parametrize("encoding", ["jpeg", "png", "bmp"])
    def test_compressed_frames_are_opencvs_decode(self, encoding: str) -> None:
        cv2 = self.cv2
        ok, data = cv2.imencode("." + encoding, self.frame)
        assert ok
        meta = image_meta(encoding, W * 4, H * 4)
        value, fallback = _nodehub.decode_foreign(pa.array(data.ravel()), meta)
        assert fallback is None
        assert np.array_equal(value, cv2.imdecode(data, cv2.IMREAD_UNCHANGED))
        assert _nodehub.declared_size(data.ravel(), encoding) == (W * 4, H * 4)

    @pytest.mark.parametrize("encoding", ["jpeg", "png", "bmp"])
    def test_a_frame_bigger_than_its_metadata_is_refused_before_decoding(
        self, encoding: str
    ) -> None:
        _, data = self.cv2.imencode("." + encoding, self.frame)
        with pytest.raises(at.PayloadError, match="declares 40 x 24 pixels"):
            _nodehub.decode_foreign(pa.array(data.ravel()), image_meta(encoding, 4, 4))

    def test_garbage_is_refused(self) -> None:
        with pytest.raises(at.PayloadError, match="cannot decode"):
            _nodehub.decode_foreign(pa.array(np.arange(50, dtype=np.uint8)), image_meta("jpeg"))
        with pytest.raises(at.PayloadError, match="cannot decode"):
            _nodehub.decode_foreign(pa.array([], pa.uint8()), image_meta("png"))


@pytest.mark.parametrize(
    ("shape", "dtype", "expected"),
    [
        ((4, 5, 3), "uint8", "rgb8"),
        ((4, 5, 4), "uint8", "rgba8"),
        ((4, 5), "uint8", "mono8"),
        ((4, 5), "uint16", "mono16"),
        ((4, 5, 3), "uint16", "rgb16"),
        ((4, 5, 2), "uint8", None),
        ((4, 5, 3), "float32", None),
        ((3, 4, 5, 3), "uint8", None),
        ((5,), "uint8", None),
        ((0, 5), "uint8", None),
    ],
)
def test_image_keys_of_image_shaped_tensors(
    shape: tuple[int, ...], dtype: str, expected: str | None
) -> None:
    keys = _nodehub.image_keys(shape, dtype)
    if expected is None:
        assert keys == {}
    else:
        assert keys == {
            "encoding": expected,
            "width": shape[1],
            "height": shape[0],
            "primitive": "image",
        }


@given(
    st.sampled_from(sorted(_nodehub.RAW_IMAGES)),
    st.integers(1, 12),
    st.integers(1, 12),
)
def test_image_keys_and_foreign_decode_agree(encoding: str, height: int, width: int) -> None:
    """Whatever a plain output says an image is, the foreign decoder reads it back."""
    channels, dtype = _nodehub.RAW_IMAGES[encoding]
    shape = (height, width) if channels is None else (height, width, channels)
    frame = np.arange(np.prod(shape), dtype=dtype).reshape(shape)
    keys = _nodehub.image_keys(shape, dtype)
    assert keys["width"] == width
    value, _ = _nodehub.decode_foreign(pa.array(frame.ravel()), {**keys, "encoding": encoding})
    assert np.array_equal(value, frame)
