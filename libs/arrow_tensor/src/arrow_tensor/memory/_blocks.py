"""Block files: the owner-only /dev/shm files every kind of loaned memory is tracked in.

Note [Block files]
A *block file* is one POSIX shared-memory file named ``at-<dataflow>-<producer pid>-<128
random bits>``, created 0600 and ``O_EXCL`` by the one process that writes it. It starts
with a control block (``_slots``: slots, receivers, generations) whose first owner words
say which dataflow made it and which memory kind it tracks: the host pool keeps its
payload slots in the same file after the control block (``_host_pool``), the CUDA
transport keeps only the control block and lets the slots stand for device allocations
(``cuda._ipc``). Everything both kinds share lives here: the name and its grammar, create
and attach with every check a receiver must make before it trusts a file (regular file,
owned by this user, mode 600, sizes that agree, the dataflow's words, this node listed as
a receiver), the orphan sweep of files whose producer pid is gone, and crash notices.

Crash notices. A producer *announces* each block it creates; when it dies, whoever runs
the dataflow tells every process that *watched* the block, and those unlink its name
(``dropped``). Inside dora that is the daemon's extension table; this room does not know
dora, so the transport installs the implementation (``set_notices``). Without one
(outside dora, in unit tests) nothing is announced and the exit and start-up sweeps clean
up instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
import secrets
import stat
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .._errors import ShmHandleError, StaleHandleError
from ._slots import (
    MAX_RECEIVERS,
    MAX_SLOTS,
    ControlBlock,
    ProducerSlots,
    ReceiverSlots,
    block_words,
    pid_alive,
    pid_running,
    receiver_key,
)

SHM_DIR = "/dev/shm"
PAGE = mmap.PAGESIZE
NAME = re.compile(r"^at-([0-9a-f]{32})-([0-9]{1,10})-([0-9a-f]{32})$")
"""A block file's name: dataflow (32 hex digits), producer pid, 128 random bits."""
KIND_HOST = 1
"""Memory kind of a host pool: payload slots follow the control block in the file."""
KIND_CUDA = 2
"""Memory kind of a CUDA in-flight table: the slots stand for device allocations."""
ANONYMOUS = ""
"""Node id of a process outside dora (or of a bare ``encode``): exactly one receiver."""
# Owner words of every control block; a memory kind's own words follow.
_O_DATAFLOW_HI, _O_DATAFLOW_LO, _O_KIND = range(3)
KIND_WORDS = 3
"""Index of the first owner word a memory kind may use for itself."""


def round_up(n: int, unit: int) -> int:
    """``n`` rounded up to a multiple of ``unit``."""
    return -(-n // unit) * unit


# Identity ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """Who this process is in the dataflow: what names and handles are checked against."""

    dataflow_id: str
    node_id: str

    @property
    def dataflow_hex(self) -> str:
        """32 hex digits naming the dataflow (its uuid, or a hash of a non-uuid id)."""
        try:
            return uuid.UUID(self.dataflow_id).hex
        except ValueError:
            return hashlib.blake2b(self.dataflow_id.encode(), digest_size=16).hexdigest()

    @property
    def words(self) -> tuple[int, int]:
        """The dataflow as the two owner words of a control block."""
        raw = bytes.fromhex(self.dataflow_hex)
        return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


_identity: Identity | None = None


def node_config_fields(config: str) -> dict[str, str]:
    """The top-level ``key: value`` lines of dora's ``DORA_NODE_CONFIG`` text, unquoted."""
    fields = {}
    for line in config.splitlines():
        if line[:1].isalpha() and ":" in line:
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip().strip("'\"")
    return fields


def identity() -> Identity:
    """This node's identity, read once from ``DORA_NODE_CONFIG`` (dora sets it per node).

    Raises
    ------
    ShmHandleError
        Outside a dora node (no ``dataflow_id`` / ``node_id`` there).
    """
    global _identity
    if _identity is None:
        fields = node_config_fields(os.environ.get("DORA_NODE_CONFIG", ""))
        dataflow, node = fields.get("dataflow_id", ""), fields.get("node_id", "")
        if not dataflow or not node:
            raise ShmHandleError(
                "shared-memory handles can only be read inside a dora node "
                "(DORA_NODE_CONFIG lacks dataflow_id/node_id); tests and tools outside dora "
                "call arrow_tensor.memory.set_identity()"
            )
        _identity = Identity(dataflow, node)
    return _identity


def identity_or_standalone() -> Identity:
    """``identity()`` inside dora; outside it one standalone dataflow per user, one receiver."""
    try:
        return identity()
    except ShmHandleError:
        return Identity(f"{os.getuid():032x}", ANONYMOUS)


def set_identity(ident: Identity | None) -> None:
    """Override (or reset with None) the identity: for tests and tools outside dora."""
    global _identity
    _identity = ident


def available() -> bool:
    """True where POSIX shared memory is a directory we can create files in (Linux)."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK)


# Names ------------------------------------------------------------------------------------
def new_name(ident: Identity) -> str:
    """A fresh block name of this process in ``ident``'s dataflow."""
    return f"at-{ident.dataflow_hex}-{os.getpid()}-{secrets.token_hex(16)}"


def producer_of(name: str, ident: Identity, what: str) -> int:
    """The producer pid a block name carries, after checking it is a block of this dataflow.

    ``what`` names the metadata key or field the name came from, for the error message.
    """
    match = NAME.match(name)
    if match is None:
        raise ShmHandleError(
            f"{what} must name an arrow_tensor block 'at-<32 hex>-<pid>-<32 hex>', "
            f"got {name[:100]!r}"
        )
    if match.group(1) != ident.dataflow_hex:
        raise ShmHandleError(
            f"block {name!r} belongs to dataflow {match.group(1)}, this node runs in "
            f"{ident.dataflow_hex}"
        )
    return int(match.group(2))


def unlink(name: str) -> None:
    """Remove a block file by name if it still exists (idempotent)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, name))


def sweep_orphans(ident: Identity) -> list[str]:
    """Unlink this dataflow's block files whose producer process is gone; returns their names."""
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        match = NAME.match(name)
        if match is None or match.group(1) != ident.dataflow_hex:
            continue
        pid = int(match.group(2))
        if pid != os.getpid() and not pid_alive(pid):
            unlink(name)
            removed.append(name)
    return removed


def gone_message(name: str, pid: int) -> str:
    """Why a handle to the block ``name`` of producer ``pid`` cannot be read any more."""
    state = "is alive" if pid_running(pid) else "has exited or crashed"
    return (
        f"block {name} no longer exists (its producer, pid {pid}, {state}); this message "
        f"cannot be read"
    )


# Crash notices ----------------------------------------------------------------------------
class Notices(Protocol):
    """How producers' crashes reach receivers (see Note [Block files])."""

    def announce(self, name: str) -> None:
        """Producer: this process owns block ``name``; report it gone if this process dies."""
        ...

    def retire(self, name: str) -> None:
        """Producer: block ``name`` was closed cleanly."""
        ...

    def watch(self, name: str) -> None:
        """Receiver: report block ``name`` in ``dropped()`` once its producer is gone."""
        ...

    def dropped(self) -> list[str]:
        """Receiver: names of watched blocks whose producers died since the last call."""
        ...


class _NoNotices:
    """Outside dora: nothing is reported; the exit and start-up sweeps clean up."""

    def announce(self, name: str) -> None:
        """Nothing to tell."""

    def retire(self, name: str) -> None:
        """Nothing to tell."""

    def watch(self, name: str) -> None:
        """Nobody will tell."""

    def dropped(self) -> list[str]:
        """Nothing was reported."""
        return []


_notices: Notices = _NoNotices()


def set_notices(notices: Notices | None) -> None:
    """Install how crash notices travel (the transport does it for a dora node); None: none."""
    global _notices
    _notices = _NoNotices() if notices is None else notices


def notices() -> Notices:
    """The crash notices in use."""
    return _notices


def dropped_blocks() -> list[str]:
    """Unlink the watched blocks whose producers died; returns their names."""
    names = []
    for name in _notices.dropped():
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        if isinstance(name, str) and NAME.match(name):
            unlink(name)
            names.append(name)
    return names


# Producer side ----------------------------------------------------------------------------
def header_bytes(n_slots: int, n_receivers: int) -> int:
    """Bytes of a control block for ``n_slots`` and ``n_receivers``, rounded up to a page."""
    return round_up(8 * block_words(n_slots, n_receivers), PAGE)


class ProducerBlock:
    """A block file as its producer sees it: control block, slots, optional payload space.

    Parameters
    ----------
    ident:
        The dataflow and node (named in the file name and the control block).
    kind:
        ``KIND_HOST`` or ``KIND_CUDA``.
    n_slots, receivers:
        Slots of the control block and the node ids that may hold them.
    payload_bytes:
        Bytes after the (page-aligned) control block: the host pool's slots.
    kind_words:
        The memory kind's own owner words (up to 13).
    lease_s, attach_grace_s:
        See ``_slots.ProducerSlots``.
    """

    def __init__(
        self,
        ident: Identity,
        *,
        kind: int,
        n_slots: int,
        receivers: Sequence[str],
        payload_bytes: int = 0,
        kind_words: Sequence[int] = (),
        lease_s: float = 5.0,
        attach_grace_s: float = 1.0,
    ) -> None:
        self.name = new_name(ident)
        self.header_bytes = header_bytes(n_slots, len(receivers))
        self.size = self.header_bytes + payload_bytes
        path = os.path.join(SHM_DIR, self.name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(path, flags, 0o600)
        try:
            os.fchmod(self.fd, 0o600)  # whatever the umask says
            os.ftruncate(self.fd, self.size)
            self.mm = mmap.mmap(self.fd, self.size)
            self.block = ControlBlock.create(
                self.mm,
                n_slots,
                [receiver_key(r) for r in receivers],
                owner_words=(*ident.words, kind, *kind_words),
            )
        except BaseException:
            os.close(self.fd)
            unlink(self.name)
            raise
        self.slots = ProducerSlots(self.block, lease_s=lease_s, attach_grace_s=attach_grace_s)
        self.unlinked = False

    def all_mapped(self) -> bool:
        """True once every receiver has attached: the name is no longer needed."""
        block = self.block
        return all(block.receiver_mapped(r) for r in range(block.n_receivers))

    def unlink(self) -> None:
        """Remove the name (mappings live on); a crash then leaves nothing behind."""
        if not self.unlinked:
            unlink(self.name)
            self.unlinked = True

    def close(self) -> None:
        """Announce a clean shutdown, unlink, close the descriptor (mappings die with views)."""
        self.block.set_closed()
        self.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)


# Receiver side ----------------------------------------------------------------------------
class MappedBlock:
    """A block file as a receiver sees it: control block read-write, payload read-only.

    Every check is made before anything is trusted; see Note [Block files].

    Parameters
    ----------
    name:
        The block's name, from a message.
    ident:
        This receiver (its dataflow must match, its node id must be a receiver).
    kind:
        The memory kind the message claims.
    what:
        The metadata key the name came from (error messages).
    anonymous_ok:
        Accept a block made for the one anonymous receiver (a bare ``encode``).
    payload:
        Also map the rest of the file read-only (``payload``): the host pool's slots.
    """

    def __init__(
        self,
        name: str,
        ident: Identity,
        *,
        kind: int,
        what: str,
        anonymous_ok: bool = False,
        payload: bool = False,
    ) -> None:
        self.name = name
        self.producer_pid = producer_of(name, ident, what)
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StaleHandleError(gone_message(name, self.producer_pid)) from None
        except OSError as exc:
            raise ShmHandleError(f"cannot open block {name}: {exc}") from None
        try:
            self._open(fd, ident, kind, anonymous_ok)
            self.payload: mmap.mmap | None = None
            if payload and self.file_size > self.header_bytes:
                self.payload = mmap.mmap(
                    fd,
                    self.file_size - self.header_bytes,
                    access=mmap.ACCESS_READ,
                    offset=self.header_bytes,
                )
            self.check()
        finally:
            os.close(fd)
        # Registered last: a producer counts this receiver as attached from here on.
        self.rx = ReceiverSlots(self.block, self._index)
        self.gone = False

    def check(self) -> None:
        """A memory kind's own checks of its owner words against the file (raise to refuse)."""

    def _open(self, fd: int, ident: Identity, kind: int, anonymous_ok: bool) -> None:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise ShmHandleError(f"block {self.name} is not a regular file owned by this user")
        if info.st_mode & 0o077:
            raise ShmHandleError(
                f"block {self.name} has mode {info.st_mode & 0o777:o}; expected 600"
            )
        if info.st_size < PAGE:
            raise ShmHandleError(f"block {self.name} is {info.st_size} bytes; too small")
        with mmap.mmap(fd, PAGE, access=mmap.ACCESS_READ) as first:
            n_slots, n_rx = struct.unpack_from("=2Q", first, 16)
        if not 1 <= n_slots <= MAX_SLOTS or n_rx > MAX_RECEIVERS:
            raise ShmHandleError(f"block {self.name} claims {n_slots} slots, {n_rx} receivers")
        self.header_bytes = header_bytes(n_slots, n_rx)
        if self.header_bytes > info.st_size:
            raise ShmHandleError(f"block {self.name} is smaller than its own control block")
        self.file_size = info.st_size
        self._control = mmap.mmap(fd, self.header_bytes)
        self.block = ControlBlock.attach(self._control)
        if self.block.owner_word(_O_KIND) != kind:
            raise ShmHandleError(
                f"block {self.name} holds memory of kind {self.block.owner_word(_O_KIND)}, "
                f"the message names kind {kind}"
            )
        words = (self.block.owner_word(_O_DATAFLOW_HI), self.block.owner_word(_O_DATAFLOW_LO))
        if words != ident.words:
            raise ShmHandleError(f"block {self.name} was made by another dataflow")
        index = self.block.receiver_index(receiver_key(ident.node_id))
        if index is None and anonymous_ok:
            index = self.block.receiver_index(receiver_key(ANONYMOUS))
        if index is None:
            raise ShmHandleError(
                f"node {ident.node_id!r} is not a receiver of block {self.name}: the producer's "
                f"dataflow descriptor does not route this output to it"
            )
        self._index = index

    def kind_word(self, i: int) -> int:
        """The memory kind's own owner word ``i`` (0-based, after the shared ones)."""
        return self.block.owner_word(KIND_WORDS + i)

    @property
    def stale(self) -> bool:
        """True once the producer closed the block, died, or was reported gone."""
        return self.gone or self.block.closed or not pid_alive(self.producer_pid)
