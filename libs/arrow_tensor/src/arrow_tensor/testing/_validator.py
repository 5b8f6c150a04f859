"""The checking side of the integrity check: every message against its regenerated tensor.

Outcomes per message are counted apart: corruption always fails, drops and reordering
(dora's delivery is lossy) are reported separately; see ``Validator``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from .. import config as _config
from .._errors import ArrowTensorError, ChecksumError, MetadataError
from ..transport._messages import Receiver
from ._cases import (
    KEY_CASE,
    KEY_CHECKSUMMED,
    KEY_END,
    KEY_HELLO,
    KEY_SEED,
    KEY_SEQ,
    KEY_TOTAL,
    Case,
    Log,
    _host_bits,
    _print,
    describe_mismatch,
    make_tensor,
)

_MAX_FAILURES_KEPT = 50

# --------------------------------------------------------------------------------------------
# Validator


@dataclass(frozen=True)
class ValidatorConfig:
    """Settings of ``nodes/validator`` (see :meth:`from_env` for the variables)."""

    report_path: str = "out/arrow_tensor_report.json"
    max_drop_fraction: float = 0.0
    verify: str = "auto"
    progress_interval: float = 1.0
    input: str = "tensors"
    ack_output: str = "ack"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ValidatorConfig:
        """Read the validator settings from environment variables.

        ``REPORT_PATH`` (JSON report, relative to the dataflow's folder),
        ``MAX_DROP_FRACTION`` (0..1: dropped messages alone fail the run above this share),
        ``VERIFY`` (``auto|on|off``: checksum verification; ``auto`` verifies messages that
        carry one) and ``PROGRESS_INTERVAL`` (seconds between progress lines).

        Raises
        ------
        ConfigError
            Naming the variable, the value and what was expected.
        """
        d = cls()
        get = _config.setting
        return cls(
            report_path=get("REPORT_PATH", _config.text, d.report_path, environ=environ),
            max_drop_fraction=get(
                "MAX_DROP_FRACTION", _config.number(0, 1), d.max_drop_fraction, environ=environ
            ),
            verify=get("VERIFY", _config.choice("auto", "on", "off"), d.verify, environ=environ),
            progress_interval=get(
                "PROGRESS_INTERVAL", _config.duration, d.progress_interval, environ=environ
            ),
        )


@dataclass
class _Tally:
    cases: set[str] = field(default_factory=set)
    messages: int = 0
    ok: int = 0
    corrupt: int = 0
    undecodable: int = 0
    bytes: int = 0


class Validator:
    """Checks received messages against regenerated tensors and keeps the counts.

    Feed it every message of the validated input with :meth:`handle`; :meth:`report` gives
    the verdict. Outcomes per message: ``ok``, ``corrupt`` (dtype, shape, layout, bytes or
    checksum differ), ``undecodable`` (ours, but arrow_tensor or the case id rejects it),
    ``foreign`` (not from tensor_source: logged, counted, skipped) or ``end`` (the marker).
    """

    def __init__(self, config: ValidatorConfig | None = None, log: Log = _print) -> None:
        self.config = config or ValidatorConfig()
        self.log = log
        self._receivers = {verify: Receiver(verify=verify) for verify in (False, True)}
        self.start = time.monotonic()
        self._last_progress = self.start
        self.seen: set[int] = set()
        self.highest = -1
        self.duplicates = self.reordered = self.foreign = 0
        self.announced_total: int | None = None
        self.end_total: int | None = None
        self.seeds: set[int] = set()
        self.classes: dict[str, _Tally] = {}
        self.cases: dict[str, _Tally] = {}
        self.failures: list[dict[str, Any]] = []
        self.last_seq: int | None = None

    # one message ----------------------------------------------------------------------------
    def handle(self, array: Any, metadata: Mapping[str, Any]) -> str:
        """Check one received message; returns its outcome (see the class docstring)."""
        self.last_seq = None
        meta = metadata if isinstance(metadata, Mapping) else {}
        if meta.get(KEY_END) is True:
            total = meta.get(KEY_TOTAL)
            if isinstance(total, int) and total >= 0:
                self.end_total = total
                return "end"
        if meta.get(KEY_HELLO) is True:
            self.last_seq = -1  # acknowledged, so the source knows we are listening
            return "hello"
        if KEY_CASE not in meta or not isinstance(meta.get(KEY_SEQ), int):
            return self.skip(meta, "it has no test.case/test.seq metadata")
        seq, case_id, seed = meta[KEY_SEQ], meta[KEY_CASE], meta.get(KEY_SEED)
        total = meta.get(KEY_TOTAL)
        if isinstance(total, int) and total >= 0:
            self.announced_total = total
        # The source says whether it attached checksums, identically on every chunk of a value.
        verify = self.config.verify == "on" or (
            self.config.verify == "auto" and meta.get(KEY_CHECKSUMMED, "at.checksum" in meta)
        )
        layout = None
        try:
            case = Case.parse(case_id)
            layout = case.layout
            if not isinstance(seed, int):
                raise MetadataError(f"{KEY_SEED!r} must be an int, got {seed!r:.40}")
            received = self._receivers[bool(verify)].receive(array, meta)
        except ArrowTensorError as exc:
            outcome = "corrupt" if isinstance(exc, ChecksumError) else "undecodable"
            self._number(seq)
            self._record(str(case_id), layout, outcome, 0, seq, f"{type(exc).__name__}: {exc}")
            return outcome
        if received is None:
            return "incomplete"  # one chunk of a larger value: numbered once it is whole
        self._number(seq)
        self.seeds.add(seed)
        expected = make_tensor(case, seed, seq)
        problem = describe_mismatch(expected, received)
        outcome = "ok" if problem is None else "corrupt"
        self._record(case.id, layout, outcome, int(_host_bits(expected).nbytes), seq, problem)
        return outcome

    def skip(self, meta: Mapping[str, Any], why: str) -> str:
        """Count (and log, the first ten) a message that is not ours; returns ``"foreign"``."""
        self.foreign += 1
        if self.foreign <= 10:
            keys = sorted(k for k in meta if k != "timestamp")[:8]
            self.log(f"validator: skipping a message that is not ours ({why}; keys {keys})")
        return "foreign"

    def _number(self, seq: int) -> None:
        self.last_seq = seq
        if seq in self.seen:
            self.duplicates += 1
        elif seq < self.highest:
            self.reordered += 1
        self.seen.add(seq)
        self.highest = max(self.highest, seq)

    def _record(
        self, case_id: str, layout: str | None, outcome: str, nbytes: int, seq: int, why: Any
    ) -> None:
        for tally in (
            self.classes.setdefault(layout or "(unknown)", _Tally()),
            self.cases.setdefault(case_id, _Tally()),
        ):
            tally.cases.add(case_id)
            tally.messages += 1
            tally.bytes += nbytes
            setattr(tally, outcome, getattr(tally, outcome) + 1)
        if outcome != "ok":
            if len(self.failures) < _MAX_FAILURES_KEPT:
                self.failures.append({"seq": seq, "case": case_id, "kind": outcome, "detail": why})
            if len(self.failures) <= 10:
                self.log(f"validator: {outcome.upper()} seq {seq} {case_id}: {why}")

    # progress and verdict -------------------------------------------------------------------
    def _sum(self, name: str) -> int:
        return sum(getattr(t, name) for t in self.classes.values())

    def progress_line(self) -> str:
        """One line: messages checked of expected, MiB, problems so far."""
        total = self.end_total if self.end_total is not None else self.announced_total
        of = f"/{total}" if total is not None else ""
        return (
            f"validator: {self._sum('messages')}{of} messages, {self._sum('bytes') / 2**20:.1f} "
            f"MiB checked, {self._sum('corrupt')} corrupt, {self._sum('undecodable')} "
            f"undecodable, {self.reordered} reordered, {self.foreign} foreign"
        )

    def maybe_progress(self) -> None:
        """Log :meth:`progress_line` if ``progress_interval`` has passed since the last one."""
        now = time.monotonic()
        if now - self._last_progress >= self.config.progress_interval:
            self._last_progress = now
            self.log(self.progress_line())

    def _missing(self, total: int | None, limit: int) -> list[int]:
        end = total if total is not None else self.highest + 1
        return [seq for seq in range(end) if seq not in self.seen][:limit]

    def close(self) -> None:
        """End of stream: log chunked values that never completed (their seqs count as drops)."""
        for receiver in self._receivers.values():
            try:
                receiver.close()
            except ArrowTensorError as exc:
                self.log(f"validator: incomplete value(s) at the end of the stream: {exc}")

    def report(self) -> dict[str, Any]:
        """The verdict and every count, as a JSON-ready dict (``passed`` is the verdict)."""
        total = self.end_total if self.end_total is not None else self.announced_total
        unique = len(self.seen)
        dropped = (total if total is not None else self.highest + 1) - unique
        dropped = max(dropped, 0)
        denominator = max(total or 0, unique + dropped, 1)
        corrupt, undecodable = self._sum("corrupt"), self._sum("undecodable")
        reasons = []
        if corrupt:
            reasons.append(f"{corrupt} corrupted message(s)")
        if undecodable:
            reasons.append(f"{undecodable} message(s) could not be decoded")
        if unique == 0:
            reasons.append("no test message arrived")
        if dropped / denominator > self.config.max_drop_fraction:
            reasons.append(
                f"{dropped} of {denominator} messages dropped, more than the allowed "
                f"MAX_DROP_FRACTION={self.config.max_drop_fraction:g}"
            )
        elapsed = time.monotonic() - self.start
        return {
            "passed": not reasons,
            "verdict": "FAIL" if reasons else "PASS",
            "reasons": reasons,
            "expected_total": total,
            "total_known": total is not None,
            "end_marker": self.end_total is not None,
            "seeds": sorted(self.seeds),
            "received": self._sum("messages"),
            "unique": unique,
            "ok": self._sum("ok"),
            "corrupt": corrupt,
            "undecodable": undecodable,
            "dropped": dropped,
            "drop_fraction": dropped / denominator,
            "max_drop_fraction": self.config.max_drop_fraction,
            "missing_seqs": self._missing(total, 100),
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "foreign": self.foreign,
            "bytes": self._sum("bytes"),
            "seconds": round(elapsed, 3),
            "classes": {k: _tally_json(t) for k, t in sorted(self.classes.items())},
            "cases": {k: _tally_json(t, with_cases=False) for k, t in sorted(self.cases.items())},
            "failures": self.failures,
            "config": asdict(self.config),
        }


def _tally_json(tally: _Tally, with_cases: bool = True) -> dict[str, Any]:
    out = asdict(tally)
    out.pop("cases")
    if with_cases:
        out["cases"] = len(tally.cases)
    return out


def format_table(report: Mapping[str, Any]) -> str:
    """The per-layout-class summary table and the verdict line of a validator report."""
    head = f"{'layout class':<14} {'cases':>6} {'msgs':>6} {'ok':>6} {'corrupt':>8} "
    head += f"{'undecod.':>8} {'MiB':>9}"
    lines = [head, "-" * len(head)]
    rows = list(report["classes"].items())
    totals = {
        k: sum(r[k] for _, r in rows) for k in ("cases", "messages", "ok", "corrupt", "bytes")
    }
    totals["undecodable"] = sum(r["undecodable"] for _, r in rows)
    for name, r in [*rows, ("TOTAL", totals)]:
        if name == "TOTAL":
            lines.append("-" * len(head))
        lines.append(
            f"{name:<14} {r['cases']:>6} {r['messages']:>6} {r['ok']:>6} {r['corrupt']:>8} "
            f"{r['undecodable']:>8} {r['bytes'] / 2**20:>9.1f}"
        )
    total = report["expected_total"]
    lines.append(
        f"{report['verdict']}: {report['unique']} of {total if total is not None else '?'} "
        f"messages arrived, {report['corrupt']} corrupt, {report['undecodable']} undecodable, "
        f"{report['dropped']} dropped, {report['reordered']} reordered, "
        f"{report['duplicates']} duplicated, {report['foreign']} foreign, "
        f"in {report['seconds']:.1f} s"
    )
    lines.extend(f"  - {reason}" for reason in report["reasons"])
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``report`` as JSON to ``path`` (parents created, replaced atomically)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(target)
    return target


def run_validator(node: Any, config: ValidatorConfig, log: Log = _print) -> dict[str, Any]:
    """Validate every message on ``config.input`` of ``node`` until its events end.

    Keeps iterating after STOP: dora delivers STOP ahead of inputs still queued. Acks each
    checked message on ``config.ack_output`` when the node declares that output. Writes the
    JSON report to ``config.report_path`` and logs the table.

    Returns
    -------
    The report (see :meth:`Validator.report`).
    """
    validator = Validator(config, log)
    outputs = (node.node_config() or {}).get("outputs") or []
    ack = config.ack_output if config.ack_output in outputs else None
    for event in node:
        kind = event.get("type")
        if kind == "ERROR":
            log(f"validator: dora reported an error: {event.get('error', event)!r:.200}")
        if kind != "INPUT":
            continue
        if event.get("id") != config.input:
            validator.skip(event.get("metadata") or {}, f"it came on input {event.get('id')}")
            continue
        validator.handle(event["value"], event.get("metadata") or {})
        if ack is not None and validator.last_seq is not None:
            node.send_output(ack, pa.array([validator.last_seq], pa.int64()))
        validator.maybe_progress()
    validator.close()
    report = validator.report()
    path = write_report(report, config.report_path)
    log(validator.progress_line())
    log(format_table(report))
    log(f"validator: report written to {path.resolve()}")
    return report
