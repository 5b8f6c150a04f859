"""arrow_tensor._config: typed node settings from environment variables."""

from __future__ import annotations

import pytest
from arrow_tensor import ConfigError
from arrow_tensor import config as cfg
from hypothesis import given
from hypothesis import strategies as st


def read(raw: str | None, parse, default=None):
    environ = {} if raw is None else {"VAR": raw}
    return cfg.setting("VAR", parse, default, environ=environ)


@pytest.mark.parametrize("raw", [None, "", "   "])
def test_unset_or_blank_gives_default_unparsed(raw):
    sentinel = object()
    assert read(raw, cfg.integer(), sentinel) is sentinel


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("ARROW_TENSOR_TEST_SETTING", " 42 ")
    assert cfg.setting("ARROW_TENSOR_TEST_SETTING", cfg.integer(), 0) == 42


@pytest.mark.parametrize(
    ("parse", "raw", "expected"),
    [
        (cfg.integer(), "-3", -3),
        (cfg.integer(0), "1_000", 1000),
        (cfg.number(0, 1), "0.25", 0.25),
        (cfg.boolean, "YES", True),
        (cfg.boolean, "off", False),
        (cfg.boolean, "1", True),
        (cfg.choice("auto", "cpu", "cuda"), "CUDA", "cuda"),
        (cfg.text, "out/r.json", "out/r.json"),
        (cfg.text_list, "a, b/*,c", ["a", "b/*", "c"]),
        (cfg.size, "0", 0),
        (cfg.size, "4096", 4096),
        (cfg.size, "4KiB", 4096),
        (cfg.size, "64MB", 64 << 20),
        (cfg.size, "1.5 GiB", 3 << 29),
        (cfg.size, "2k", 2048),
        (cfg.size_list(), "0,4KiB,1MiB,64MiB", [0, 4096, 1 << 20, 64 << 20]),
        (cfg.duration, "30", 30.0),
        (cfg.duration, "500ms", 0.5),
        (cfg.duration, "2m", 120.0),
        (cfg.duration, "1.5s", 1.5),
    ],
)
def test_parsers_accept(parse, raw, expected):
    assert read(raw, parse) == expected


@pytest.mark.parametrize(
    ("parse", "raw", "message"),
    [
        (cfg.integer(0), "-1", "VAR='-1' is invalid: expected an integer >= 0"),
        (cfg.integer(1, 5), "six", "VAR='six' is invalid: expected an integer from 1 to 5"),
        (cfg.number(0, 1), "1.5", "VAR='1.5' is invalid: expected a number from 0 to 1"),
        (cfg.number(), "nan", "VAR='nan' is invalid: expected a number"),
        (cfg.boolean, "maybe", "VAR='maybe' is invalid: expected a boolean, one of 1/true/yes"),
        (cfg.choice("auto", "cpu"), "gpu", "VAR='gpu' is invalid: expected one of auto, cpu"),
        (cfg.text_list, "a,,b", "VAR='a,,b' is invalid: expected a comma-separated list"),
        (cfg.size, "4 bananas", "VAR='4 bananas' is invalid: expected a size in bytes like 0"),
        (cfg.size, "0.5B", "VAR='0.5B' is invalid: expected a whole number of bytes"),
        (cfg.size, "-4KiB", "VAR='-4KiB' is invalid: expected a size in bytes"),
        (cfg.size_list(), "0,4KB,lots", "VAR='0,4KB,lots' is invalid: expected a comma-separated"),
        (cfg.duration, "soon", "VAR='soon' is invalid: expected a duration like 30, 30s"),
    ],
)
def test_bad_values_name_variable_value_and_expectation(parse, raw, message):
    with pytest.raises(ConfigError) as info:
        read(raw, parse)
    assert str(info.value).startswith(message)


def test_config_error_is_an_arrow_tensor_error():
    from arrow_tensor import ArrowTensorError

    assert issubclass(ConfigError, ArrowTensorError)


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_round_trips_through_size(nbytes):
    label = cfg.format_size(nbytes)
    assert cfg.size(label) == nbytes


@pytest.mark.parametrize(
    ("nbytes", "label"),
    [(0, "0B"), (100, "100B"), (4096, "4KiB"), (1 << 20, "1MiB"), (64 << 20, "64MiB")],
)
def test_format_size_labels(nbytes, label):
    assert cfg.format_size(nbytes) == label
