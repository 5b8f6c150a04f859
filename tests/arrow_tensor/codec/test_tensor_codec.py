"""Round trips of the single-tensor codec: dtype x layout x size, zero copy, read-only contract.

Every comparison is on bits (same-width integer views), so NaN payloads, -0.0 and infinities
are checked exactly; dense layouts must come back with the same strides for dims of size > 1.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
import torch
from arrow_tensor.codec import _tensor as _codec

Maker = Callable[[tuple[int, ...]], Any]

# torch cannot stack/cat these (or warns doing so): run the op on same-width integer views.
_NO_CAT = {getattr(torch, n, None) for n in ("complex32", "float4_e2m1fn_x2")} - {None}


def _int_view(t: torch.Tensor) -> torch.Tensor:
    """Same memory as same-width signed ints, to write any dtype without arithmetic."""
    if t.element_size() == 16:
        return torch.view_as_real(t).view(torch.int64)
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _op(fn: Callable[..., torch.Tensor], ts: list[torch.Tensor], dim: int) -> torch.Tensor:
    if ts[0].dtype in _NO_CAT:
        return fn([_int_view(t) for t in ts], dim=dim).view(ts[0].dtype)
    return fn(ts, dim=dim)


# name -> (build from a maker of random contiguous tensors of one dtype, is the result dense)
TORCH_LAYOUTS: dict[str, tuple[Callable[[Maker], torch.Tensor], bool]] = {
    "contiguous": (lambda mk: mk((3, 4, 5)), True),
    "transposed": (lambda mk: mk((5, 4)).t(), True),
    "channels_last": (lambda mk: mk((2, 4, 5, 3)).permute(0, 3, 1, 2), True),
    "channels_last_n1": (lambda mk: mk((1, 4, 5, 3)).permute(0, 3, 1, 2), True),
    "channels_last_c1": (lambda mk: mk((2, 4, 5, 1)).permute(0, 3, 1, 2), True),
    "chw_of_hwc": (lambda mk: mk((4, 5, 3)).permute(2, 0, 1), True),
    "permuted_5d": (lambda mk: mk((2, 3, 1, 4, 2)).permute(4, 2, 0, 3, 1), True),
    "unsqueezed": (lambda mk: mk((3, 4))[:, None], True),
    "offset_row": (lambda mk: mk((5, 6))[2], True),
    "offset_rows": (lambda mk: mk((5, 6))[2:4], True),
    "offset_transposed": (lambda mk: mk((5, 6))[1:4].t(), True),
    "stepped": (lambda mk: mk((6, 8))[::2, 1::3], False),
    "stepped_transposed": (lambda mk: mk((6, 8))[::2].t(), False),
    "offset_block": (lambda mk: mk((5, 6))[1:, 2:], False),
    "expanded": (lambda mk: mk((1, 4)).expand(3, 4), False),
    "expanded_middle": (lambda mk: mk((3, 1, 2)).expand(3, 5, 2), False),
    "expanded_0d": (lambda mk: mk(()).expand(2, 3), False),
    "diagonal": (lambda mk: mk((4, 4)).diagonal(), False),
    "stack": (lambda mk: _op(torch.stack, [mk((3, 4)).t(), mk((3, 4)).t()], dim=1), True),
    "cat_transposed": (lambda mk: _op(torch.cat, [mk((3, 4)).t(), mk((3, 2)).t()], dim=0), True),
    "cat_last": (lambda mk: _op(torch.cat, [mk((2, 3)), mk((2, 1))], dim=1), True),
    "zero_d": (lambda mk: mk(()), True),
    "zero_d_offset": (lambda mk: mk((3, 4))[1, 2], True),
    "zero_size": (lambda mk: mk((0, 3)), True),
    "zero_size_permuted": (lambda mk: mk((2, 0, 4)).permute(2, 0, 1), True),
    "single": (lambda mk: mk((1,)), True),
}

NUMPY_LAYOUTS: dict[str, tuple[Callable[[Maker], np.ndarray], bool]] = {
    "contiguous": (lambda mk: mk((3, 4, 5)), True),
    "transposed": (lambda mk: mk((5, 4)).T, True),
    "fortran": (lambda mk: mk((5, 4, 3)).transpose(2, 1, 0), True),
    "channels_last": (lambda mk: mk((2, 4, 5, 3)).transpose(0, 3, 1, 2), True),
    "channels_last_n1": (lambda mk: mk((1, 4, 5, 3)).transpose(0, 3, 1, 2), True),
    "channels_last_c1": (lambda mk: mk((2, 4, 5, 1)).transpose(0, 3, 1, 2), True),
    "offset_rows": (lambda mk: mk((5, 6))[2:4], True),
    "stepped": (lambda mk: mk((6, 8))[::2, 1::3], False),
    "negative": (lambda mk: mk((5, 3))[::-1], False),
    "negative_step": (lambda mk: mk((4, 7))[:, ::-2], False),
    "negative_transposed": (lambda mk: mk((4, 7))[::-1].T, False),
    "broadcast": (lambda mk: np.broadcast_to(mk((1, 4)), (3, 4)), False),
    "offset_block": (lambda mk: mk((5, 6))[1:, 2:], False),
    "stack": (lambda mk: np.stack([mk((3, 4)).T, mk((3, 4)).T], axis=1), True),
    "concatenate": (lambda mk: np.concatenate([mk((2, 3)), mk((2, 1))], axis=1), True),
    "zero_d": (lambda mk: mk(()), True),
    "zero_d_offset": (lambda mk: mk((3, 4))[1, 2, ...], True),
    "zero_size": (lambda mk: mk((0, 3)), True),
    "zero_size_negative": (lambda mk: mk((3, 0))[::-1], True),
}


def _check_torch(x: torch.Tensor, dense: bool, tensors: Any) -> None:
    array, meta = at.encode(x)
    assert isinstance(array, pa.Array)
    assert array.null_count == 0
    if x.numel():
        low, high = tensors.torch_storage_span(x)
        inside = low <= tensors.buffer_address(array) < high
        if dense and not x.is_conj() and not x.is_neg():
            assert tensors.buffer_address(array) == x.data_ptr()  # no copy
        else:
            assert not inside  # one compacted copy, not the source memory
    y = at.decode(array, meta)
    tensors.assert_same_torch(y, x)
    if dense and x.numel():  # a zero-size tensor addresses no memory: strides are moot
        assert tensors.big_strides(y.shape, y.stride()) == tensors.big_strides(x.shape, x.stride())
    if y.numel():
        assert y.data_ptr() == tensors.buffer_address(array)  # decode is a view


def _check_numpy(x: np.ndarray, dense: bool, tensors: Any) -> None:
    array, meta = at.encode(x)
    payload = np.frombuffer(array.buffers()[1], np.uint8)
    if x.size:
        if dense and x.dtype.isnative:
            assert tensors.buffer_address(array) == tensors.numpy_span(x)[0]  # no copy
        else:
            assert not np.shares_memory(payload, x)
    y = at.decode(array, meta)
    tensors.assert_same_numpy(y, x)
    assert not y.flags.writeable
    if dense and x.size:
        assert tensors.big_strides(y.shape, y.strides) == tensors.big_strides(x.shape, x.strides)
    if y.size:
        assert np.shares_memory(y, payload)


@pytest.mark.parametrize("layout", list(TORCH_LAYOUTS))
def test_torch_round_trip(torch_dtype: torch.dtype, layout: str, tensors: Any) -> None:
    build, dense = TORCH_LAYOUTS[layout]
    seeds = iter(range(100))
    x = build(lambda shape: tensors.random_torch(shape, torch_dtype, next(seeds)))
    _check_torch(x, dense, tensors)


@pytest.mark.parametrize("layout", list(NUMPY_LAYOUTS))
def test_numpy_round_trip(numpy_dtype: np.dtype, layout: str, tensors: Any) -> None:
    build, dense = NUMPY_LAYOUTS[layout]
    seeds = iter(range(100))
    x = build(lambda shape: tensors.random_numpy(shape, numpy_dtype, next(seeds)))
    _check_numpy(x, dense, tensors)


def test_numpy_big_endian_values_survive(tensors: Any) -> None:
    x = np.array([1.5, -0.0, np.inf, -2.25e300], dtype=">f8")
    y = at.decode(*at.encode(x))
    assert y.dtype == np.dtype("<f8")
    np.testing.assert_array_equal(y, x)
    assert np.signbit(y[1])


def test_numpy_unaligned_source_round_trips(tensors: Any) -> None:
    raw = np.zeros(4 * 6 + 1, np.uint8)
    x = raw[1:].view("<f4").reshape(2, 3)
    x[...] = [[1, -0.0, np.nan], [np.inf, 5, 6]]
    assert not x.flags.aligned
    array, meta = at.encode(x)
    assert tensors.buffer_address(array) == x.ctypes.data
    tensors.assert_same_numpy(at.decode(array, meta), x)


@pytest.mark.parametrize(
    "layout", ["contiguous", "transposed", "stepped", "zero_d", "zero_size", "expanded"]
)
def test_torch_conj_and_neg_views(complex_dtype: torch.dtype, layout: str, tensors: Any) -> None:
    build, _dense = TORCH_LAYOUTS[layout]
    base = build(lambda shape: tensors.random_torch(shape, complex_dtype, 3))
    conj = base.conj()
    assert conj.is_conj()
    y = at.decode(*at.encode(conj))
    tensors.assert_same_torch(y, conj)
    neg = conj.imag
    assert neg.is_neg()
    tensors.assert_same_torch(at.decode(*at.encode(neg)), neg)


def test_torch_conj_bits_are_the_conjugate(tensors: Any) -> None:
    x = torch.tensor([1 + 2j, -3 - 0j, complex("nan+1j")], dtype=torch.complex64)
    y = at.decode(*at.encode(x.conj()))
    assert not y.is_conj()
    expected = torch.view_as_real(x).clone()
    expected[:, 1] = -expected[:, 1]
    assert torch.equal(torch.view_as_real(y).view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
)
@pytest.mark.parametrize("wrap", ["requires_grad", "parameter", "non_leaf"])
def test_torch_autograd_tensors(dtype: torch.dtype, wrap: str, tensors: Any) -> None:
    x = tensors.random_torch((3, 4), dtype, 5).t()
    if wrap == "requires_grad":
        x = x.clone().requires_grad_()
    elif wrap == "parameter":
        x = torch.nn.Parameter(x.clone())
    else:
        x = x.clone().requires_grad_() * 1
    assert x.requires_grad
    array, meta = at.encode(x)
    assert tensors.buffer_address(array) == x.data_ptr()
    y = at.decode(array, meta)
    assert not y.requires_grad
    tensors.assert_same_torch(y, x)


def test_float_special_values_exact(float_dtype: torch.dtype, tensors: Any) -> None:
    """-0.0, +-inf, quiet/signalling NaNs with payloads, subnormals: every bit pattern of the
    sign/exponent extremes, for every float width."""
    torch_dtype = float_dtype
    width = tensors.random_torch((1,), torch_dtype).element_size()
    component = width // 2 if torch_dtype.is_complex else width
    bits = component * 8
    patterns = [0, 1, (1 << (bits - 1)), (1 << (bits - 1)) | 1, (1 << bits) - 1, (1 << bits) - 2]
    patterns += [((1 << (bits - 1)) - 1) ^ k for k in (0, 1, 2, 3)]  # all-ones exponent area
    raw = np.array(patterns * (width // component), dtype=f"<u{component}").view(np.uint8)
    x = torch.from_numpy(raw.copy()).view(torch_dtype)
    tensors.assert_same_torch(at.decode(*at.encode(x)), x)


# --- about 4 MiB ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "layout"),
    [
        (torch.float32, "contiguous"),
        (torch.bfloat16, "transposed"),
        (torch.float64, "stepped"),
        (torch.uint8, "channels_last"),
    ],
)
def test_torch_4mib(dtype: torch.dtype, layout: str, tensors: Any) -> None:
    width = tensors.random_torch((1,), dtype).element_size()
    n = 4 * 1024 * 1024 // width
    base = tensors.random_torch((n,), dtype, 11)
    x = {
        "contiguous": lambda: base.view(1024, -1),
        "transposed": lambda: base.view(1024, -1).t(),
        "stepped": lambda: base.view(1024, -1)[:, ::2],
        "channels_last": lambda: base.view(4, 512, 512, 4).permute(0, 3, 1, 2),
    }[layout]()
    _check_torch(x, layout != "stepped", tensors)


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<c16"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "negative"])
def test_numpy_4mib(dtype: str, layout: str, tensors: Any) -> None:
    base = tensors.random_numpy((4 * 1024 * 1024 // np.dtype(dtype).itemsize,), np.dtype(dtype))
    square = base.reshape(1024, -1)
    x = {"contiguous": square, "transposed": square.T, "negative": square[::-1, ::-1]}[layout]
    _check_numpy(x, layout != "negative", tensors)


# --- copies: none for dense, exactly one for the rest ---------------------------------------


def _traced_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_dense_encode_allocates_nothing_like_the_payload(framework: str, tensors: Any) -> None:
    nbytes = 4 * 1024 * 1024
    x: Any = tensors.random_numpy((nbytes // 4,), np.dtype("<f4")).reshape(512, -1).T
    if framework == "torch":
        x = torch.from_numpy(np.ascontiguousarray(x.T)).t()
    _, peak = _traced_peak(lambda: at.encode(x, checksum=True))
    assert peak < nbytes // 64


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_non_dense_encode_copies_exactly_once(framework: str, tensors: Any) -> None:
    nbytes = 4 * 1024 * 1024
    full = tensors.random_numpy((1024, 2 * nbytes // 4 // 1024), np.dtype("<f4"))
    x: Any = full[:, ::2] if framework == "numpy" else torch.from_numpy(full)[:, ::2]
    (array, _), peak = _traced_peak(lambda: at.encode(x))
    assert array.nbytes == nbytes
    assert nbytes <= peak < nbytes + nbytes // 8


def test_decode_allocates_nothing_like_the_payload(tensors: Any) -> None:
    array, meta = at.encode(tensors.random_numpy((1024, 1024), np.dtype("<f4")))
    _, peak = _traced_peak(lambda: at.decode(array, meta, verify=False))
    assert peak < 64 * 1024


# --- decode: a view of the received buffer, read-only by contract ---------------------------


def _received(array: pa.Array, pad: int = 0) -> pa.Array:
    """``array`` as a receiver gets it: a fresh, immutable buffer (optionally at an offset)."""
    data = b"\x00" * pad + array.buffers()[1].to_pybytes()[: array.nbytes]
    buf = pa.py_buffer(data)
    assert not buf.is_mutable
    return pa.Array.from_buffers(pa.uint8(), len(data), [None, buf]).slice(pad)


@pytest.mark.parametrize("pad", [0, 1, 3])
def test_numpy_decode_is_read_only_view_of_received_buffer(pad: int, tensors: Any) -> None:
    x = tensors.random_numpy((6, 5), np.dtype("<f8")).T
    array, meta = at.encode(x)
    received = _received(array, pad)
    y = at.decode(received, meta)
    assert y.ctypes.data == received.buffers()[1].address + pad
    assert not y.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        y[0, 0] = 1
    tensors.assert_same_numpy(y, x)
    assert y.strides == x.strides


@pytest.mark.parametrize("pad", [0, 1, 3])
def test_torch_decode_is_view_of_read_only_buffer_without_warning(pad: int, tensors: Any) -> None:
    # Warnings are errors in this suite: torch.from_numpy on read-only memory would fail here.
    x = tensors.random_torch((2, 4, 5, 3), torch.float32, 7).permute(0, 3, 1, 2)
    array, meta = at.encode(x)
    received = _received(array, pad)
    y = at.decode(received, meta)
    assert y.data_ptr() == received.buffers()[1].address + pad
    assert y.stride() == x.stride()
    tensors.assert_same_torch(y, x)


def test_numpy_writable_is_private_copy_with_same_strides(tensors: Any) -> None:
    x = tensors.random_numpy((2, 4, 5, 3), np.dtype("<f4")).transpose(0, 3, 1, 2)
    array, meta = at.encode(x)
    y = at.decode(array, meta, writable=True)
    assert y.flags.writeable
    assert not np.shares_memory(y, np.frombuffer(array.buffers()[1], np.uint8))
    assert y.strides == x.strides
    tensors.assert_same_numpy(y, x)
    y[...] = 0
    tensors.assert_same_numpy(at.decode(array, meta), x)


def test_torch_writable_is_private_copy_with_same_strides(torch_dtype: torch.dtype, tensors):
    x = tensors.random_torch((2, 4, 5, 3), torch_dtype, 9).permute(0, 3, 1, 2)
    array, meta = at.encode(x)
    y = at.decode(array, meta, writable=True)
    low, high = tensors.buffer_address(array), tensors.buffer_address(array) + array.nbytes
    assert not low <= y.data_ptr() < high
    assert y.stride() == x.stride()
    tensors.assert_same_torch(y, x)
    _int_view(y).zero_()
    tensors.assert_same_torch(at.decode(array, meta), x)


@pytest.mark.parametrize("shape", [(), (0, 3), (4,)])
def test_writable_zero_d_and_empty(shape: tuple[int, ...], torch_dtype, tensors) -> None:
    x = tensors.random_torch(shape, torch_dtype, 2)
    tensors.assert_same_torch(at.decode(*at.encode(x), writable=True), x)
    n = tensors.random_numpy(shape, np.dtype("<c8"))
    y = at.decode(*at.encode(n), writable=True)
    assert y.flags.writeable
    tensors.assert_same_numpy(y, n)


def test_decode_returns_encoded_kind(tensors: Any) -> None:
    t = tensors.random_torch((2, 3), torch.int16)
    assert type(at.decode(*at.encode(t))) is torch.Tensor
    assert type(at.decode(*at.encode(t.numpy()))) is np.ndarray


def test_decode_keeps_buffer_alive(tensors: Any) -> None:
    x = tensors.random_numpy((64, 64), np.dtype("<i8"))
    array, meta = at.encode(x.copy())
    y_np = at.decode(array, meta)
    t = torch.from_numpy(x.copy())
    tarray, tmeta = at.encode(t)
    y_t = at.decode(tarray, tmeta)
    del array, tarray, t
    np.testing.assert_array_equal(y_np, x)
    assert torch.equal(y_t, torch.from_numpy(x))


# --- storage types and offsets a receiver may see --------------------------------------------


@pytest.mark.parametrize("storage", [pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()])
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_decode_accepts_every_storage_type(storage: pa.DataType, framework: str, tensors) -> None:
    x: Any = tensors.random_numpy((4, 6), np.dtype("<c16")).T
    if framework == "torch":
        x = torch.from_numpy(x.T.copy()).t()
    array, meta = at.encode(x)
    width = storage.bit_width // 8
    rewrapped = pa.Array.from_buffers(storage, array.nbytes // width, [None, array.buffers()[1]])
    y = at.decode(rewrapped, meta)
    if framework == "torch":
        tensors.assert_same_torch(y, x)
    else:
        tensors.assert_same_numpy(y, x)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_decode_sliced_array_uses_its_offset(framework: str, tensors: Any) -> None:
    x = tensors.random_numpy((3, 5), np.dtype("<f4"))
    array, meta = at.encode(x if framework == "numpy" else torch.from_numpy(x))
    words = array.to_numpy().view("<u4")  # a uint32 container of the same bytes
    padded = pa.array(np.concatenate([words[:7] ^ 0xFFFF, words, words[:5]]), pa.uint32())
    sliced = padded.slice(7, len(words))
    assert sliced.offset == 7
    y = at.decode(sliced, meta)
    got = y.numpy() if framework == "torch" else y
    np.testing.assert_array_equal(got.view("<u4"), x.view("<u4"))


def test_plan_write_into_matches_encode(numpy_dtype: np.dtype, tensors: Any) -> None:
    for layout in ("contiguous", "negative_transposed", "broadcast", "zero_d", "zero_size"):
        x = NUMPY_LAYOUTS[layout][0](lambda s: tensors.random_numpy(s, numpy_dtype, 4))
        plan = _codec.plan(x)
        dest = bytearray(plan.nbytes + 8)
        plan.write_into(dest)
        array, _ = at.encode(x)
        assert bytes(dest[: plan.nbytes]) == array.buffers()[1].to_pybytes()[: array.nbytes]
        assert dest[plan.nbytes :] == bytearray(8)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_decode_accepts_an_all_valid_bitmap(framework: str, tensors: Any) -> None:
    """dora's IPC encoder adds an all-ones validity bitmap to what it delivers."""
    x = tensors.random_numpy((5, 7), np.dtype("<f4"))
    array, meta = at.encode(x if framework == "numpy" else torch.from_numpy(x))
    validity = pa.py_buffer(np.full((len(array) + 7) // 8, 0xFF, np.uint8).tobytes())
    delivered = pa.Array.from_buffers(array.type, len(array), [validity, array.buffers()[1]])
    assert delivered.buffers()[0] is not None
    assert delivered.null_count == 0
    y = at.decode(delivered, meta)
    got = y.numpy() if framework == "torch" else y
    np.testing.assert_array_equal(got.view("<u4"), x.view("<u4"))
