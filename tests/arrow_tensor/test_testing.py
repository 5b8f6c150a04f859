"""arrow_tensor.testing: deterministic cases, the comparison, and the validator's bookkeeping."""

from __future__ import annotations

import json
from typing import Any

import arrow_tensor as at
import numpy as np
import pyarrow as pa
import pytest
import torch
from arrow_tensor import ConfigError, MetadataError
from arrow_tensor import testing as tt
from arrow_tensor.codec import _dtypes, _schema
from hypothesis import given, settings
from hypothesis import strategies as st

SMALL = (0, 4096)


class Recorder:
    """Stands in for a dora node: records what is sent (array, metadata)."""

    def __init__(self) -> None:
        self.sent: list[tuple[pa.Array, dict[str, Any]]] = []

    def send_output(self, output_id: str, data: Any, metadata: Any = None) -> None:
        self.sent.append((data, dict(metadata or {})))


def message(case: tt.Case, seq: int, seed: int = 3, total: int = -1, checksum: bool = True):
    node = Recorder()
    meta = {tt.KEY_CASE: case.id, tt.KEY_SEQ: seq, tt.KEY_SEED: seed, tt.KEY_TOTAL: total}
    at.send(node, "tensors", tt.make_tensor(case, seed, seq), meta, checksum=checksum)
    return node.sent[0]


def quiet_validator(**kwargs: Any) -> tuple[tt.Validator, list[str]]:
    lines: list[str] = []
    return tt.Validator(tt.ValidatorConfig(**kwargs), log=lines.append), lines


# -- cases ------------------------------------------------------------------------------------


def test_case_matrix_covers_every_dtype_and_layout():
    cases = tt.all_cases(SMALL)
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    assert {c.dtype for c in cases} == {d.name for d in _dtypes.ALL}
    assert {c.layout for c in cases} == set(tt.LAYOUTS)
    assert {c.layout for c in cases if c.framework == "torch"} == set(tt.LAYOUTS) - {"negative"}
    numpy_dtypes = {d.name for d in _dtypes.ALL if d.numpy}
    assert {c.dtype for c in cases if c.framework == "numpy"} == numpy_dtypes
    # sized layouts once per size, scalar and empty once
    per_dtype = [c for c in cases if c.framework == "torch" and c.dtype == "float32"]
    assert len(per_dtype) == 7 * len(SMALL) + 2


def test_case_ids_parse_back():
    for case in tt.all_cases(SMALL):
        assert tt.Case.parse(case.id) == case
    assert tt.Case.parse("torch/bfloat16/channels_last/64MiB").nbytes == 64 << 20


@pytest.mark.parametrize(
    "bad",
    [
        "torch/float32",
        "torch/float32/contiguous/lots",
        "jax/float32/contiguous/4KiB",
        "numpy/bfloat16/contiguous/4KiB",  # numpy has no bfloat16
        "torch/float32/negative/4KiB",  # torch has no negative strides
        "torch/float32/scalar/4KiB",
        "torch/float32/contiguous",
        "torch/float99/contiguous/4KiB",
    ],
)
def test_case_parse_rejects_what_we_never_generate(bad):
    with pytest.raises(MetadataError, match="case id"):
        tt.Case.parse(bad)


def test_select_cases_by_globs():
    chosen = tt.select_cases(["*/uint8/*/4KiB", "numpy/*/scalar"], SMALL)
    assert {c.id for c in chosen} >= {"torch/uint8/stepped/4KiB", "numpy/float64/scalar"}
    assert all(c.id.endswith("/4KiB") or c.layout == "scalar" for c in chosen)
    assert all(c.dtype == "uint8" or c.framework == "numpy" for c in chosen)


def test_select_cases_rejects_patterns_matching_nothing():
    with pytest.raises(ConfigError, match=r"match none of the \d+ cases .*torch/bool/contig"):
        tt.select_cases(["torch/float32/contiguous/3KiB"], SMALL)


# -- tensors ----------------------------------------------------------------------------------


def _strides(x: Any) -> tuple[int, ...]:
    return (
        tuple(x.stride())
        if isinstance(x, torch.Tensor)
        else tuple(s // x.itemsize for s in x.strides)
    )


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_layout_classes_have_their_memory_layout(framework):
    def make(layout: str, nbytes: int | None = 1 << 20) -> Any:
        return tt.make_tensor(tt.Case(framework, "float32", layout, nbytes), 0, 0)

    rows, cols = (1 << 18) // 64, 64
    assert _strides(make("contiguous")) == (cols, 1)
    assert _strides(make("transposed")) == (1, rows)
    assert _strides(make("stepped")) == (2 * cols, 2)
    assert _strides(make("expanded")) == (1, 0)
    assert _strides(make("stacked"))[-1] == 1
    assert make("stacked").shape == (2 * rows, 2, cols // 4)
    assert make("scalar").shape == ()
    assert tuple(make("empty").shape) == (3, 0, 5)
    nchw = make("channels_last")
    assert _strides(nchw)[1] == 1
    assert nchw.shape[1] == 4
    offset = make("offset")
    if framework == "torch":
        assert offset.storage_offset() == 1
        assert nchw.is_contiguous(memory_format=torch.channels_last)
    else:
        assert offset.base is not None
        assert offset.ctypes.data % 8 == 4
        assert _strides(make("negative")) == (-cols, -1)
    for layout in tt.SIZED_LAYOUTS:
        if framework == "numpy" or layout != "negative":
            assert make(layout).nbytes == 1 << 20, layout


def test_make_tensor_is_a_pure_function_of_seed_case_and_seq():
    case = tt.Case("torch", "bfloat16", "stepped", 4096)
    a, b = tt.make_tensor(case, 5, 9), tt.make_tensor(case, 5, 9)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert a.stride() == b.stride()
    for other in (tt.make_tensor(case, 6, 9), tt.make_tensor(case, 5, 10)):
        assert not torch.equal(a.view(torch.int16), other.view(torch.int16))


def test_bool_cases_hold_only_valid_bools():
    x = tt.make_tensor(tt.Case("numpy", "bool", "contiguous", 4096), 0, 0)
    assert set(np.unique(x.view(np.uint8))) == {0, 1}


def test_random_bits_tile_a_block_with_distinct_keys():
    bits = tt.random_bits([1, 2, 3], 3 << 20)
    assert bits.size == 3 << 20
    assert bits.flags.writeable
    assert bits.flags.c_contiguous
    blocks = bits.reshape(3, -1)
    assert not np.array_equal(blocks[0], blocks[1])
    assert np.array_equal(bits, tt.random_bits([1, 2, 3], 3 << 20))
    assert not np.array_equal(bits, tt.random_bits([1, 2, 4], 3 << 20))


def test_every_small_case_round_trips_exactly():
    failures = {}
    for seq, case in enumerate(tt.all_cases(SMALL)):
        expected = tt.make_tensor(case, 11, seq)
        array, meta = at.encode(expected, checksum=True)
        problem = tt.describe_mismatch(expected, at.decode(array, meta, verify=True))
        if problem:
            failures[case.id] = problem
    assert failures == {}


# -- comparison -------------------------------------------------------------------------------


def test_describe_mismatch_catches_bf16_arriving_as_fp16():
    x = tt.make_tensor(tt.Case("torch", "bfloat16", "contiguous", 4096), 0, 0)
    assert tt.describe_mismatch(x, x.view(torch.float16)) == (
        "dtype: expected torch bfloat16, received torch float16"
    )


def test_describe_mismatch_catches_framework_shape_layout_and_bytes():
    x = tt.make_tensor(tt.Case("torch", "float32", "transposed", 4096), 0, 0)
    assert tt.describe_mismatch(x, x) is None
    assert tt.describe_mismatch(x, x.numpy()).startswith("dtype: expected torch float32")
    assert tt.describe_mismatch(x, x.reshape(-1)).startswith("shape:")
    assert tt.describe_mismatch(x, x.contiguous()) == (
        "layout: expected strides [1, 16], received [64, 1]"
    )
    y = x.clone(memory_format=torch.preserve_format)
    y.numpy().T.reshape(-1).view(np.uint8)[5] ^= 1  # x.T is dense: flip byte 5 of memory
    assert tt.describe_mismatch(x, y).startswith("bytes: 1 of 4096 bytes differ")
    assert tt.describe_mismatch(x, [1, 2]) == "type: expected a tensor, got list"


def test_describe_mismatch_compares_nan_payloads_bitwise():
    x = np.array([np.nan], dtype=np.float32)
    y = x.view(np.uint32).copy()
    y[0] ^= 1  # another NaN: equal as "both NaN", different bits
    assert tt.describe_mismatch(x, y.view(np.float32)).startswith("bytes:")


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=1 << 30), st.sampled_from(["torch", "numpy"]))
def test_any_single_flipped_byte_is_caught(position, framework):
    case = tt.Case(framework, "float16", "channels_last", 4096)
    array, meta = message(case, 0, checksum=False)
    received = at.decode(tt.flip_byte(array, position), meta)
    assert tt.describe_mismatch(tt.make_tensor(case, 3, 0), received).startswith("bytes:")


def test_corrupting_node_leaves_the_source_tensor_alone():
    x = np.arange(1024, dtype=np.uint32)  # dense: encode is zero-copy over x
    node = Recorder()
    at.send(tt.CorruptingNode(node), "t", x, {tt.KEY_SEQ: 0})
    array, meta = node.sent[0]
    assert np.array_equal(x, np.arange(1024, dtype=np.uint32))
    assert np.count_nonzero(at.decode(array, meta) != x) == 1


# -- validator --------------------------------------------------------------------------------


def test_validator_passes_a_complete_stream_and_counts_per_class():
    cases = tt.select_cases(["*/float32/*", "numpy/uint8/*"], SMALL)
    validator, _ = quiet_validator()
    for seq, case in enumerate(cases):
        assert validator.handle(*message(case, seq, total=len(cases))) == "ok"
    report = validator.report()
    assert report["passed"]
    assert report["verdict"] == "PASS"
    assert report["unique"] == report["ok"] == report["expected_total"] == len(cases)
    assert report["dropped"] == report["corrupt"] == report["reordered"] == 0
    assert report["classes"]["negative"]["cases"] == 2 * len(SMALL)
    assert set(report["cases"]) == {c.id for c in cases}
    json.dumps(report)  # JSON-ready
    table = tt.format_table(report)
    assert "stacked" in table
    assert table.splitlines()[-1].startswith("PASS: ")


@pytest.mark.parametrize("checksum", [True, False])
def test_validator_fails_on_a_flipped_byte(checksum):
    case = tt.Case("torch", "uint8", "offset", 4096)
    array, meta = message(case, 0, total=1, checksum=checksum)
    validator, lines = quiet_validator()
    assert validator.handle(tt.flip_byte(array, 77), meta) == "corrupt"
    report = validator.report()
    assert not report["passed"]
    assert report["corrupt"] == 1
    assert report["reasons"] == ["1 corrupted message(s)"]
    detail = report["failures"][0]["detail"]
    assert detail.startswith("ChecksumError: checksum mismatch" if checksum else "bytes: 1 of 4096")
    assert any(
        line.startswith("validator: CORRUPT seq 0 torch/uint8/offset/4KiB") for line in lines
    )


def test_validator_counts_undecodable_and_skips_foreign_messages():
    case = tt.Case("numpy", "int16", "contiguous", 4096)
    array, meta = message(case, 0, total=2)
    validator, lines = quiet_validator()
    header = _schema.parse_text(meta[_schema.KEY_TENSOR])
    int99 = _schema.pack(header.framework, "int99", header.shape, header.perm)
    assert validator.handle(array, {**meta, _schema.KEY_TENSOR: int99}) == "undecodable"
    assert validator.handle(pa.array([1, 2]), {"camera": "front"}) == "foreign"
    assert validator.handle(*at.encode(np.zeros(3))) == "foreign"
    assert validator.handle(array, {**meta, tt.KEY_CASE: "numpy/int16/bogus/4KiB"}) == (
        "undecodable"
    )
    report = validator.report()
    assert report["foreign"] == 2
    assert report["undecodable"] == 2
    assert not report["passed"]
    assert "2 message(s) could not be decoded" in report["reasons"]
    assert any("not ours" in line and "camera" in line for line in lines)
    assert "unknown dtype 'int99'" in report["failures"][0]["detail"]


def test_validator_reports_drops_reordering_and_duplicates_apart_from_corruption():
    cases = tt.select_cases(["torch/int8/*/0B"], SMALL)
    messages = [message(case, seq, total=len(cases)) for seq, case in enumerate(cases)]
    validator, _ = quiet_validator(max_drop_fraction=0.5)
    for i in (0, 3, 2, 2, 5, 6):  # 1 and 4 dropped, 2 late, 2 twice
        validator.handle(*messages[i])
    report = validator.report()
    assert (report["dropped"], report["reordered"], report["duplicates"]) == (2, 1, 1)
    assert report["missing_seqs"] == [1, 4]
    assert report["corrupt"] == 0
    assert report["passed"]
    strict, _ = quiet_validator(max_drop_fraction=0.1)
    for i in (0, 3, 2, 5, 6):
        strict.handle(*messages[i])
    assert strict.report()["reasons"] == [
        "2 of 7 messages dropped, more than the allowed MAX_DROP_FRACTION=0.1"
    ]


def test_end_marker_gives_the_total_even_for_a_duration_run():
    case = tt.Case("numpy", "uint8", "scalar")
    validator, _ = quiet_validator()
    validator.handle(*message(case, 0, total=-1))
    assert validator.report()["total_known"] is False
    end = {tt.KEY_END: True, tt.KEY_TOTAL: 3, tt.KEY_SEED: 3}
    assert validator.handle(at.encode(np.array(3))[0], end) == "end"
    report = validator.report()
    assert report["expected_total"] == 3
    assert report["dropped"] == 2
    assert report["end_marker"]


def test_validator_fails_when_nothing_arrived():
    validator, _ = quiet_validator()
    report = validator.report()
    assert not report["passed"]
    assert report["reasons"] == ["no test message arrived"]


def test_write_report_creates_parents(tmp_path):
    validator, _ = quiet_validator()
    path = tt.write_report(validator.report(), tmp_path / "a" / "b" / "report.json")
    assert json.loads(path.read_text())["verdict"] == "FAIL"


# -- configuration ----------------------------------------------------------------------------


def test_source_config_from_env():
    config = tt.SourceConfig.from_env(
        {"SEED": "9", "CASES": "torch/*, numpy/uint8/*", "SIZES": "0,1MiB", "DURATION": "5s"}
    )
    assert config.seed == 9
    assert config.cases == ("torch/*", "numpy/uint8/*")
    assert config.sizes == (0, 1 << 20)
    assert config.duration == 5.0
    assert tt.SourceConfig.from_env({}) == tt.SourceConfig()
    assert tt.SourceConfig.from_env({"ARROW_TENSOR_TEST_CORRUPT": "1"}).corrupt


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SEED": "-1"}, "SEED='-1' is invalid: expected an integer from 0"),
        ({"DEVICE": "tpu"}, "DEVICE='tpu' is invalid: expected one of auto, cpu, cuda"),
        ({"SIZES": "4KiB,big"}, "SIZES='4KiB,big' is invalid"),
        ({"ROUNDS": "0"}, "ROUNDS='0' is invalid: expected an integer >= 1"),
    ],
)
def test_source_config_rejects_bad_values(environ, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        tt.SourceConfig.from_env(environ)


def test_validator_config_from_env():
    config = tt.ValidatorConfig.from_env({"MAX_DROP_FRACTION": "0.05", "REPORT_PATH": "r.json"})
    assert config.max_drop_fraction == 0.05
    assert config.report_path == "r.json"
    with pytest.raises(ConfigError, match=r"^MAX_DROP_FRACTION='2' is invalid: expected a number"):
        tt.ValidatorConfig.from_env({"MAX_DROP_FRACTION": "2"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_device_cuda_without_gpu_is_a_clear_error_and_auto_falls_back():
    assert tt.resolve_device("auto") == "cpu"
    assert tt.resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="DEVICE='cuda' but torch sees no CUDA device"):
        tt.resolve_device("cuda")


class FakeSample:
    """dora's raw sample: a writable buffer sent when the context exits."""

    def __init__(self, nbytes: int, sent: list[bytes]) -> None:
        self.buffer, self.sent = bytearray(nbytes), sent

    def __enter__(self) -> bytearray:
        return self.buffer

    def __exit__(self, *exc_info: Any) -> None:
        self.sent.append(bytes(self.buffer))


def test_corrupting_node_also_flips_raw_samples():
    sent: list[bytes] = []

    class RawNode(Recorder):
        def send_output_raw(self, output_id: str, nbytes: int, metadata: Any = None):
            return FakeSample(nbytes, sent)

    with tt.CorruptingNode(RawNode()).send_output_raw("t", 64, {tt.KEY_SEQ: 1}) as buf:
        buf[:] = bytes(range(64))
    assert len(sent) == 1
    flipped = [i for i in range(64) if sent[0][i] != i]
    assert flipped == [7919 % 64]
    assert sent[0][7919 % 64] == (7919 % 64) ^ 1


@pytest.mark.parametrize("checksum", [True, False])
def test_validator_reassembles_chunked_values_and_numbers_them_once(monkeypatch, checksum):
    from arrow_tensor.transport import _send

    monkeypatch.setattr(_send, "max_chunk_payload", lambda cap, width: 1000)
    cases = tt.select_cases(["torch/float32/stepped/4KiB", "numpy/int64/negative/4KiB"], SMALL)
    node = Recorder()
    for seq, case in enumerate(cases):
        meta = {tt.KEY_CASE: case.id, tt.KEY_SEQ: seq, tt.KEY_SEED: 0, tt.KEY_TOTAL: 2}
        meta[tt.KEY_CHECKSUMMED] = checksum
        tensor = tt.make_tensor(case, 0, seq)
        at.send(node, "t", tensor, meta, checksum=checksum, transport="chunked")
    assert all(meta["at.kind"] == "chunk" for _, meta in node.sent)
    assert len(node.sent) >= 10  # 4096 bytes in chunks of at most 1000, twice
    validator, _ = quiet_validator()
    outcomes = [validator.handle(array, meta) for array, meta in node.sent]
    assert outcomes.count("ok") == 2
    assert outcomes.count("incomplete") == len(node.sent) - 2
    report = validator.report()
    assert report["passed"]
    assert (report["unique"], report["duplicates"], report["ok"]) == (2, 0, 2)
