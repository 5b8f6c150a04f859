"""What the transport tells users once per output: a dora pool too small, the host path."""

from __future__ import annotations

from ._decide import RAW_MIN_BYTES
from ._facts import OutputState


def pool_advice(message_bytes: int, pool_bytes: int, in_flight: int = 2) -> str | None:
    """The YAML line a node needs, or None when its pool holds its messages.

    dora keeps a sample in the pool until every receiver drops it, so a pool must hold the
    messages in flight at once, at least two, or sends take dora's slow path (see
    benchmarks/README.md). Chunks of one value are all in flight. dora reads "MB" as MiB;
    the advice is a power of two with a quarter to spare.
    """
    need = max(in_flight, 2) * message_bytes
    if message_bytes < RAW_MIN_BYTES or need <= pool_bytes:
        return None
    megabytes = 1 << max(0, (-(-need * 5 // 4) - 1).bit_length() - 20)
    text = f"{megabytes // 1024}GB" if megabytes >= 1024 else f"{megabytes}MB"
    return f"shared_memory_pool_size: {text}"


def check_pool(
    state: OutputState, message_bytes: int, in_flight: int = 2, payload_bytes: int | None = None
) -> None:
    """Warn, before the message goes, when dora's pool of this node cannot hold it.

    Said once per output and advised size: a larger value that needs a larger pool is said
    again. ``payload_bytes`` is the value's own size (the message adds the header and
    dora's framing: its validity bitmap).
    """
    need = max(in_flight, 2) * message_bytes
    if need <= state.pool_checked:
        return  # this much was found to fit before
    advice = pool_advice(message_bytes, state.facts.pool_bytes, in_flight)
    if advice is None:
        state.pool_checked = need
        return
    name = state.facts.node_id or "<this node>"
    pool = state.facts.pool_bytes
    what = f"{message_bytes / 2**20:.1f} MiB messages"
    if payload_bytes is not None:
        what = (
            f"{payload_bytes / 2**20:.1f} MiB values ({what} with arrow_tensor's header and "
            f"dora's framing)"
        )
    state.warn_once(
        f"pool:{advice}",
        f"arrow_tensor: output {state.facts.output_id!r} sends {what}; node {name}'s dora "
        f"shared-memory pool ({pool / 2**20:.1f} MiB) cannot hold {max(in_flight, 2)} of them "
        f"at once, so dora silently falls back to its daemon path (much slower, out of order, "
        f"fails over 64 MiB). Fix: add `{advice}` to node {name} in the dataflow YAML (a node "
        f"whose receivers keep values a while needs more). (Said once per output and size.)",
    )


def host_path(state: OutputState, reason: str) -> None:
    """Say once per output and reason that CUDA tensors go through a host copy."""
    state.warn_once(
        "host:" + reason.split(" (")[0][:60],
        f"arrow_tensor: output {state.facts.output_id!r} sends CUDA tensors by the host path "
        f"(one device-to-host copy per message) because {reason}",
    )
