"""Plain values: what node-hub nodes send and read, exact both ways (codec._plain)."""

from __future__ import annotations

from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
from arrow_tensor.codec import _plain
from hypothesis import given
from hypothesis import strategies as st

PLAIN_CASES: list[tuple[Any, pa.DataType, list[Any]]] = [
    ("hello, dora", pa.string(), ["hello, dora"]),
    ("", pa.string(), [""]),
    ("snow \u2603 \U0001f600", pa.string(), ["snow \u2603 \U0001f600"]),
    (b"\x00\xffjpeg", pa.uint8(), [0, 255, 106, 112, 101, 103]),
    (b"", pa.uint8(), []),
    ([1, 2, -3], pa.int64(), [1, 2, -3]),
    ([(1 << 63) - 1, -(1 << 63)], pa.int64(), [(1 << 63) - 1, -(1 << 63)]),
    ([0.5, float("inf"), -0.0], pa.float64(), [0.5, float("inf"), -0.0]),
    (["a", "bc"], pa.string(), ["a", "bc"]),
]


@pytest.mark.parametrize(("value", "arrow_type", "as_arrow"), PLAIN_CASES)
def test_plain_values_travel_as_the_array_node_hub_nodes_read(
    value: Any, arrow_type: pa.DataType, as_arrow: list[Any]
) -> None:
    array, meta = at.encode(value)
    assert array.type == arrow_type
    assert array.to_pylist() == as_arrow  # what a node without arrow_tensor sees
    assert meta["at.kind"] == "plain"
    back = at.decode(array, meta)
    assert type(back) is type(value)
    assert back == value


def test_arrow_arrays_go_as_they_are_and_come_back_as_arrays() -> None:
    boxes = pa.array([{"bbox": [1.0, 2.0, 3.0, 4.0], "conf": 0.9, "labels": "cat"}])
    for array in (boxes, pa.array([1, None, 3]), pa.array(range(10))[3:7]):
        sent, meta = at.encode(array)
        assert sent is array
        back = at.decode(sent, meta)
        assert back.equals(array)


@pytest.mark.parametrize(
    "value",
    [
        [],  # no element type to choose
        [1, 2.5],  # an int would come back as a float
        [True, False],  # bools stay bools in a structure
        [1, "a"],
        [[1], [2]],
        [1 << 70],  # past int64
        (1, 2),  # tuples stay tuples
        [np.float32(1)],
    ],
)
def test_other_lists_stay_structures_that_keep_each_elements_type(value: Any) -> None:
    assert _plain.plain_form(value) is None
    try:
        array, meta = at.encode(value)
    except at.UnsupportedTensorError:  # not a structure either (a numpy scalar leaf)
        return
    assert meta["at.kind"] == "tree"
    back = at.decode(array, meta)
    assert back == value
    assert [type(v) for v in back] == [type(v) for v in value]


@given(
    st.one_of(
        st.lists(st.integers(-(1 << 63), (1 << 63) - 1), min_size=1),
        st.lists(st.floats(allow_nan=False), min_size=1),
        st.lists(st.text(), min_size=1),
        st.text(),
        st.binary(),
    )
)
def test_plain_round_trip_property(value: Any) -> None:
    array, meta = at.encode(value, checksum=True)
    back = at.decode(array, meta, verify=True)
    assert type(back) is type(value)
    assert back == value
    # What dora delivers is an equal array rebuilt on the far side.
    rebuilt = pa.array(array.to_pylist(), array.type)
    assert at.decode(rebuilt, meta, verify=True) == value


def test_a_changed_plain_value_fails_its_checksum() -> None:
    array, meta = at.encode(["a", "b"], checksum=True)
    with pytest.raises(at.ChecksumError, match="mismatch"):
        at.decode(pa.array(["a", "c"]), meta, verify=True)
    array, meta = at.encode(pa.array([1.0, 2.0]), checksum=True)
    assert at.decode(array, meta, verify=True).equals(array)
    with pytest.raises(at.ChecksumError, match="mismatch"):
        at.decode(pa.array([1.0, 2.5]), meta, verify=True)


@pytest.mark.parametrize(
    ("array", "form", "error", "fragment"),
    [
        (pa.array(["a", "b"]), "str", at.PayloadError, "one string, got 2 values"),
        (pa.array([1]), "str", at.PayloadError, "one string"),
        (pa.array(["a", None]), "list", at.PayloadError, "without nulls"),
        (pa.array([1.0]), "bytes", at.PayloadError, "uint8 values, got double"),
        (pa.array([True]), "list", at.PayloadError, "int64, double or string"),
        (pa.array([], pa.int64()), "list", at.PayloadError, "got 0 of int64"),
        (pa.array([1]), "pickle", at.MetadataError, "must be one of"),
        (np.zeros(3), "arrow", at.PayloadError, "arrives as a pyarrow.Array"),
    ],
)
def test_malformed_plain_messages_are_refused(
    array: Any, form: str, error: type, fragment: str
) -> None:
    meta = {"at.version": 2, "at.kind": "plain", "at.plain": form}
    with pytest.raises(error, match=fragment):
        at.decode(array, meta)


def test_a_plain_message_without_its_form_is_refused() -> None:
    with pytest.raises(at.MetadataError, match=r"lacks 'at\.plain'"):
        at.decode(pa.array(["x"]), {"at.version": 2, "at.kind": "plain"})


def test_numpy_bytes_views_are_not_bytes() -> None:
    with pytest.raises(at.UnsupportedTensorError, match="send bytes"):
        at.encode(bytearray(b"ab"))
    array, _ = at.encode(np.frombuffer(b"ab", np.uint8))
    assert array.to_pylist() == [97, 98]
