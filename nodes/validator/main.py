"""validator: checks every message from tensor_source, prints PASS/FAIL and a JSON report.

Settings come from the node's ``env:`` in the dataflow YAML; see
``arrow_tensor.testing.ValidatorConfig.from_env`` (REPORT_PATH, MAX_DROP_FRACTION, VERIFY,
PROGRESS_INTERVAL). Input ``tensors``; output ``ack`` paces the source. Exits 1 on any
corruption, undecodable message, too many drops, or when nothing arrived.
"""

from __future__ import annotations

import sys
from typing import Any

from arrow_tensor import ConfigError, testing
from arrow_tensor.node import dora_node


def main(node: Any = None) -> int:
    """Validate until the input closes; return the exit code (0 only for PASS)."""
    try:  # bad settings fail before joining the dataflow, with one clear line
        config = testing.ValidatorConfig.from_env()
    except ConfigError as exc:
        sys.exit(f"validator: {exc}")
    if node is None:
        testing.import_frameworks()  # seconds of torch import, before dora starts the clock
        node = dora_node()
    report = testing.run_validator(node, config)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
