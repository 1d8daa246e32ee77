"""The asking side of one exchange with one peer: handshake, then sync one database.

These functions hold no state between calls; the engine decides when to call them and
records what they return.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import trio

from dag import Database, Instance, PreparedEntries, SigningKey, cid_from_text
from dag.ingest import PutResult

from . import proofs
from .errors import (
    ERRORS_BY_CODE,
    AccessPendingError,
    MalformedMessageError,
    PeerError,
    SyncError,
    TransportError,
    UnauthorizedError,
)
from .handler import Offload, UnverifiedBudget
from .messages import (
    CHALLENGE_BYTES,
    MAX_ENTRIES_PER_MESSAGE,
    PROTOCOL_VERSION,
    Ack,
    Bootstrap,
    BootstrapPending,
    Count,
    Error,
    Handshake,
    HandshakeConfirm,
    HandshakeReply,
    Incremental,
    Message,
    SendEntries,
    SyncTree,
)
from .reconcile import sample_have
from .transport import Address, Transport

PUSH_BATCH = 2_000
FRAMES_AHEAD = 2  # answer frames read ahead while one is being verified


@dataclass(frozen=True, slots=True)
class PeerHello:
    """What a handshake told us about the peer."""

    pubkey: str
    display_name: str
    addresses: tuple[Address, ...]
    databases: tuple[bytes, ...]


@dataclass(slots=True)
class ExchangeResult:
    """One database synced with one peer."""

    received: int = 0
    verified: int = 0
    sent: int = 0
    peer_tips: tuple[bytes, ...] = ()
    common: list[bytes] = field(default_factory=list)
    round_trips: int = 0
    skipped: bool = False


@contextlib.asynccontextmanager
async def _one_error() -> AsyncIterator[None]:
    """Let a nursery's single error through as itself, not wrapped in an ExceptionGroup."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise


def raise_for(message: Message) -> None:
    """Raise the error an ``Error`` answer stands for."""
    if isinstance(message, Error):
        cls = ERRORS_BY_CODE.get(message.code, PeerError)
        raise cls(f"peer refused: {message.message}" if cls is PeerError else message.message)


async def _one(transport: Transport, address: str, message: Message) -> Message:
    async with contextlib.aclosing(transport.request(address, message)) as stream:
        answers = [answer async for answer in stream]
    if len(answers) != 1:
        raise MalformedMessageError(f"expected one answer to {message.TYPE}, got {len(answers)}")
    raise_for(answers[0])
    return answers[0]


async def handshake(
    transport: Transport, address: str, key: SigningKey, display_name: str, own_addresses: list[Address]
) -> PeerHello:
    """Mutual challenge signatures: the peer signs our challenge, we sign its counter challenge."""
    challenge = os.urandom(CHALLENGE_BYTES)
    hello = Handshake(
        key.pubkey, display_name, PROTOCOL_VERSION, challenge, tuple((a.transport, a.address) for a in own_addresses)
    )
    reply = await _one(transport, address, hello)
    if not isinstance(reply, HandshakeReply):
        raise MalformedMessageError(f"expected HandshakeReply, got {reply.TYPE}")
    if not proofs.check_challenge(reply.device_key, challenge, reply.challenge_signature):
        raise UnauthorizedError(f"peer at {address} could not prove its key {reply.device_key}")
    confirm = HandshakeConfirm(key.pubkey, reply.counter_challenge, proofs.sign_challenge(key, reply.counter_challenge))
    answer = await _one(transport, address, confirm)
    if not isinstance(answer, Ack):
        raise MalformedMessageError(f"expected Ack, got {answer.TYPE}")
    return PeerHello(
        reply.device_key,
        reply.display_name,
        tuple(Address(t, a) for t, a in reply.addresses),
        tuple(offer.db for offer in reply.databases),
    )


async def sync_database(
    *,
    instance: Instance,
    transport: Transport,
    address: str,
    peer_key: str,
    db_id: str,
    common: tuple[bytes, ...],
    access: str | None,
    now_ms: Callable[[], int],
    offload: Offload[object],
    push_only: bool = False,
    budget: UnverifiedBudget | None = None,
) -> ExchangeResult:
    """Sync one database with the peer at ``address``; see ``sync.reconcile`` for the algorithm.

    With ``budget``, what the peer's answers leave stored Unverified counts against its
    budget, and an answer that would go over it ends the exchange with ``OverBudgetError``.
    """
    key = instance.device_key
    db_cid = cid_from_text(db_id)
    db: Database | None = instance.open_database(db_cid) if instance.has_database(db_cid) else None
    result = ExchangeResult()
    tips: tuple[bytes, ...] = ()
    push: list[bytes] = []
    have: list[bytes] = []
    held_common: tuple[bytes, ...] = ()
    if db is not None:
        tips = tuple(db.tip_cids())
        held_common = tuple(c for c in common if db.status_of(c) is not None)
        if held_common:
            cids = await offload(functools.partial(db.missing_from, held_common))
            assert isinstance(cids, list)
            if len(cids) <= MAX_ENTRIES_PER_MESSAGE:
                push = db.raws(cids)
            if push_only and not cids:
                # Sync on commit with nothing the peer lacks (say, an echo of what it sent).
                result.skipped = True
                return result
        else:
            have = sample_have(db, tips)
    request = SyncTree(
        db=db_cid,
        tips=tips,
        common=held_common,
        have=tuple(have),
        entries=tuple(push),
        auth=proofs.make_proof(key, peer_key, db_cid, tips, now_ms()),
        access=access,
    )
    result.round_trips += 1
    result.sent += len(push)
    final: Bootstrap | Incremental | None = None
    frames_in, frames_out = trio.open_memory_channel[tuple[Message, PreparedEntries | None]](FRAMES_AHEAD)
    unput: list[PreparedEntries] = []

    async def receive() -> None:
        # Each frame is handed to the verifying threads (decode + signatures) the moment it
        # arrives, while the frame before it is still being put: the wire, the verifying
        # cores and the writer all stay busy. The channel bound keeps memory to a few frames.
        async with frames_in, contextlib.aclosing(transport.request(address, request)) as answers:
            async for answer in answers:
                prepared = None
                if isinstance(answer, Bootstrap | Incremental) and answer.entries and answer.db == db_cid:
                    prepared = instance.prepare_remote_entries(answer.entries)
                    unput.append(prepared)
                await frames_in.send((answer, prepared))

    try:
        async with _one_error(), trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            async with frames_out:
                async for answer, prepared in frames_out:
                    raise_for(answer)
                    if isinstance(answer, BootstrapPending):
                        raise AccessPendingError(
                            f"access request {answer.request_id} waits for an admin", request_id=answer.request_id
                        )
                    if not isinstance(answer, Bootstrap | Incremental):
                        raise MalformedMessageError(f"unexpected answer {answer.TYPE} to SyncTree")
                    if answer.db != db_cid:
                        raise MalformedMessageError("answer is for another database")
                    if prepared is not None:
                        assert isinstance(answer, Bootstrap | Incremental)
                        if budget is not None:
                            budget.check(peer_key, prepared.count, sum(len(raw) for raw in answer.entries))
                        stored = await offload(
                            functools.partial(instance.put_remote_entries, prepared, database_id=db_cid)
                        )
                        unput.remove(prepared)
                        if budget is not None and isinstance(stored, PutResult):
                            budget.add(peer_key, db_cid, stored, answer.entries)
                        result.received += prepared.count
                        result.verified += len(getattr(stored, "verified", ()))
                    if not answer.more:
                        final = answer
                        break
            nursery.cancel_scope.cancel()
    finally:
        for prepared in unput:  # frames left behind by an error: drop their queued checks
            prepared.cancel()
    if final is None:
        # The stream closed mid-answer: a cut connection (a relay's data limit, a peer gone)
        # looks like this, so it is a transport failure, and the engine tries the peer's
        # next address or retries; what did arrive is stored and verified already.
        raise TransportError(f"{address}: the answer ended before its last frame")
    result.peer_tips = final.tips
    db = instance.open_database(db_cid) if instance.has_database(db_cid) else None
    if db is None:
        raise SyncError("the peer sent no usable entries for this database")
    shared = set(tips) | set(final.tips)
    if not push:
        # No cursor (or too much to push inline): the peer's tips are now known here, so
        # what it lacks is exact. Push it in batches.
        ours = db.tip_cids()
        shared = set(ours) | set(final.tips)
        cids = await offload(lambda: db.missing_from(final.tips, ours=ours))
        assert isinstance(cids, list)
        for start in range(0, len(cids), PUSH_BATCH):
            raws = tuple(db.raws(cids[start : start + PUSH_BATCH]))
            result.round_trips += 1
            answer = await _one(
                transport,
                address,
                SendEntries(db_cid, raws, proofs.make_proof(key, peer_key, db_cid, (), now_ms())),
            )
            if not isinstance(answer, Count | Ack):
                raise MalformedMessageError(f"unexpected answer {answer.TYPE} to SendEntries")
            result.sent += len(raws)
    # Both sides now hold the closure of what we pushed from and of the peer's tips.
    # (Tips of commits made during the exchange are not included: they are still to send.)
    result.common = sorted(shared)
    return result
