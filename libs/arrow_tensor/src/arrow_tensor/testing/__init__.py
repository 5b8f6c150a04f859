"""Deterministic test tensors and the end-to-end integrity check behind the shipped nodes.

``nodes/tensor_source`` sends, and ``nodes/validator`` checks, one message per *case*: a
framework x dtype x layout class x size, e.g. ``torch/bfloat16/channels_last/1MiB``. Every
tensor is a pure function of (seed, case id, sequence number), which travel in the message's
metadata, so the validator regenerates exactly what was sent and compares dtype, shape,
layout class and bytes. Messages are numbered: drops and reordering (dora's delivery is
lossy) are reported apart from corruption, which always fails.

The pieces: ``_cases`` (cases, deterministic tensors, comparison), ``_source`` (the
sending side with its flow control) and ``_validator`` (the checking side and its report).
"""

from __future__ import annotations

from ._cases import (
    DEFAULT_SIZES,
    FIXED_LAYOUTS,
    KEY_CASE,
    KEY_CHECKSUMMED,
    KEY_END,
    KEY_HELLO,
    KEY_SEED,
    KEY_SEQ,
    KEY_TOTAL,
    LAYOUTS,
    SIZED_LAYOUTS,
    Case,
    all_cases,
    describe_mismatch,
    import_frameworks,
    make_tensor,
    random_bits,
    resolve_device,
    select_cases,
)
from ._source import CorruptingNode, SourceConfig, flip_byte, run_source
from ._validator import Validator, ValidatorConfig, format_table, run_validator, write_report

__all__ = [
    "DEFAULT_SIZES",
    "FIXED_LAYOUTS",
    "KEY_CASE",
    "KEY_CHECKSUMMED",
    "KEY_END",
    "KEY_HELLO",
    "KEY_SEED",
    "KEY_SEQ",
    "KEY_TOTAL",
    "LAYOUTS",
    "SIZED_LAYOUTS",
    "Case",
    "CorruptingNode",
    "SourceConfig",
    "Validator",
    "ValidatorConfig",
    "all_cases",
    "describe_mismatch",
    "flip_byte",
    "format_table",
    "import_frameworks",
    "make_tensor",
    "random_bits",
    "resolve_device",
    "run_source",
    "run_validator",
    "select_cases",
    "write_report",
]
