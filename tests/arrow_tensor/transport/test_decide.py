"""The transport decision as a table: facts x payload (x forced, checksum) -> routes.

``decide`` is the only place that chooses how a value travels (Note [Choosing a
transport]); every route and every fallback has a row here, and a property checks the
rules that hold for any input.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from arrow_tensor import TransportError
from arrow_tensor.transport._decide import (
    CHUNKED,
    CUDA_IPC,
    DEVICE,
    FORCEABLE,
    HOST_COPY,
    INLINE,
    PLAIN,
    RAW,
    SHM,
    TREE,
    Payload,
    decide,
    max_chunk_payload,
    message_bytes,
)
from arrow_tensor.transport._facts import OutputFacts, Peer
from hypothesis import given
from hypothesis import strategies as st

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# One output on one machine, every receiver able to map the pool and open CUDA handles.
LOCAL = OutputFacts(
    output_id="out",
    node_id="cam",
    machine=None,
    receivers=(Peer("rx", None),),
    shm_reason=None,
    cuda_reason=None,
)
NO_RAW = replace(LOCAL, raw=False)
NO_SHM = replace(LOCAL, shm_reason="receivers ['rx'] run on another machine than 'a'")
NO_CUDA = replace(LOCAL, cuda_reason="ARROW_TENSOR_TRANSPORT=host")
SMALL_CAP = replace(LOCAL, message_cap=64 * MiB)  # a route with a lower cap than dora's 256 MiB


def dense(nbytes: int, width: int = 4, **kw: Any) -> Payload:
    return Payload(nbytes, width, needs_copy=False, **kw)


def strided(nbytes: int, width: int = 4, **kw: Any) -> Payload:
    return Payload(nbytes, width, needs_copy=True, **kw)


TABLE: list[tuple[str, OutputFacts, Payload, str | None, bool, tuple[str, ...]]] = [
    # --- host tensors as one dora message
    (
        "dense stays inline: dora's copy is the only one",
        LOCAL,
        dense(1 * MiB),
        None,
        False,
        (INLINE,),
    ),
    ("empty tensor inline", LOCAL, dense(0), None, False, (INLINE,)),
    ("non-dense compacted into dora's sample", LOCAL, strided(1 * MiB), None, False, (RAW, INLINE)),
    (
        "non-dense under 4 KiB stays inline (dora's heap)",
        LOCAL,
        strided(4095),
        None,
        False,
        (INLINE,),
    ),
    ("non-dense from 4 KiB goes raw", LOCAL, strided(4096), None, False, (RAW, INLINE)),
    ("non-dense without raw samples", NO_RAW, strided(1 * MiB), None, False, (INLINE,)),
    ("non-dense with a checksum", LOCAL, strided(1 * MiB), None, True, (INLINE,)),
    (
        "dense, threaded copy beats dora's memcpy",
        LOCAL,
        dense(4 * MiB, parallel_copy=True),
        None,
        False,
        (RAW, INLINE),
    ),
    ("dense without a threaded copy", LOCAL, dense(200 * MiB), None, False, (INLINE,)),
    (
        "dense 250 MiB of 8-byte elements fits inline but not as raw bytes",
        LOCAL,
        dense(250 * MiB, 8, parallel_copy=True),
        None,
        False,
        (INLINE,),
    ),
    # --- past dora's cap
    (
        "250 MiB of bytes: its bitmap tips it over",
        LOCAL,
        dense(250 * MiB, 1),
        None,
        False,
        (CHUNKED,),
    ),
    (
        "240 MiB to compact is sized as raw bytes",
        LOCAL,
        strided(240 * MiB),
        None,
        False,
        (CHUNKED,),
    ),
    ("1 GiB without the pool", NO_SHM, dense(GiB), None, False, (CHUNKED,)),
    (
        "a route with a lower cap chunks earlier",
        SMALL_CAP,
        dense(100 * MiB),
        None,
        False,
        (CHUNKED,),
    ),
    # --- the shared-memory pool
    ("1 GiB through the pool, else chunks", LOCAL, dense(GiB), None, False, (SHM, CHUNKED)),
    ("256 MiB is the pool's threshold", LOCAL, dense(256 * MiB), None, False, (SHM, CHUNKED)),
    ("a loan travels as a handle", LOCAL, dense(4 * KiB, loaned=True), None, False, (SHM, INLINE)),
    (
        "a non-dense view of a loan: copied into a slot, else raw",
        LOCAL,
        strided(MiB, loaned=True),
        None,
        False,
        (SHM, RAW, INLINE),
    ),
    ("a loan with a remote receiver", NO_SHM, dense(4 * KiB, loaned=True), None, False, (INLINE,)),
    ("an empty loan has nothing to share", LOCAL, dense(0, loaned=True), None, False, (INLINE,)),
    (
        "a forced transport skips the pool",
        LOCAL,
        dense(4 * KiB, loaned=True),
        INLINE,
        False,
        (INLINE,),
    ),
    ("pool.send prefers the pool", LOCAL, dense(4 * KiB), SHM, False, (SHM, INLINE)),
    ("pool.send where the pool cannot be used", NO_SHM, dense(4 * KiB), SHM, False, (INLINE,)),
    ("pool.send of an empty tensor", LOCAL, dense(0), SHM, False, (INLINE,)),
    # --- device arrays
    (
        "CUDA IPC, else a host copy",
        LOCAL,
        Payload(0, kind=DEVICE),
        None,
        False,
        (CUDA_IPC, HOST_COPY),
    ),
    (
        "receivers that cannot open handles",
        NO_CUDA,
        Payload(0, kind=DEVICE),
        None,
        False,
        (HOST_COPY,),
    ),
    (
        "a device without legacy IPC (expandable segments)",
        LOCAL,
        Payload(0, kind=DEVICE, device_problem="PyTorch expandable segments are enabled"),
        None,
        False,
        (HOST_COPY,),
    ),
    (
        "a forced transport applies to the host copy",
        LOCAL,
        Payload(0, kind=DEVICE),
        RAW,
        False,
        (HOST_COPY,),
    ),
    # --- structures
    ("a structure inline", LOCAL, Payload(10 * KiB, 8, kind=TREE), None, False, (INLINE,)),
    ("a structure past the cap", LOCAL, Payload(300 * MiB, 8, kind=TREE), None, False, (CHUNKED,)),
    (
        "a structure chunked on request",
        LOCAL,
        Payload(10 * KiB, 8, kind=TREE),
        CHUNKED,
        False,
        (CHUNKED,),
    ),
    # --- plain values and plain outputs: one ordinary message any node reads
    ("a plain value inline", LOCAL, Payload(100, kind=PLAIN, plain=True), None, False, (INLINE,)),
    (
        "a plain output never uses the pool, even for a loan",
        LOCAL,
        dense(GiB // 8, loaned=True, plain=True),
        None,
        False,
        (INLINE,),
    ),
    (
        "a plain output never compacts into a raw sample (bytes to a plain consumer)",
        LOCAL,
        strided(MiB, plain=True),
        None,
        False,
        (INLINE,),
    ),
    (
        "a plain output's device tensor goes by the host",
        LOCAL,
        Payload(0, kind=DEVICE, plain=True),
        None,
        False,
        (HOST_COPY,),
    ),
    ("plain, forced inline", LOCAL, dense(MiB, plain=True), INLINE, False, (INLINE,)),
    # --- forced transports, honoured
    ("forced inline", LOCAL, strided(MiB), INLINE, False, (INLINE,)),
    ("forced raw, even dense and small", LOCAL, dense(64), RAW, False, (RAW,)),
    ("forced chunked", LOCAL, dense(MiB), CHUNKED, False, (CHUNKED,)),
]


@pytest.mark.parametrize(
    ("facts", "payload", "forced", "checksum", "routes"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_decision_table(
    facts: OutputFacts,
    payload: Payload,
    forced: str | None,
    checksum: bool,
    routes: tuple[str, ...],
) -> None:
    assert decide(facts, payload, forced, checksum) == routes


REFUSED: list[tuple[str, OutputFacts, Payload, str | None, bool, str]] = [
    ("not a transport", LOCAL, dense(64), "carrier-pigeon", False, "transport must be one of"),
    ("host is not forceable", LOCAL, dense(64), HOST_COPY, False, "transport must be one of"),
    ("inline past the cap", LOCAL, dense(GiB), INLINE, False, "does not fit one dora message"),
    ("raw past the cap", LOCAL, strided(250 * MiB), RAW, False, "does not fit one dora message"),
    ("raw with a checksum", LOCAL, strided(MiB), RAW, True, "it carries a checksum"),
    ("raw without raw samples", NO_RAW, strided(MiB), RAW, False, "no raw samples"),
    ("chunks of one byte", LOCAL, dense(1, 1), CHUNKED, False, "cannot be split into chunks"),
    ("a structure raw", LOCAL, Payload(64, 8, kind=TREE), RAW, False, "inline or chunked"),
    (
        "a structure through the pool",
        LOCAL,
        Payload(64, 8, kind=TREE),
        SHM,
        False,
        "inline or chunked",
    ),
    (
        "a structure inline past the cap",
        LOCAL,
        Payload(GiB, 8, kind=TREE),
        INLINE,
        False,
        "does not fit",
    ),
    (
        "a structure on a plain output",
        LOCAL,
        Payload(64, 8, kind=TREE, plain=True),
        None,
        False,
        "needs arrow_tensor to decode it",
    ),
    (
        "a plain output past the cap: nobody there joins chunks",
        LOCAL,
        dense(300 * MiB, plain=True),
        None,
        False,
        "cannot join chunks",
    ),
    ("a plain value forced raw", LOCAL, Payload(64, kind=PLAIN), RAW, False, "travels inline"),
    ("a plain value through the pool", LOCAL, Payload(64, kind=PLAIN), SHM, False, "inline"),
]


@pytest.mark.parametrize(
    ("facts", "payload", "forced", "checksum", "match"),
    [row[1:] for row in REFUSED],
    ids=[row[0] for row in REFUSED],
)
def test_impossible_requests_are_refused_with_the_reason(
    facts: OutputFacts, payload: Payload, forced: str | None, checksum: bool, match: str
) -> None:
    with pytest.raises(TransportError, match=match):
        decide(facts, payload, forced, checksum)


_facts = st.builds(
    OutputFacts,
    output_id=st.just("out"),
    node_id=st.just("cam"),
    machine=st.none(),
    receivers=st.just((Peer("rx", None),)),
    shm_reason=st.sampled_from([None, "remote"]),
    cuda_reason=st.sampled_from([None, "remote"]),
    raw=st.booleans(),
    message_cap=st.sampled_from([64 * MiB, 256 * MiB]),
    shm_min_bytes=st.sampled_from([MiB, 256 * MiB]),
)
_payloads = st.builds(
    Payload,
    nbytes=st.integers(0, 2 * GiB),
    width=st.sampled_from([1, 2, 4, 8]),
    needs_copy=st.booleans(),
    kind=st.sampled_from(["tensor", TREE, DEVICE, PLAIN]),
    plain=st.booleans(),
    loaned=st.booleans(),
    parallel_copy=st.booleans(),
    device_problem=st.sampled_from([None, "no legacy IPC"]),
)


@given(_facts, _payloads, st.sampled_from([None, *FORCEABLE]), st.booleans())
def test_every_decision_keeps_the_rules(
    facts: OutputFacts, payload: Payload, forced: str | None, checksum: bool
) -> None:
    plain = payload.plain or payload.kind == PLAIN
    try:
        routes = decide(facts, payload, forced, checksum)
    except TransportError:
        assert forced is not None or payload.nbytes < 2 or plain, "only requests are refused"
        return
    if plain:  # for consumers without arrow_tensor: one ordinary message, never a handle
        assert routes == ((HOST_COPY,) if payload.kind == DEVICE else (INLINE,))
        assert message_bytes(payload.nbytes, payload.width) <= facts.message_cap or (
            payload.kind == DEVICE
        )
        return
    assert routes, "there is always a route"
    assert decide(facts, payload, forced, checksum) == routes  # pure
    assert len(set(routes)) == len(routes)
    # The last route never declines: a dora message (or the host copy, decided again).
    assert routes[-1] in (INLINE, CHUNKED, HOST_COPY, RAW)
    if routes[-1] == RAW:
        assert forced == RAW
    if payload.kind == DEVICE:
        assert routes[-1] == HOST_COPY
        assert (CUDA_IPC in routes) == (
            forced is None and facts.cuda_reason is None and payload.device_problem is None
        )
        return
    if SHM in routes:
        assert facts.shm_reason is None
        assert payload.nbytes > 0
        assert payload.kind == "tensor"
    if RAW in routes:
        assert facts.raw
        assert not checksum
        assert payload.kind == "tensor"
        assert message_bytes(payload.nbytes, 1) <= facts.message_cap
    if INLINE in routes and forced is None:
        width = 1 if payload.needs_copy and payload.kind == "tensor" else payload.width
        assert message_bytes(payload.nbytes, width) <= facts.message_cap
    if CHUNKED in routes and forced is None:  # only what one message cannot carry
        width = 1 if payload.needs_copy and payload.kind == "tensor" else payload.width
        assert message_bytes(payload.nbytes, width) > facts.message_cap


def test_chunk_size_model_fits_the_cap_it_was_made_for() -> None:
    for cap in (64 * MiB, 256 * MiB):
        for width in (1, 8):
            largest = max_chunk_payload(cap, width)
            assert largest % 64 == 0
            assert message_bytes(largest, width) <= cap < message_bytes(largest + 64, width)
