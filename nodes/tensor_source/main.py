"""tensor_source: sends every configured test case once per round, then an end marker.

Settings come from the node's ``env:`` in the dataflow YAML; see
``arrow_tensor.testing.SourceConfig.from_env`` (SEED, CASES, SIZES, ROUNDS, DURATION, RATE,
DEVICE, CHECKSUM, WINDOW, WINDOW_BYTES, ACK_TIMEOUT). Output ``tensors``; input ``ack`` from
the validator paces the sends (Note [Flow control] in arrow_tensor.testing).
"""

from __future__ import annotations

import sys
from typing import Any

from arrow_tensor import ConfigError, testing
from arrow_tensor.node import dora_node


def main(node: Any = None) -> dict[str, Any]:
    """Run the source on ``node`` (a ``dora.Node`` unless one is given, e.g. a MockNode)."""
    try:  # bad settings (also CASES matching nothing, DEVICE=cuda without GPU): one clear line
        config = testing.SourceConfig.from_env()
        if node is None:
            testing.import_frameworks()  # seconds of torch import, before dora starts the clock
            node = dora_node()
        return testing.run_source(node, config)
    except ConfigError as exc:
        sys.exit(f"tensor_source: {exc}")


if __name__ == "__main__":
    main()
