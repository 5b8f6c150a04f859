"""Plain values: Arrow arrays, text, bytes and flat lists, as any dora node reads them.

Note [Plain values]
Nodes that do not use arrow_tensor (dora's node-hub) exchange plain Arrow arrays: a text as
a one-element ``StringArray``, bytes (an encoded image) as a ``UInt8Array``, a list of
numbers as an ``Int64Array`` or ``DoubleArray``, boxes as a ``StructArray``. Such values
travel as exactly that array, kind ``plain`` (SPEC.md), so a node-hub consumer reads them
as it reads its own peers; the ``at.`` keys beside it let an arrow_tensor receiver rebuild
the very Python value: ``str``, ``bytes``, ``list`` or the ``pyarrow.Array``. Only flat,
homogeneous lists are plain (every element an int that fits int64, or every one a float,
or every one a str): anything else, tuples included, is a structure (``_tree``), which
keeps each element's type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from .._errors import MetadataError, PayloadError, UnsupportedTensorError
from . import _checksum, _schema

ARROW, STR, BYTES, LIST = "arrow", "str", "bytes", "list"
PLAIN_FORMS = (ARROW, STR, BYTES, LIST)
"""What ``at.plain`` says the receiver gets back."""
_LIST_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string()}
_INT64 = (-(1 << 63), (1 << 63) - 1)


def plain_form(x: Any) -> str | None:
    """The plain form ``x`` travels as (``PLAIN_FORMS``), or None if it is no plain value."""
    kind = type(x)
    if kind is str:
        return STR
    if kind is bytes:
        return BYTES
    if isinstance(x, pa.Array):
        return ARROW
    if kind is list and x:
        first = type(x[0])
        if first not in _LIST_TYPES or any(type(v) is not first for v in x):
            return None
        if first is int and not all(_INT64[0] <= v <= _INT64[1] for v in x):
            return None
        return LIST
    return None


def encode_plain(x: Any, checksum: bool = False) -> tuple[pa.Array, dict[str, Any]]:
    """The Arrow array a node-hub node expects for ``x``, plus the ``at.`` keys.

    Raises
    ------
    UnsupportedTensorError
        If ``x`` is no plain value (``plain_form`` is None).
    """
    form = plain_form(x)
    if form is None:
        raise UnsupportedTensorError(
            f"expected a pyarrow.Array, str, bytes or a flat list of int, float or str, "
            f"got {type(x).__module__}.{type(x).__qualname__}"
        )
    if form == ARROW:
        array = x
    elif form == STR:
        array = pa.array([x], pa.string())
    elif form == BYTES:
        array = pa.py_buffer(x)
        array = pa.Array.from_buffers(pa.uint8(), len(x), [None, array])
    else:
        array = pa.array(x, _LIST_TYPES[type(x[0])])
    meta: dict[str, Any] = {
        _schema.KEY_VERSION: _schema.VERSION,
        _schema.KEY_KIND: _schema.KIND_PLAIN,
        _schema.KEY_PLAIN: form,
    }
    if checksum:
        meta[_schema.KEY_CHECKSUM] = _checksum.digest(form, _canonical(form, x))
    return array, meta


def _canonical(form: str, value: Any) -> bytes:
    """The bytes a plain value's checksum covers: its content, independent of buffers."""
    if form == BYTES:
        return value
    if form == STR:
        return value.encode("utf-8", "surrogatepass")
    if form == LIST:
        return repr(value).encode("utf-8", "surrogatepass")
    return f"{value.type}\n{value.to_pylist()!r}".encode("utf-8", "surrogatepass")


def decode_plain(
    array: Any, meta: Mapping[str, Any], writable: bool = False, verify: bool = False
) -> Any:
    """The value ``encode_plain`` was given: a ``str``, ``bytes``, ``list`` or the array.

    ``writable`` changes nothing: these values are private copies already, except the
    ``pyarrow.Array``, which Arrow never lets anyone write.

    Raises
    ------
    MetadataError, PayloadError, ChecksumError
        For a form this decoder does not know or an array that does not hold it.
    """
    form = _schema.require(meta, _schema.KEY_PLAIN, str)
    if form not in PLAIN_FORMS:
        raise MetadataError(f"'at.plain' must be one of {PLAIN_FORMS}, got {form[:40]!r}")
    if not isinstance(array, pa.Array):
        raise PayloadError(f"a plain value arrives as a pyarrow.Array, got {type(array).__name__}")
    if form == ARROW:
        value: Any = array
    elif array.null_count:
        raise PayloadError(f"a plain {form} arrives without nulls, got {array.null_count}")
    elif form == STR:
        if array.type != pa.string() or len(array) != 1:
            raise PayloadError(
                f"a plain str arrives as one string, got {len(array)} values of {array.type}"
            )
        value = array[0].as_py()
    elif form == BYTES:
        if array.type != pa.uint8():
            raise PayloadError(f"plain bytes arrive as uint8 values, got {array.type}")
        data = array.buffers()[1]
        value = b"" if not len(array) or data is None else data[array.offset :][: len(array)]
        value = value if isinstance(value, bytes) else value.to_pybytes()
    else:
        if array.type not in _LIST_TYPES.values() or not len(array):
            raise PayloadError(
                f"a plain list arrives as int64, double or string values, got "
                f"{len(array)} of {array.type}"
            )
        value = array.to_pylist()
    if verify:
        _checksum.verify(meta.get(_schema.KEY_CHECKSUM), form, _canonical(form, value))
    return value
