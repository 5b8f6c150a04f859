"""Hostile and malformed input: the exact error type, and a message naming what was received.

Never a crash of another type, a view outside the buffer, a huge allocation or a silently
wrong tensor.
"""

from __future__ import annotations

import re
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
import torch
from arrow_tensor.codec import _schema
from lookalikes import Spoof


@pytest.fixture
def message() -> tuple[pa.Array, dict[str, Any]]:
    """A valid float32 [3, 4] numpy message (48 bytes): at.tensor 'numpy;float32;3,4;0,1'."""
    return at.encode(np.arange(12, dtype=np.float32).reshape(3, 4))


def _with(meta: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(meta)
    for key, value in changes.items():
        key = "at." + key
        if value is _DROP:
            del out[key]
        else:
            out[key] = value
    return out


_DROP = object()


def _text(
    shape: Any = (3, 4), perm: Any = (0, 1), dtype: Any = "float32", framework: Any = "numpy"
):
    """The message's at.tensor with some fields replaced (unvalidated: hostile on purpose)."""
    return _schema.pack(framework, dtype, shape, perm)


def _refused(text: str, detail: str) -> str:
    """The start of the MetadataError parse_text raises for ``text``: it names the header."""
    return f"'at.tensor' {text[:160]!r}: {detail}"


def _bad_shape(text: str) -> tuple[str, str]:
    """A case: ``text``, whose shape field is not canonical decimals, and its whole refusal."""
    return text, _not_dims(text, "the shape", text.split(";")[2])


def _bad_perm(text: str) -> tuple[str, str]:
    """A case: ``text``, whose perm field is not canonical decimals, and its whole refusal."""
    return text, _not_dims(text, "the perm", text.split(";")[3])


def _not_dims(text: str, name: str, field: str) -> str:
    """The whole message refusing a shape or perm field that is not canonical decimals."""
    return _refused(
        text,
        f"{name} must be decimal integers separated by ',' (at most 19 digits each; no signs, "
        f"spaces or leading zeros), got {field!r}",
    )


def _bad_framework(text: str, got: str) -> str:
    """The whole message refusing a framework field."""
    frameworks = "('numpy', 'torch', 'cupy', 'pyarrow.cuda')"
    return _refused(text, f"the framework must be one of {frameworks}, got {got!r}")


def _field_count(text: str, kind: str = "str") -> str:
    """The whole message refusing a header that does not have exactly 4 fields."""
    return (
        "'at.tensor' must be '<framework>;<dtype>;<shape>;<perm>' (4 fields separated by ';'), "
        f"got {len(text.split(';'))} field(s) in {kind} {text!r}"
    )


def test_every_error_is_an_arrow_tensor_value_error() -> None:
    for cls in (
        at.ChecksumError,
        at.MetadataError,
        at.NotATensorMessageError,
        at.PayloadError,
        at.UnsupportedTensorError,
        at.VersionError,
    ):
        assert issubclass(cls, at.ArrowTensorError)
    assert issubclass(at.ArrowTensorError, ValueError)


# --- metadata ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["kind", "tensor"])
def test_missing_key(message, key: str) -> None:
    array, meta = message
    with pytest.raises(at.MetadataError, match=re.escape(f"metadata lacks 'at.{key}'")):
        at.decode(array, _with(meta, **{key: _DROP}))


def test_version_1_keys_do_not_stand_in_for_at_tensor(message) -> None:
    """A version-2 message carrying the version-1 header keys instead of at.tensor."""
    array, meta = message
    old = {"at.framework": "numpy", "at.dtype": "float32", "at.shape": [3, 4], "at.perm": [0, 1]}
    with pytest.raises(at.MetadataError, match=re.escape("metadata lacks 'at.tensor'")):
        at.decode(array, _with(meta, tensor=_DROP) | old)


_JAX = _text(framework="jax")
_NONE = _text(framework="None")
_EMPTY_FRAMEWORK = _text(framework="")


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("version", True, "'at.version' must be int, got bool True"),
        ("version", 2.0, "'at.version' must be int, got float 2.0"),
        ("version", "2", "'at.version' must be int, got str '2'"),
        ("kind", 1, "'at.kind' must be str, got int 1"),
        # framework field (was at.framework)
        ("tensor", _JAX, _refused(_JAX, "the framework must be one of ('numpy', 'torch'")),
        ("tensor", _JAX, "got 'jax'"),
        ("tensor", _NONE, _bad_framework(_NONE, "None")),
        ("tensor", _NONE, "got 'None'"),
        ("tensor", _EMPTY_FRAMEWORK, _bad_framework(_EMPTY_FRAMEWORK, "")),
        ("tensor", None, "'at.tensor' must be str, got NoneType None"),
        # dtype field (was at.dtype)
        ("tensor", _text(dtype=5), "unknown dtype '5'; expected one of bool, uint8"),
        ("tensor", 5, "'at.tensor' must be str, got int 5"),
        # shape field (was at.shape): what a list of non-int spells as text
        (
            "tensor",
            "numpy;float32;[3, 4];0,1",
            _not_dims("numpy;float32;[3, 4];0,1", "the shape", "[3, 4]"),
        ),
        ("tensor", _text((3.0, 4)), _not_dims(_text((3.0, 4)), "the shape", "3.0,4")),
        ("tensor", _text((True, 4)), _not_dims(_text((True, 4)), "the shape", "True,4")),
        (
            "tensor",
            _text((repr(np.int64(3)), 4)),
            _not_dims(_text((repr(np.int64(3)), 4)), "the shape", f"{np.int64(3)!r},4"),
        ),
        ("tensor", _text((12,)), _refused(_text((12,)), "the perm must be a permutation of 0..0")),
        ("tensor", 12, "'at.tensor' must be str, got int 12"),
        # perm field (was at.perm)
        ("tensor", _text(perm=(0, 1.0)), _not_dims(_text(perm=(0, 1.0)), "the perm", "0,1.0")),
        (
            "tensor",
            _text(perm=(False, True)),
            _not_dims(_text(perm=(False, True)), "the perm", "False,True"),
        ),
        # at.tensor itself not a str
        ("tensor", 12.5, "'at.tensor' must be str, got float 12.5"),
        ("tensor", True, "'at.tensor' must be str, got bool True"),
        ("tensor", ["numpy", "float32", [3, 4], [0, 1]], "'at.tensor' must be str, got list ["),
        ("tensor", ("numpy;float32;3,4;0,1",), "'at.tensor' must be str, got tuple ("),
        (
            "tensor",
            b"numpy;float32;3,4;0,1",
            "'at.tensor' must be str, got bytes b'numpy;float32;3,4;0,1'",
        ),
        ("tensor", bytearray(b"numpy;float32;3,4;0,1"), "must be str, got bytearray"),
        ("tensor", {"shape": [3, 4]}, "'at.tensor' must be str, got dict {'shape': [3, 4]}"),
        ("tensor", np.str_("numpy;float32;3,4;0,1"), None),  # a str subclass: decodes
    ],
)
def test_wrong_types(message, key: str, value: Any, fragment: str | None) -> None:
    array, meta = message
    if fragment is None:
        np.testing.assert_array_equal(at.decode(array, _with(meta, **{key: value})), _values())
        return
    with pytest.raises(at.MetadataError, match=re.escape(fragment)):
        at.decode(array, _with(meta, **{key: value}))


def _values() -> np.ndarray:
    """What the message fixture holds."""
    return np.arange(12, dtype=np.float32).reshape(3, 4)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        # exactly 4 fields
        ("numpy;float32;3,4", _field_count("numpy;float32;3,4")),
        ("float32;3,4;0,1", _field_count("float32;3,4;0,1")),
        ("numpy;float32;3,4;0,1;", _field_count("numpy;float32;3,4;0,1;")),
        ("numpy;float32;3,4;0,1;numpy", _field_count("numpy;float32;3,4;0,1;numpy")),
        ("numpy;float;32;3,4;0,1", _field_count("numpy;float;32;3,4;0,1")),
        ("", _field_count("")),
        ("numpy,float32,3,4,0,1", _field_count("numpy,float32,3,4,0,1")),
        ("numpy;float32;3,4;0,1\n;", _field_count("numpy;float32;3,4;0,1\n;")),
        # signs, spaces, other separators: what int() would accept must still be refused
        _bad_shape("numpy;float32;+3,4;0,1"),
        _bad_shape("numpy;float32;3,+4;0,1"),
        _bad_shape("numpy;float32;-3,4;0,1"),
        _bad_perm("numpy;float32;3,4;+0,1"),
        _bad_perm("numpy;float32;3,4;0,-1"),
        _bad_shape("numpy;float32;3, 4;0,1"),
        _bad_shape("numpy;float32; 3,4;0,1"),
        _bad_shape("numpy;float32;3,4 ;0,1"),
        _bad_shape("numpy;float32;3 ,4;0,1"),
        _bad_perm("numpy;float32;3,4;0, 1"),
        _bad_perm("numpy;float32;3,4;0,1 "),
        _bad_shape("numpy;float32;3\t,4;0,1"),
        _bad_shape("numpy;float32;3,4\n;0,1"),
        _bad_perm("numpy;float32;3,4;0,1\n"),
        _bad_shape("numpy;float32;3,4\x00;0,1"),
        _bad_shape("numpy;float32;3.4;0,1"),
        _bad_shape("numpy;float32;3 4;0,1"),
        _bad_shape("numpy;float32;1_2;0"),
        _bad_shape("numpy;float32;0xc;0"),
        _bad_shape("numpy;float32;1.2e1;0"),
        _bad_shape("numpy;float32;12.0;0"),
        _bad_shape("numpy;float32;[3,4];[0,1]"),
        # leading zeros: every header has exactly one spelling
        _bad_shape("numpy;float32;03,4;0,1"),
        _bad_shape("numpy;float32;3,04;0,1"),
        _bad_shape("numpy;float32;00,4;0,1"),
        _bad_perm("numpy;float32;3,4;00,1"),
        _bad_perm("numpy;float32;3,4;0,01"),
        (
            "numpy;float32;0000000000000000003,4;0,1",
            _not_dims("numpy;float32;0000000000000000003,4;0,1", "the shape", "0" * 18 + "3,4"),
        ),
        # empty entries
        _bad_shape("numpy;float32;3,,4;0,1"),
        _bad_shape("numpy;float32;3,4,;0,1"),
        _bad_shape("numpy;float32;,3,4;0,1"),
        _bad_shape("numpy;float32;,;0,1"),
        _bad_perm("numpy;float32;3,4;0,,1"),
        # digits int() reads but ASCII is not: Arabic-Indic, fullwidth, superscript
        _bad_shape("numpy;float32;\u0663,4;0,1"),
        _bad_shape("numpy;float32;\uff13,4;0,1"),
        _bad_shape("numpy;float32;\u00b3,4;0,1"),
        _bad_perm("numpy;float32;3,4;\u0660,1"),
        # at most 19 digits per entry (20 digits exceed int64 anyway)
        (
            "numpy;float32;10000000000000000000;0",
            _not_dims("numpy;float32;10000000000000000000;0", "the shape", "1" + "0" * 19),
        ),
        (
            "numpy;float32;3,4;10000000000000000000,0",
            _not_dims(
                "numpy;float32;3,4;10000000000000000000,0", "the perm", "1" + "0" * 19 + ",0"
            ),
        ),
        (
            "numpy;float32;9999999999999999999;0",
            _refused(
                "numpy;float32;9999999999999999999;0", "the shape [9999999999999999999] spans"
            ),
        ),
        # empty fields: 0-d, whose perm must be empty too
        (
            "numpy;float32;;0",
            _refused("numpy;float32;;0", "the perm must be empty for shape [], got [0]"),
        ),
        (
            "numpy;float32;3,4;",
            _refused(
                "numpy;float32;3,4;",
                "the perm must be a permutation of 0..1 for shape [3, 4], got []",
            ),
        ),
        # framework and dtype fields are compared exactly
        (
            "Numpy;float32;3,4;0,1",
            _bad_framework("Numpy;float32;3,4;0,1", "Numpy"),
        ),
        (" numpy;float32;3,4;0,1", _bad_framework(" numpy;float32;3,4;0,1", " numpy")),
        ("numpy ;float32;3,4;0,1", _bad_framework("numpy ;float32;3,4;0,1", "numpy ")),
        ("np;float32;3,4;0,1", _bad_framework("np;float32;3,4;0,1", "np")),
        ("numpy;float32 ;3,4;0,1", _refused("numpy;float32 ;3,4;0,1", "unknown dtype 'float32 '")),
        (
            "numpy;\nfloat32;3,4;0,1",
            _refused("numpy;\nfloat32;3,4;0,1", "unknown dtype '\\nfloat32'"),
        ),
        ("numpy;;3,4;0,1", _refused("numpy;;3,4;0,1", "unknown dtype ''")),
        (";;;", _bad_framework(";;;", "")),
    ],
)
def test_tensor_header_grammar(message, text: str, fragment: str) -> None:
    """Every spelling of a header but the canonical one is refused, naming what was received."""
    array, meta = message
    with pytest.raises(at.MetadataError, match=re.escape(fragment)):
        at.decode(array, _with(meta, tensor=text))
    with pytest.raises(at.MetadataError, match=re.escape(fragment)):  # and when seen again
        at.decode(array, _with(meta, tensor=text))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("numpy;float32;3,4;0,1" + " " * 4076, "'at.tensor' has 4097 characters; at most 4096"),
        (
            _text(dtype="x" * 5000),
            f"'at.tensor' has {6 + 5000 + 8} characters; at most 4096 are allowed",
        ),
        (_text(("1",) * 5000, range(5000)), "characters; at most 4096 are allowed"),
        ("numpy;float32;3,4;0,1" + ";" * 10**6, "'at.tensor' has 1000021 characters; at most 4096"),
        ("\u0663" * 4097, "'at.tensor' has 4097 characters; at most 4096 are allowed"),
    ],
)
def test_too_long_header_is_refused_unread(message, monkeypatch, text: str, fragment: str) -> None:
    array, meta = message

    def unread(*_args: Any) -> Any:
        raise AssertionError("a header over the limit was parsed")

    class Unsplittable(str):
        split = unread

    with pytest.raises(at.MetadataError, match=re.escape(fragment)) as info:
        at.decode(array, _with(meta, tensor=text))
    assert len(str(info.value)) < 100  # names the length, not the text
    monkeypatch.setattr(_schema, "_dims", unread)
    monkeypatch.setattr(_schema, "_from_fields", unread)
    with pytest.raises(at.MetadataError, match=re.escape(fragment)):
        _schema.parse_text(text)
    with pytest.raises(at.MetadataError, match=re.escape(fragment)):
        _schema.parse_header({"at.tensor": Unsplittable(text)})


def test_header_of_4096_characters_is_read(message) -> None:
    """The limit is inclusive: a 4096-character header is parsed (and here refused for its perm)."""
    array, meta = message
    text = "numpy;float32;3,4;0,1" + " " * 4075
    assert len(text) == _schema.MAX_HEADER_CHARS == 4096
    with pytest.raises(at.MetadataError, match=re.escape("the perm must be decimal")) as info:
        at.decode(array, _with(meta, tensor=text))
    assert "characters" not in str(info.value)
    assert len(str(info.value)) < 500  # the text is echoed only in part


class _Str(str):
    """A str subclass: dora never delivers one, a caller might."""


class _ShortLiar(str):
    """A str subclass whose len() hides its length (the parser must not be fooled)."""

    def __len__(self) -> int:
        return 0


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (_Str("numpy;float32;3,4;0,1"), None),
        (_Str("torch;float32;3,4;0,1"), None),
        (_Str("numpy;float32;4,3;1,0"), None),
        (Spoof("numpy;float32;3,4;0,1"), None),
        (Spoof("numpy;float32;4,3;0,1"), None),  # not the cached [3, 4] it compares equal to
        (Spoof("torch;float32;3,4;0,1"), None),
        (_Str("numpy;float32;3,-4;0,1"), _not_dims("numpy;float32;3,-4;0,1", "the shape", "3,-4")),
        (_Str("numpy;float32;3,4;0,1;"), _field_count("numpy;float32;3,4;0,1;", "str")),
        (_Str("numpy;float32;3,4;0,1" + " " * 4076), "'at.tensor' has 4097 characters"),
        (
            Spoof("numpy;float32;3,-4;0,1"),
            _not_dims("numpy;float32;3,-4;0,1", "the shape", "3,-4"),
        ),
        (Spoof("numpy;float32;4,4;0,1"), "payload holds 48 bytes but dtype and shape describe 64"),
        (Spoof("numpy;float64;3,4;0,1"), "describe 96 bytes"),
        (Spoof("numpy;float32;3,4;0,0"), "the perm must be a permutation of 0..1"),
        # Its len() is not asked: the text is read as the plain str it holds.
        (_ShortLiar("numpy;float32;" + "1," * 10**5 + "1;0"), "has 200017 characters; at most"),
        (_ShortLiar("numpy;float32;3,4;0,1" + " " * 10**5), "has 100021 characters; at most"),
    ],
)
@pytest.mark.parametrize("writable", [False, True])
def test_str_subclass_header(message, value: str, fragment: str | None, writable: bool) -> None:
    """Decoded like the equal str, or refused like it; never served from a cache by its hash."""
    array, meta = message
    at.decode(array, meta)  # the fixture's header is now cached (full and fast path)
    if fragment is None:
        plain = at.decode(array, _with(meta, tensor=str(value)), writable=writable)
        y = at.decode(array, _with(meta, tensor=value), writable=writable)
        assert type(y) is type(plain)
        assert tuple(y.shape) == tuple(plain.shape)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(plain))
        return
    error = at.PayloadError if "payload" in fragment or "describe" in fragment else at.MetadataError
    with pytest.raises(error, match=re.escape(fragment)):
        at.decode(array, _with(meta, tensor=value), writable=writable)


@pytest.mark.parametrize(
    ("shape", "perm", "error", "fragment"),
    [
        ([3, -4], [0, 1], at.MetadataError, "the shape must be decimal integers"),
        ([3, -4], [0, 1], at.MetadataError, "no signs, spaces or leading zeros), got '3,-4'"),
        ([-3, -4], [0, 1], at.MetadataError, "got '-3,-4'"),
        ([2**40], [0], at.PayloadError, "payload holds 48 bytes but dtype and shape describe"),
        ([2**20, 2**20], [0, 1], at.PayloadError, f"describe {4 * 2**40} bytes"),
        ([2**31, 2**31, 2**31], [0, 1, 2], at.MetadataError, "spans more than 2**62 bytes"),
        ([2**64], [0], at.MetadataError, "got '18446744073709551616'"),  # 20 digits
        ([2**61], [0], at.MetadataError, "spans more than 2**62 bytes"),  # x 4 bytes
        ([0, 2**62], [0, 1], at.MetadataError, "spans more than 2**62 bytes"),
        ([0, 2**63 - 1], [1, 0], at.MetadataError, "spans more than 2**62 bytes"),
        ([0, 10**19 - 1], [1, 0], at.MetadataError, "spans more than 2**62 bytes"),
        ([0, 2**70], [0, 1], at.MetadataError, "got '0,1180591620717411303424'"),
        ([2, 6], [0, 1], None, None),
        ([6, 2], [1, 0], None, None),
        ([12], [0], None, None),
        ([2, 1, 6], [2, 0, 1], None, None),
        ([], [], at.PayloadError, "payload holds 48 bytes but dtype and shape describe 4 bytes"),
        ([3, 4], [0, 0], at.MetadataError, "must be a permutation of 0..1 for shape [3, 4]"),
        ([3, 4], [1, 2], at.MetadataError, "got [1, 2]"),
        ([3, 4], [0], at.MetadataError, "got [0]"),
        ([3, 4], [0, 1, 2], at.MetadataError, "got [0, 1, 2]"),
        ([3, 4], [-1, 0], at.MetadataError, "the perm must be decimal integers"),
        ([3, 4], [-1, 0], at.MetadataError, "got '-1,0'"),
        (
            [1] * 65,
            list(range(65)),
            at.MetadataError,
            "the shape has 65 and the perm 65 entries; at most 64 dimensions are allowed",
        ),
        ([0] * 65, list(range(65)), at.MetadataError, "the shape has 65 and the perm 65"),
        ([1] * 65, [0], at.MetadataError, "the shape has 65 and the perm 1 entries; at most 64"),
        ([12], list(range(65)), at.MetadataError, "the shape has 1 and the perm 65 entries"),
    ],
)
def test_shape_and_perm(message, shape, perm, error, fragment) -> None:
    array, meta = message
    text = _text(shape, perm)
    bad = _with(meta, tensor=text)
    if error is None:
        y = at.decode(array, bad)
        assert y.shape == tuple(shape)
        physical = [shape[p] for p in perm]
        expected = _values().reshape(physical).transpose([perm.index(d) for d in range(len(perm))])
        np.testing.assert_array_equal(y, expected)
        return
    with pytest.raises(error, match=re.escape(fragment)) as info:
        at.decode(array, bad)
    if error is at.MetadataError:
        assert str(info.value).startswith(_refused(text, ""))


def test_zero_size_with_huge_dims_is_refused_not_crashed() -> None:
    """numpy/torch size every dimension of an empty tensor: without the bound, decode raised a
    bare numpy ValueError ("array is too big") or torch RuntimeError."""
    empty = pa.array([], pa.uint8())
    meta = at.encode(np.zeros((0, 1), np.float64))[1]
    for framework in ("numpy", "torch"):
        for shape in ([0, 2**61], [0, 2**40, 2**40]):
            text = _schema.pack(framework, "float64", shape, range(len(shape)))
            with pytest.raises(at.MetadataError, match="spans more than"):
                at.decode(empty, meta | {"at.tensor": text})
    ok = meta | {"at.tensor": _schema.pack("numpy", "float64", [0, 2**58], [0, 1])}
    assert at.decode(empty, ok).shape == (0, 2**58)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_encode_refuses_empty_tensors_no_decoder_accepts(framework: str) -> None:
    """The encoder applies the decoder's size bound: an empty tensor of huge dimensions was
    encoded into a header every decoder refuses."""
    shape = (0, 2**62 + 1)
    x = np.empty(shape, np.int8) if framework == "numpy" else torch.empty(shape, dtype=torch.int8)
    with pytest.raises(at.UnsupportedTensorError, match=r"spans more than 2\*\*62 bytes"):
        at.encode(x)
    smaller = np.empty((0, 2**58), np.int8)  # within the bound: both ways
    assert at.decode(*at.encode(smaller)).shape == smaller.shape


def test_64_dims_are_allowed() -> None:
    x = np.arange(2, dtype=np.int16).reshape((2,) + (1,) * 63)
    array, meta = at.encode(x)
    assert meta["at.tensor"] == _schema.pack("numpy", "int16", x.shape, range(64))
    y = at.decode(array, meta)
    assert y.shape == x.shape
    np.testing.assert_array_equal(y, x)


def test_encode_refuses_over_64_dims_never_reaches_wire() -> None:
    # numpy itself caps at 64 dims; torch does not.
    t = torch.zeros((1,) * 65)
    with pytest.raises(at.UnsupportedTensorError, match="65 dimensions; at most 64"):
        at.encode(t)


@pytest.mark.parametrize(
    "dtype",
    [
        "float128",
        "Float32",
        "FLOAT32",
        "",
        "torch.float32",
        "f4",
        "<f4",
        " float32",
        "float32\n",
        "\u0066loat32\u200b",
        "x" * 4000,
    ],
)
def test_unknown_dtype(message, dtype: str) -> None:
    array, meta = message
    with pytest.raises(at.MetadataError, match="unknown dtype") as info:
        at.decode(array, _with(meta, tensor=_text(dtype=dtype)))
    assert repr(dtype[:64]) in str(info.value)
    assert "float32" in str(info.value)  # names what is expected
    assert len(str(info.value)) < 1000  # a hostile name is not echoed in full


def test_numpy_message_with_torch_only_dtype(message) -> None:
    array, meta = message
    bad = _with(meta, tensor=_text([24], [0], dtype="bfloat16"))
    with pytest.raises(at.MetadataError, match="'bfloat16' has no numpy form"):
        at.decode(array, bad)


def test_dtype_change_is_seen_as_size_mismatch(message) -> None:
    array, meta = message
    with pytest.raises(at.PayloadError, match="48 bytes but dtype and shape describe 96"):
        at.decode(array, _with(meta, tensor=_text(dtype="float64")))


@pytest.mark.parametrize("version", [0, 1, 3, 99, -1, 2**62])
def test_unknown_version(message, version: int) -> None:
    array, meta = message
    with pytest.raises(
        at.VersionError, match=f"version {version} is not supported.*reads version 2"
    ):
        at.decode(array, _with(meta, version=version))


def test_version_1_message_is_refused(message) -> None:
    """A message in the previous wire format (six keys) is a VersionError, not misread."""
    array, _ = message
    old = {
        "at.version": 1,
        "at.kind": "tensor",
        "at.framework": "numpy",
        "at.dtype": "float32",
        "at.shape": [3, 4],
        "at.perm": [0, 1],
    }
    with pytest.raises(at.VersionError, match=r"version 1 is not supported.*reads version 2"):
        at.decode(array, old)
    with pytest.raises(at.VersionError, match="version 1 is not supported"):
        at.decode(array, {**old, "at.tensor": "numpy;float32;3,4;0,1"})


@pytest.mark.parametrize("kind", ["matrix", "Tensor", "", "x" * 500])
def test_unknown_kind(message, kind: str) -> None:
    array, meta = message
    with pytest.raises(at.MetadataError, match="unknown message kind") as info:
        at.decode(array, _with(meta, kind=kind))
    assert repr(kind[:40]) in str(info.value)
    assert "'tensor'" in str(info.value)


@pytest.mark.parametrize(
    "meta",
    [
        {"shape": [3, 4], "dtype": "float32"},
        {"tensor": "numpy;float32;3,4;0,1"},
        {"at.tensor": "numpy;float32;3,4;0,1", "at.kind": "tensor"},
        {"timestamp": 123},
        {},
        {"ARROW:extension:name": "arrow.fixed_shape_tensor"},
        {1: "a", "b": 2},  # non-str keys (not from dora, but must not crash the message)
    ],
)
def test_another_librarys_message(message, meta) -> None:
    array, _ = message
    with pytest.raises(at.NotATensorMessageError, match="not an arrow_tensor message"):
        at.decode(array, meta)


@pytest.mark.parametrize("meta", [None, [("at.version", 2)], "at.version", 2])
def test_metadata_not_a_mapping(message, meta) -> None:
    array, _ = message
    with pytest.raises(
        at.MetadataError, match=f"metadata must be a dict.*got {type(meta).__name__}"
    ):
        at.decode(array, meta)


def test_foreign_keys_are_ignored(message) -> None:
    array, meta = message
    extra = {"timestamp": 1_700_000_000, "user": "x", "shape": [9], "dtype": "int8", "at.future": 1}
    # Stale version-1 header keys next to at.tensor are ignored too: at.tensor alone decides.
    stale = {"at.framework": "torch", "at.dtype": "int8", "at.shape": [48], "at.perm": [0]}
    y = at.decode(array, {**extra, **stale, **meta})
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, np.arange(12, dtype=np.float32).reshape(3, 4))
    checked = at.encode(np.arange(3.0), checksum=True)
    at.decode(checked[0], {**checked[1], "timestamp": 5, "frame": 7}, verify=True)


def test_metadata_is_not_mutated(message) -> None:
    array, meta = message
    before = {k: (list(v) if isinstance(v, list) else v) for k, v in meta.items()}
    at.decode(array, meta, writable=True)
    assert meta == before


# --- payload ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (pa.array(np.zeros(12, "datetime64[s]")), "or float16/32/64, got type timestamp[s]"),
        (pa.array(np.zeros(12, np.int32)).cast(pa.date32()), "got type date32"),
        (pa.array([0] * 12, pa.decimal128(5, 0)), "got type decimal128(5, 0)"),
        (pa.array(["a"] * 48), "got type string"),
        (pa.array([b"x" * 48]), "got type binary"),
        (pa.array([True] * 384), "got type bool"),
        (pa.array([[1] * 48], pa.list_(pa.uint8())), "got type list<item: uint8>"),
        (pa.array(np.zeros(48, np.uint8)).cast(pa.uint8()).dictionary_encode(), "dictionary"),
    ],
)
def test_wrong_arrow_type(message, array, fragment: str) -> None:
    _, meta = message
    with pytest.raises(at.PayloadError, match=re.escape(fragment)):
        at.decode(array, meta)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (np.zeros(48, np.uint8), "expected a pyarrow.Array, got ndarray"),
        (None, "expected a pyarrow.Array, got NoneType"),
        (b"x" * 48, "expected a pyarrow.Array, got bytes"),
        (pa.py_buffer(b"x" * 48), "expected a pyarrow.Array, got Buffer"),
        (pa.chunked_array([np.zeros(24, np.uint8)] * 2), "got a ChunkedArray of 2 chunks"),
        (torch.zeros(48, dtype=torch.uint8), "expected a pyarrow.Array, got Tensor"),
    ],
)
def test_not_an_arrow_array(message, value, fragment: str) -> None:
    _, meta = message
    with pytest.raises(at.PayloadError, match=re.escape(fragment)):
        at.decode(value, meta)


def test_array_with_nulls(message) -> None:
    _, meta = message
    arr = pa.array([1] * 47 + [None], pa.uint8())
    with pytest.raises(at.PayloadError, match="payload array has 1 nulls; expected none"):
        at.decode(arr, meta)


@pytest.mark.parametrize(
    ("words", "storage"), [(11, pa.uint32()), (13, pa.uint32()), (47, pa.uint8())]
)
def test_buffer_size_mismatch(message, words: int, storage) -> None:
    _, meta = message
    width = storage.bit_width // 8
    arr = pa.array(np.zeros(words, f"<u{width}"), storage)
    with pytest.raises(
        at.PayloadError, match=f"payload holds {words * width} bytes but .* describe 48 bytes"
    ):
        at.decode(arr, meta)


def test_sliced_array_reads_only_its_slice(message) -> None:
    array, meta = message
    words = array.to_numpy().view(np.uint32)
    big = pa.array(np.concatenate([np.full(5, 0xDEADBEEF, np.uint32), words, words]))
    y = at.decode(big.slice(5, 12), meta)
    np.testing.assert_array_equal(y, np.arange(12, dtype=np.float32).reshape(3, 4))
    with pytest.raises(at.PayloadError, match="holds 52 bytes"):
        at.decode(big.slice(5, 13), meta)


def test_empty_array_for_empty_tensor() -> None:
    array, meta = at.encode(np.zeros((3, 0), np.float32))
    assert len(array) == 0
    assert at.decode(pa.array([], pa.uint64()), meta).shape == (3, 0)
    with pytest.raises(at.PayloadError, match="holds 1 bytes but dtype and shape describe 0"):
        at.decode(pa.array([0], pa.uint8()), meta)


# --- checksums ------------------------------------------------------------------------------


@pytest.fixture
def checked() -> tuple[pa.Array, dict[str, Any]]:
    return at.encode(np.arange(12, dtype=np.int32).reshape(3, 4), checksum=True)


def _flipped(array: pa.Array, index: int) -> pa.Array:
    data = bytearray(array.buffers()[1].to_pybytes()[: array.nbytes])
    data[index] ^= 0x01
    return pa.Array.from_buffers(array.type, len(array), [None, pa.py_buffer(bytes(data))])


def test_checksum_passes(checked) -> None:
    array, meta = checked
    assert re.fullmatch(r"xxh3_64:[0-9a-f]{16}", meta["at.checksum"])
    np.testing.assert_array_equal(at.decode(array, meta, verify=True), np.arange(12).reshape(3, 4))


@pytest.mark.parametrize("index", [0, 1, 23, 47])
def test_checksum_catches_one_flipped_byte(checked, index: int) -> None:
    array, meta = checked
    with pytest.raises(at.ChecksumError, match="checksum mismatch: message says xxh3_64:"):
        at.decode(_flipped(array, index), meta, verify=True)
    assert at.decode(_flipped(array, index), meta).shape == (3, 4)  # verify=False trusts it


@pytest.mark.parametrize(
    "text",
    [
        "numpy;int32;2,6;0,1",
        "numpy;int32;4,3;0,1",
        "numpy;int32;12;0",
        "numpy;int32;3,4,1;0,1,2",
        "numpy;int32;1,3,4;0,1,2",
        "numpy;float32;3,4;0,1",
        "numpy;uint32;3,4;0,1",
        "numpy;int32;3,4;1,0",
        "numpy;int32;4,3;1,0",
    ],
)
def test_checksum_catches_changed_header(checked, text: str) -> None:
    array, meta = checked
    assert meta["at.tensor"] == "numpy;int32;3,4;0,1"
    at.decode(array, {**meta, "at.tensor": text})  # a valid header for these bytes
    with pytest.raises(at.ChecksumError, match="dtype, shape, layout or bytes changed"):
        at.decode(array, {**meta, "at.tensor": text}, verify=True)


def test_verify_without_checksum(message) -> None:
    array, meta = message
    with pytest.raises(at.ChecksumError, match="carries no checksum; encode with checksum=True"):
        at.decode(array, meta, verify=True)


@pytest.mark.parametrize("value", [12345, "md5:abc", "", ["xxh3_64:0"], True])
def test_malformed_checksum(checked, value) -> None:
    array, meta = checked
    with pytest.raises(at.MetadataError, match="checksum must be a str 'xxh3_64:<hex>'"):
        at.decode(array, {**meta, "at.checksum": value}, verify=True)


def test_checksum_of_wrong_value(checked) -> None:
    array, meta = checked
    with pytest.raises(at.ChecksumError, match="message says xxh3_64:0000000000000000"):
        at.decode(array, {**meta, "at.checksum": "xxh3_64:0000000000000000"}, verify=True)


# --- what encode refuses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.array([object(), 1], dtype=object), "object arrays hold Python references"),
        (np.array(["ab", "c"]), "encode text as bytes"),
        (np.array([b"ab"]), "view fixed-width bytes as uint8"),
        (np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]), "view structured data as uint8"),
        (np.zeros(2, dtype="V4"), "view structured data as uint8"),
        (np.array(["2024-01-01"], dtype="datetime64[s]"), "convert datetimes to int64"),
        (np.array([1], dtype="timedelta64[ms]"), "convert timedeltas to int64"),
        (np.zeros(2, dtype=np.longdouble), "use one of bool, uint8"),
        (np.zeros(2, dtype=np.clongdouble), "use one of bool, uint8"),
    ],
)
def test_numpy_dtypes_without_wire_form(array: np.ndarray, fragment: str) -> None:
    with pytest.raises(at.UnsupportedTensorError, match=re.escape(fragment)) as info:
        at.encode(array)
    assert repr(array.dtype.str) in str(info.value)  # names what was received


def test_masked_array_is_refused_not_stripped() -> None:
    """Encoding a MaskedArray used to drop its mask silently."""
    masked = np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])
    with pytest.raises(at.UnsupportedTensorError, match=r"masked array .* mask would be lost"):
        at.encode(masked)


def _sparse() -> torch.Tensor:
    return torch.eye(3).to_sparse()


def _quantized() -> torch.Tensor:
    with pytest.warns(UserWarning, match="quantize"):
        return torch.quantize_per_tensor(torch.rand(3), 0.1, 0, torch.quint8)


def _nested() -> torch.Tensor:
    with pytest.warns(UserWarning, match="nested"):
        return torch.nested.nested_tensor([torch.rand(2), torch.rand(3)])


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (_sparse, "torch layout torch.sparse_coo is not supported; convert with t.to_dense()"),
        (lambda: torch.eye(3).to_sparse().coalesce(), "sparse_coo"),
        (_quantized, "send t.dequantize(), or t.int_repr()"),
        (_nested, "nested tensors are not supported; send t.unbind()"),
        (lambda: torch.empty(3, device="meta"), "meta tensors hold no data"),
    ],
)
def test_torch_tensors_without_wire_form(make, fragment: str) -> None:
    t = make()
    with pytest.raises(at.UnsupportedTensorError, match=re.escape(fragment)):
        at.encode(t)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (np.float32(1.5), "got a numpy scalar numpy.float32; wrap it as a 0-d array"),
        (np.int64(3), "numpy scalar numpy.int64"),
        (np.bool_(True), "numpy scalar numpy.bool"),
        (1.5, "expected a torch.Tensor or numpy.ndarray (or a dict"),
        (1.5, "pyarrow.Array, str or bytes), got builtins.float"),
        (3, "got builtins.int"),
        (True, "got builtins.bool"),
        (None, "got builtins.NoneType"),
        (pa.chunked_array([[1, 2]]), "convert it to numpy (np.asarray) or torch"),
        (memoryview(b"ab"), "got builtins.memoryview; send bytes(x)"),
        (bytearray(b"ab"), "got builtins.bytearray; send bytes(x)"),
    ],
)
def test_encode_non_tensors(value: Any, fragment: str) -> None:
    with pytest.raises(at.UnsupportedTensorError, match=re.escape(fragment)):
        at.encode(value)


def test_unsupported_is_also_a_type_error() -> None:
    with pytest.raises(TypeError):
        at.encode(object())


# --- torch side of a message ------------------------------------------------------------------


def test_torch_message_with_huge_but_consistent_header_is_bounded(message) -> None:
    array, meta = message
    bad = {**meta, "at.tensor": _schema.pack("torch", "float32", [2**20, 2**20], [1, 0])}
    with pytest.raises(at.PayloadError, match="48 bytes but dtype and shape describe"):
        at.decode(array, bad)


def test_bool_payload_decodes_only_its_bytes() -> None:
    array, meta = at.encode(np.array([True, False, True]))
    assert meta["at.tensor"] == "numpy;bool;3;0"
    np.testing.assert_array_equal(at.decode(array, meta), [True, False, True])
    torch_meta = {**meta, "at.tensor": "torch;bool;3;0"}
    assert at.decode(array, torch_meta).tolist() == [True, False, True]


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("bad_byte", [2, 255])
def test_bool_bytes_other_than_0_1_are_refused(framework: str, bad_byte: int) -> None:
    x = np.array([True, False, True]) if framework == "numpy" else torch.tensor([True, False])
    _, meta = at.encode(x)
    raw = np.zeros(len(x), dtype=np.uint8)
    raw[-1] = bad_byte
    with pytest.raises(at.PayloadError, match="bool payload holds bytes other than 0 and 1"):
        at.decode(pa.array(raw), meta)


@pytest.mark.parametrize("framework", ["cupy", "pyarrow.cuda"])
def test_tensor_message_claiming_a_device_framework(message, framework: str) -> None:
    array, meta = message
    with pytest.raises(
        at.MetadataError,
        match=re.escape(
            f"host memory decodes to one of ('numpy', 'torch'), but the header names "
            f"{framework!r} (a CUDA descriptor's framework)"
        ),
    ):
        at.decode(array, _with(meta, tensor=_text(framework=framework)))
