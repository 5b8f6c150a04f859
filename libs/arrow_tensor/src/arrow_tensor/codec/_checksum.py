"""Content checksums: xxh3-64 over the canonical header text and the wire payload."""

from __future__ import annotations

from typing import Any

from .._errors import ChecksumError, MetadataError

ALGORITHM = "xxh3_64"


def digest(header_text: str, payload: Any) -> str:
    """``"xxh3_64:<16 hex digits>"`` of the UTF-8 header text followed by the payload bytes."""
    import xxhash

    h = xxhash.xxh3_64()
    h.update(header_text.encode())
    h.update(memoryview(payload).cast("B"))
    return f"{ALGORITHM}:{h.hexdigest()}"


def verify(expected: object, header_text: str, payload: Any) -> None:
    """Raise ChecksumError unless ``payload`` under ``header_text`` hashes to ``expected``."""
    if expected is None:
        raise ChecksumError(
            "verify=True but the message carries no checksum; encode with checksum=True"
        )
    if not isinstance(expected, str) or not expected.startswith(ALGORITHM + ":"):
        raise MetadataError(f"checksum must be a str 'xxh3_64:<hex>', got {expected!r:.80}")
    actual = digest(header_text, payload)
    if actual != expected:
        raise ChecksumError(
            f"checksum mismatch: message says {expected}, received content hashes to {actual} "
            f"(dtype, shape, layout or bytes changed in transit)"
        )
