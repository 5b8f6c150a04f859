"""The memory room: shared memory and CUDA allocations that outlive a message.

``_slots`` is the lifetime machinery (who may still read a slot, without atomics);
``_blocks`` the block files every kind of loaned memory is tracked in (names, create /
attach / validate, orphan sweep, crash notices); ``_host_pool`` and ``_host_mapped`` the
host pool on the producing and receiving side; ``cuda`` the CUDA IPC descriptors and the
narrow backend interface to device memory, with its CPU stand-in. This room imports only
the codec (and the settings helper), never calls up, never sends: a full pool answers
"no" and the transport decides what happens next. See ARCHITECTURE.md.
"""

from __future__ import annotations

from ._blocks import Identity, set_identity

__all__ = ["Identity", "set_identity"]
