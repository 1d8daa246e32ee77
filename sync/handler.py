"""The serving side of the protocol: a message in, answer messages out; no I/O of its own.

Invariants:
1. Any request gets an answer: a bad one gets an ``Error`` and changes nothing.
2. A database with auth is served only to a request proven (signed, fresh, unreplayed) by
   a key with Read or better, or when its global permission covers the request.
3. Failed entries are never served: answers are built from the Verified frontier only.
4. ``_sync`` is never served.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from dag import DagError, Database, Instance, NotFoundError, Permission, SigningKey, Status, cid_to_text
from dag.errors import InvalidValueError

from . import proofs
from .errors import (
    AccessPendingError,
    AccessRejectedError,
    MalformedMessageError,
    NotServedError,
    SyncError,
    UnauthorizedError,
    VersionMismatchError,
)
from .messages import (
    CHALLENGE_BYTES,
    PROTOCOL_VERSION,
    Ack,
    Bootstrap,
    BootstrapPending,
    Count,
    DatabaseOffer,
    Error,
    Handshake,
    HandshakeConfirm,
    HandshakeReply,
    Incremental,
    Message,
    SendEntries,
    SyncTree,
    error_for,
)
from .reconcile import entries_for
from .state import APPROVED, REJECTED, SyncState
from .transport import Address, RequestContext

log = logging.getLogger(__name__)

ANSWER_BATCH_ENTRIES = 2_000  # entries per answer frame: bounds memory on both sides
# The first frames are smaller, doubling up to the full size: the receiver starts
# verifying after a few milliseconds instead of after a whole frame was read, sent and decoded.
FIRST_FRAME_ENTRIES = 250
ANSWER_BATCH_BYTES = 4 * 1024 * 1024
CHALLENGE_TTL_MS = 60_000

T = TypeVar("T")
Offload = Callable[[Callable[[], T]], Awaitable[T]]


async def run_inline(function: Callable[[], T]) -> T:
    """The offload used by tests on the simulated network: run it here, now."""
    return function()


@dataclass
class ServeStats:
    requests: int = 0
    errors: int = 0
    entries_sent: int = 0
    entries_received: int = 0


class SyncHandler:
    def __init__(
        self,
        instance: Instance,
        state: SyncState,
        *,
        display_name: str,
        now_ms: Callable[[], int],
        addresses: Callable[[], list[Address]],
        offload: Offload[Any],
        on_peer: Callable[[str, str, list[Address]], None] | None = None,
        on_exchange: Callable[[Database, str, list[bytes]], None] | None = None,
    ) -> None:
        self._instance = instance
        self._key: SigningKey = instance.device_key
        self._state = state
        self._display_name = display_name
        self._now_ms = now_ms
        self._addresses = addresses
        self._offload = offload
        self._on_peer = on_peer
        self._on_exchange = on_exchange
        self._guard = proofs.ReplayGuard()
        self._challenges: dict[bytes, tuple[int, Handshake]] = {}
        self.stats = ServeStats()

    async def handle(self, message: Message, context: RequestContext) -> AsyncIterator[Message]:
        """Answer one request; never raises for anything a peer can send."""
        self.stats.requests += 1
        try:
            match message:
                case Handshake():
                    yield self._handshake(message)
                case HandshakeConfirm():
                    yield self._confirm(message)
                case SyncTree():
                    async for answer in self._sync_tree(message):
                        yield answer
                case SendEntries():
                    yield await self._send_entries(message)
                case _:
                    raise MalformedMessageError(f"{message.TYPE} is an answer, not a request")
        except (SyncError, DagError) as exc:
            self.stats.errors += 1
            log.info("refused %s from %s: %s", message.TYPE, context.peer or context.remote, exc)
            yield error_for(exc)
        except Exception:  # one bad request must never take the node down
            self.stats.errors += 1
            log.exception("failed to serve %s", message.TYPE)
            yield Error("internal", "the peer could not serve this request")

    # ---- handshake --------------------------------------------------------------------

    def _handshake(self, message: Handshake) -> HandshakeReply:
        if message.version != PROTOCOL_VERSION:
            raise VersionMismatchError(
                f"peer speaks protocol version {message.version}, this node speaks {PROTOCOL_VERSION}"
            )
        now = self._now_ms()
        self._challenges = {c: v for c, v in self._challenges.items() if v[0] > now - CHALLENGE_TTL_MS}
        counter = os.urandom(CHALLENGE_BYTES)
        self._challenges[counter] = (now, message)
        return HandshakeReply(
            device_key=self._key.pubkey,
            display_name=self._display_name,
            version=PROTOCOL_VERSION,
            challenge_signature=proofs.sign_challenge(self._key, message.challenge),
            counter_challenge=counter,
            databases=tuple(self._offers()),
            addresses=tuple((a.transport, a.address) for a in self._addresses()),
        )

    def _offers(self) -> list[DatabaseOffer]:
        offers = []
        for db in self._instance.databases():
            if db.id == self._state.database_id:
                continue
            public = _global_covers(db, Permission.read())
            offers.append(DatabaseOffer(db.root_cid, db.name if public else None, public))
        return offers

    def _confirm(self, message: HandshakeConfirm) -> Ack:
        issued = self._challenges.pop(message.counter_challenge, None)
        if issued is None:
            raise UnauthorizedError("unknown or expired handshake challenge")
        hello = issued[1]
        if hello.device_key != message.device_key:
            raise UnauthorizedError("handshake confirmed by another key than the one that started it")
        if not proofs.check_challenge(message.device_key, message.counter_challenge, message.signature):
            raise UnauthorizedError("handshake signature does not verify")
        if self._on_peer is not None:
            self._on_peer(hello.device_key, hello.display_name, [Address(t, a) for t, a in hello.addresses])
        return Ack()

    # ---- sync -------------------------------------------------------------------------

    def _database(self, db_cid: bytes) -> Database:
        if db_cid == self._state.db.root_cid:
            raise NotServedError("this database is not served")
        try:
            return self._instance.open_database(db_cid)
        except NotFoundError:
            raise NotServedError(f"database {cid_to_text(db_cid)} is not held here") from None

    def _prove(self, db: Database, message: SyncTree | SendEntries, tips: tuple[bytes, ...]) -> str | None:
        """The key that signed the request (None if unsigned); raises on a bad, stale or replayed proof."""
        if message.auth is None:
            return None
        return self._guard.check(message.auth, self._key.pubkey, db.root_cid, tips, self._now_ms())

    @staticmethod
    def _may_read(db: Database, key: str | None) -> bool:
        auth = db.settings().auth()
        if not auth.configured:
            return True
        held = auth.permission_of(key) if key is not None else None
        if held is None and auth.global_grant is not None and auth.global_grant.active:
            held = auth.global_grant.permission
        return held is not None and held.covers(Permission.read())

    def _read_gate(self, db: Database, message: SyncTree | SendEntries, tips: tuple[bytes, ...]) -> str | None:
        """The proven requester key; raises unless the requester may read ``db``."""
        key = self._prove(db, message, tips)
        if not self._may_read(db, key):
            raise _refusal(key)
        return key

    def _access(self, db: Database, message: SyncTree) -> None:
        """Raise unless the requester may read; record an access request when one is asked."""
        key = self._prove(db, message, message.tips)
        can_read = self._may_read(db, key)
        if message.access is not None and key is not None:
            self._request_access(db, key, message.access, can_read=can_read)
        if not can_read:
            raise _refusal(key)

    def _request_access(self, db: Database, key: str, wanted_text: str, *, can_read: bool) -> None:
        """Record (or find) the request; raise Pending/Rejected when the requester cannot read yet."""
        try:
            wanted = Permission.parse(wanted_text)
        except InvalidValueError as exc:
            raise MalformedMessageError(str(exc)) from None
        auth = db.settings().auth()
        held = auth.permission_of(key)
        if held is not None and held.covers(wanted):
            return
        existing = self._state.find_request(db.id, key, str(wanted))
        if existing is not None and existing.status == REJECTED:
            if can_read:
                return
            raise AccessRejectedError(f"access request {existing.request_id} was rejected")
        if existing is None or existing.status == APPROVED:
            existing = self._state.add_request(db.id, key, str(wanted), self._now_ms())
        if not can_read:
            raise AccessPendingError(
                f"access request {existing.request_id} waits for an admin", request_id=existing.request_id
            )

    async def _sync_tree(self, message: SyncTree) -> AsyncIterator[Message]:
        db = self._database(message.db)
        try:
            self._access(db, message)
        except AccessPendingError as pending:
            assert pending.request_id is not None
            yield BootstrapPending(message.db, pending.request_id, "access request waits for an admin of this database")
            return
        received = 0
        if message.entries:
            result = await self._offload(
                lambda: self._instance.put_remote_entries(message.entries, database_id=message.db)
            )
            received = len(result.verified)
            self.stats.entries_received += len(message.entries)
        bootstrap = not message.tips and not message.entries
        tips = tuple(db.tip_cids())
        if message.auth is not None and self._on_exchange is not None:
            # The asker will hold our tips; we hold those of its tips we know.
            common = sorted({*tips, *(t for t in message.tips if db.status_of(t) is Status.VERIFIED)})
            self._on_exchange(db, message.auth.key, common)
        if bootstrap:
            async for frame, last in self._bootstrap_frames(db):
                self.stats.entries_sent += len(frame)
                yield Bootstrap(message.db, tips if last else (), tuple(frame), more=not last)
            return
        boundary = (*message.tips, *message.common, *message.have)
        cids = await self._offload(lambda: entries_for(db, boundary))
        # Frames are read from storage one at a time: memory stays bounded by a frame.
        start = 0
        limit = FIRST_FRAME_ENTRIES
        while True:
            chunk = cids[start : start + limit]
            limit = min(2 * limit, ANSWER_BATCH_ENTRIES)
            taken, frame = await self._offload(functools.partial(_frame_raws, db, chunk)) if chunk else (0, [])
            start += taken
            last = start >= len(cids)
            self.stats.entries_sent += len(frame)
            yield Incremental(message.db, tips if last else (), tuple(frame), received=received, more=not last)
            if last:
                return

    async def _bootstrap_frames(self, db: Database) -> AsyncIterator[tuple[list[bytes], bool]]:
        """Every verified entry, parents first, a page of storage per frame.

        Paged by position (height, ID), so the first frame goes out after one small read
        instead of after listing the whole history, and neither side holds the list.
        """
        after: tuple[int, bytes] | None = None
        limit = FIRST_FRAME_ENTRIES
        while True:
            page = await self._offload(functools.partial(db.entries_page, after, limit + 1))
            frame: list[bytes] = []
            size = 0
            for cid, height, raw in page[:limit]:
                if frame and size + len(raw) > ANSWER_BATCH_BYTES:
                    break
                frame.append(raw)
                size += len(raw)
                after = (height, cid)
            last = len(frame) == len(page)  # the one extra row read says whether more follow
            yield frame, last
            if last:
                return
            limit = min(2 * limit, ANSWER_BATCH_ENTRIES)

    async def _send_entries(self, message: SendEntries) -> Message:
        db = self._database(message.db)
        self._read_gate(db, message, ())  # SendEntries proofs sign an empty tip list
        if not message.entries:
            return Ack()
        result = await self._offload(lambda: self._instance.put_remote_entries(message.entries, database_id=message.db))
        self.stats.entries_received += len(message.entries)
        return Count(len(message.entries), len(result.verified), len(result.failed))


def _frame_raws(db: Database, cids: list[bytes]) -> tuple[int, list[bytes]]:
    """How many of ``cids`` one frame takes (at least one), and their bytes."""
    found = db.raw_map(cids)
    raws: list[bytes] = []
    size = 0
    for index, cid in enumerate(cids):
        raw = found.get(cid)
        if raw is None:
            continue
        if raws and size + len(raw) > ANSWER_BATCH_BYTES:
            return index, raws
        raws.append(raw)
        size += len(raw)
    return len(cids), raws


def _refusal(key: str | None) -> UnauthorizedError:
    if key is None:
        return UnauthorizedError("this database needs a request signed by a key with read or better")
    return UnauthorizedError(f"key {key} may not read this database")


def _global_covers(db: Database, wanted: Permission) -> bool:
    grant = db.settings().auth().global_grant
    return grant is not None and grant.active and grant.permission.covers(wanted)
