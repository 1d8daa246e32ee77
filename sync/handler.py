"""The serving side of the protocol: a message in, answer messages out; no I/O of its own.

Invariants:
1. Any request gets an answer: a bad one gets an ``Error`` and changes nothing.
2. A database with auth is served only to a request proven (signed, fresh, unreplayed) by
   a key with Read or better, or when its global permission covers the request.
3. Failed entries are never served: answers are built from the Verified frontier only.
4. ``_sync`` is never served.
5. A stranger gets bounded resources: pending handshakes are bounded in number and bytes,
   per source and in total, and expire; nothing is written to ``_sync`` for a peer that
   only handshook or was refused (``on_exchange`` fires only after a proven, allowed read);
   what one peer leaves stored Unverified is bounded (``UnverifiedBudget``).
6. A handshake never fails because of one database's content: a database whose settings
   cannot be read is offered as private, and logged once.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from dag import DagError, Database, Instance, NotFoundError, Permission, SigningKey, Status, cid_to_text
from dag.errors import InvalidValueError
from dag.ids import cid_of
from dag.ingest import PutResult

from . import proofs
from .errors import (
    AccessPendingError,
    AccessRejectedError,
    LimitError,
    MalformedMessageError,
    NotServedError,
    OverBudgetError,
    SyncError,
    UnauthorizedError,
    VersionMismatchError,
)
from .messages import (
    CHALLENGE_BYTES,
    MAX_LIST,
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
    encode_message,
    error_for,
)
from .reconcile import entries_for
from .state import APPROVED, MAX_ADDRESS_CHARS, MAX_DISPLAY_NAME, MAX_PEER_ADDRESSES, REJECTED, SyncState
from .transport import Address, RequestContext

log = logging.getLogger(__name__)

ANSWER_BATCH_ENTRIES = 2_000  # entries per answer frame: bounds memory on both sides
# The first frames are smaller, doubling up to the full size: the receiver starts
# verifying after a few milliseconds instead of after a whole frame was read, sent and decoded.
FIRST_FRAME_ENTRIES = 250
ANSWER_BATCH_BYTES = 4 * 1024 * 1024
# What one frame costs on the wire beyond its entries' bytes, for a SyncTree's budget: the
# transport's 4-byte length prefix, and per entry msgpack's bin header (<= 5 bytes); the rest
# of a frame (type, database, tips, flags, array header) is measured by encoding it empty.
FRAME_PREFIX_BYTES = 4
ENTRY_OVERHEAD_BYTES = 5
ARRAY_HEADER_BYTES = 5
# Under a budget a frame takes at most this share of it (and at least MIN_BUDGET_FRAME_BYTES):
# a relay that cuts a circuit before the limit it advertised then costs at most the frame it
# was carrying, and the frames before it are stored.
BUDGET_FRAME_SHARE = 4
MAX_ENTRY_BYTES_UNLIMITED = 2**62  # no budget: a frame's first entry is taken whatever its size
MIN_BUDGET_FRAME_BYTES = 16 * 1024
CHALLENGE_TTL_MS = 60_000  # a handshake is one round trip; a minute covers any link that works at all
# Pending handshakes (counter challenges issued, not yet confirmed). Each keeps only a
# trimmed hello (a key, a short name, MAX_PEER_ADDRESSES short addresses: ~1-9 KB), never
# the message as it came. A legitimate peer has one in flight for one round trip, so 8 per
# source (connection, or peer ID on libp2p) is plenty, and 1,024 in all serves a thousand
# peers joining within the same minute; past a bound the oldest pending one is dropped.
MAX_PENDING_HANDSHAKES = 1_024
MAX_PENDING_HANDSHAKES_PER_SOURCE = 8
MAX_PENDING_HANDSHAKE_BYTES = 2 * 1024 * 1024
# Confirmed peers remembered (in memory only) so that, if one later reads a database, its
# record gets its name and addresses; a handshake alone writes nothing persistent.
MAX_RECENT_HELLOS = 1_024
# What one peer may leave stored Unverified (entries waiting for parents). An honest peer
# sends parents first, so only part of one batch (<= 10,000 entries, one frame of <= 16 MiB)
# is ever waiting; twice that is headroom. Past it the peer's requests with entries get
# Error(over-budget) until what it left settles. The number of peers tracked is bounded too;
# keys are free, so dag's per-database bound is what bounds the total.
MAX_UNVERIFIED_PER_PEER = 20_000
MAX_UNVERIFIED_BYTES_PER_PEER = 64 * 1024 * 1024
MAX_BUDGET_PEERS = 4_096
SETTLE_INTERVAL_S = 1.0  # an over-budget peer's held entries are re-checked at most this often
MAX_UNREADABLE_LOGGED = 1_024  # databases whose unreadable settings were logged (each once)

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


@dataclass(frozen=True, slots=True)
class Hello:
    """What a handshake said about a peer, trimmed to what is kept (bounded)."""

    device_key: str
    display_name: str
    addresses: tuple[Address, ...]

    @classmethod
    def trimmed(cls, message: Handshake) -> Hello:
        addresses: list[Address] = []
        for transport, address in message.addresses:
            if len(addresses) == MAX_PEER_ADDRESSES:
                break
            if len(address) <= MAX_ADDRESS_CHARS and Address(transport, address) not in addresses:
                addresses.append(Address(transport, address))
        return cls(message.device_key, message.display_name[:MAX_DISPLAY_NAME], tuple(addresses))

    def size(self) -> int:
        """Bytes this hello holds, roughly (what the byte bound counts)."""
        return 200 + len(self.device_key) + len(self.display_name) + sum(64 + len(str(a)) for a in self.addresses)


@dataclass(frozen=True, slots=True)
class _Pending:
    issued_ms: int
    source: str
    hello: Hello
    size: int


class PendingHandshakes:
    """Counter challenges issued and not yet confirmed.

    Bounded in number and bytes, per source and in total (the oldest goes first), and
    expiring after ``ttl_ms``: every call drops what expired, oldest first, so the memory
    comes back once a flood stops (``expire`` is also called by the engine's housekeeping).
    """

    def __init__(
        self,
        *,
        ttl_ms: int = CHALLENGE_TTL_MS,
        max_total: int = MAX_PENDING_HANDSHAKES,
        max_per_source: int = MAX_PENDING_HANDSHAKES_PER_SOURCE,
        max_bytes: int = MAX_PENDING_HANDSHAKE_BYTES,
    ) -> None:
        self._ttl_ms = ttl_ms
        self._max_total = max_total
        self._max_per_source = max_per_source
        self._max_bytes = max_bytes
        self._items: OrderedDict[bytes, _Pending] = OrderedDict()
        self._by_source: dict[str, list[bytes]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, challenge: bytes, source: str, hello: Hello, now_ms: int) -> None:
        self.expire(now_ms)
        mine = self._by_source.get(source, [])
        while len(mine) >= self._max_per_source:
            self._drop(mine[0])
        pending = _Pending(now_ms, source, hello, hello.size())
        while self._items and (len(self._items) >= self._max_total or self.bytes + pending.size > self._max_bytes):
            self._drop(next(iter(self._items)))
        self._items[challenge] = pending
        self._by_source.setdefault(source, []).append(challenge)
        self.bytes += pending.size

    def take(self, challenge: bytes, now_ms: int) -> Hello | None:
        """The hello a challenge was issued for (once), or None if unknown or expired."""
        self.expire(now_ms)
        pending = self._items.get(challenge)
        if pending is None:
            return None
        self._drop(challenge)
        return pending.hello

    def expire(self, now_ms: int) -> None:
        while self._items:
            challenge, pending = next(iter(self._items.items()))
            if pending.issued_ms > now_ms - self._ttl_ms:
                return
            self._drop(challenge)

    def _drop(self, challenge: bytes) -> None:
        pending = self._items.pop(challenge)
        self.bytes -= pending.size
        mine = self._by_source[pending.source]
        mine.remove(challenge)
        if not mine:
            del self._by_source[pending.source]


@dataclass(slots=True)
class _Held:
    entries: dict[bytes, tuple[bytes, int]]  # entry ID -> (database, bytes)
    bytes: int = 0
    settled_at: float = -math.inf  # time.monotonic() of the last settle


class UnverifiedBudget:
    """What each peer has left stored Unverified here, bounded per peer.

    ``check`` before storing a peer's entries (when over, it first forgets those that have
    settled since, at most once per ``SETTLE_INTERVAL_S`` per peer, so a peer hammering at
    its bound costs a dict lookup per request, not a status lookup per held entry); ``add``
    what a put left Unverified. At most ``max_peers`` are tracked, least recently charged
    dropped first. Shared by the serving side (pushes) and the asking side (answers).
    """

    def __init__(
        self,
        instance: Instance,
        *,
        max_entries: int = MAX_UNVERIFIED_PER_PEER,
        max_bytes: int = MAX_UNVERIFIED_BYTES_PER_PEER,
        max_peers: int = MAX_BUDGET_PEERS,
    ) -> None:
        self._instance = instance
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._max_peers = max_peers
        self._held: OrderedDict[str, _Held] = OrderedDict()

    def held(self, peer: str) -> tuple[int, int]:
        """(entries, bytes) the peer is charged with."""
        held = self._held.get(peer)
        return (len(held.entries), held.bytes) if held else (0, 0)

    def _fits(self, peer: str, entries: int, size: int) -> bool:
        count, held_bytes = self.held(peer)
        return count + entries <= self.max_entries and held_bytes + size <= self.max_bytes

    def check(self, peer: str, entries: int, size: int) -> None:
        """Raise ``OverBudgetError`` unless ``entries`` more (``size`` bytes) fit in the peer's budget."""
        if self._fits(peer, entries, size):
            return
        self._settle(peer)
        if not self._fits(peer, entries, size):
            count, held_bytes = self.held(peer)
            raise OverBudgetError(
                f"{count} entries ({held_bytes // 1024} KiB) from {peer} wait here Unverified; the limit is "
                f"{self.max_entries} entries or {self.max_bytes // (1024 * 1024)} MiB: send their parents first"
            )

    def add(self, peer: str, db: bytes, result: PutResult, raws: Sequence[bytes]) -> None:
        """Charge the peer with what ``result`` left Unverified (``raws``: what it sent)."""
        held = self._held.get(peer)
        if held is not None and result.verified:
            held.settled_at = -math.inf  # progress: what it left may have settled, look again next time
        if not result.unverified:
            return
        sizes = {cid_of(raw): len(raw) for raw in raws}
        if held is None:
            held = self._held[peer] = _Held({})
        self._held.move_to_end(peer)
        for cid in result.unverified:
            if cid not in held.entries:
                size = sizes.get(cid, 0)
                held.entries[cid] = (db, size)
                held.bytes += size
        while len(self._held) > self._max_peers:
            self._held.popitem(last=False)

    def _settle(self, peer: str) -> None:
        """Forget the peer's entries that are no longer Unverified (their parents came)."""
        held = self._held.get(peer)
        now = time.monotonic()
        if held is None or now - held.settled_at < SETTLE_INTERVAL_S:
            return
        held.settled_at = now
        databases: dict[bytes, Database | None] = {}
        for cid, (db_cid, size) in list(held.entries.items()):
            if db_cid not in databases:
                present = self._instance.has_database(db_cid)
                databases[db_cid] = self._instance.open_database(db_cid) if present else None
            db = databases[db_cid]
            if db is None or db.status_of(cid) is not Status.UNVERIFIED:
                del held.entries[cid]
                held.bytes -= size
        if not held.entries:
            del self._held[peer]


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
        on_exchange: Callable[[Database, str, list[bytes]], None] | None = None,
        budget: UnverifiedBudget | None = None,
    ) -> None:
        self._instance = instance
        self._key: SigningKey = instance.device_key
        self._state = state
        self._display_name = display_name
        self._now_ms = now_ms
        self._addresses = addresses
        self._offload = offload
        self._on_exchange = on_exchange
        self._guard = proofs.ReplayGuard(started_ms=now_ms())
        self.pending = PendingHandshakes()
        self._hellos: OrderedDict[str, Hello] = OrderedDict()  # confirmed peers, LRU, in memory only
        self.budget = budget or UnverifiedBudget(instance)
        self._unreadable_logged: set[str] = set()
        self.stats = ServeStats()

    def hello_of(self, pubkey: str) -> Hello | None:
        """What a recently confirmed handshake of ``pubkey`` said (name, addresses), if remembered."""
        return self._hellos.get(pubkey)

    def expire(self) -> None:
        """Drop expired pending handshakes (housekeeping; every handshake does it too)."""
        self.pending.expire(self._now_ms())

    async def handle(self, message: Message, context: RequestContext) -> AsyncIterator[Message]:
        """Answer one request; never raises for anything a peer can send."""
        self.stats.requests += 1
        try:
            match message:
                case Handshake():
                    yield self._handshake(message, context)
                case HandshakeConfirm():
                    yield self._confirm(message)
                case SyncTree():
                    async for answer in self._sync_tree(message, context):
                        yield answer
                case SendEntries():
                    yield await self._send_entries(message, context)
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

    def _handshake(self, message: Handshake, context: RequestContext) -> HandshakeReply:
        if message.version != PROTOCOL_VERSION:
            raise VersionMismatchError(
                f"peer speaks protocol version {message.version}, this node speaks {PROTOCOL_VERSION}"
            )
        counter = os.urandom(CHALLENGE_BYTES)
        self.pending.add(counter, _source(context), Hello.trimmed(message), self._now_ms())
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
        offers: list[DatabaseOffer] = []
        for db in self._instance.databases():
            if db.id == self._state.database_id:
                continue
            if len(offers) == MAX_LIST:  # what a peer decodes; more would fail the whole handshake
                break
            try:
                public = _global_covers(db, Permission.read())
                name = db.name if public else None
            except Exception as exc:  # one database's content must never fail a handshake
                self._unreadable(db, exc)
                public, name = False, None
            offers.append(DatabaseOffer(db.root_cid, name, public))
        return offers

    def _unreadable(self, db: Database, exc: Exception) -> None:
        """Log, once per database, that its settings cannot be read (it is offered as private)."""
        if db.id in self._unreadable_logged or len(self._unreadable_logged) >= MAX_UNREADABLE_LOGGED:
            return
        self._unreadable_logged.add(db.id)
        log.warning("offering %s as private: its settings cannot be read (%s: %.200s)", db.id, type(exc).__name__, exc)

    def _confirm(self, message: HandshakeConfirm) -> Ack:
        hello = self.pending.take(message.counter_challenge, self._now_ms())
        if hello is None:
            raise UnauthorizedError("unknown or expired handshake challenge")
        if hello.device_key != message.device_key:
            raise UnauthorizedError("handshake confirmed by another key than the one that started it")
        if not proofs.check_challenge(message.device_key, message.counter_challenge, message.signature):
            raise UnauthorizedError("handshake signature does not verify")
        # Remembered in memory only: a peer is written to _sync once it reads something.
        self._hellos[hello.device_key] = hello
        self._hellos.move_to_end(hello.device_key)
        while len(self._hellos) > MAX_RECENT_HELLOS:
            self._hellos.popitem(last=False)
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

    async def _put(self, db: Database, entries: tuple[bytes, ...], peer: str) -> PutResult:
        """Store a peer's entries within its Unverified budget (raises ``OverBudgetError`` first)."""
        self.budget.check(peer, len(entries), sum(len(raw) for raw in entries))
        result: PutResult = await self._offload(
            lambda: self._instance.put_remote_entries(entries, database_id=db.root_cid)
        )
        self.budget.add(peer, db.root_cid, result, entries)
        self.stats.entries_received += len(entries)
        return result

    async def _sync_tree(self, message: SyncTree, context: RequestContext) -> AsyncIterator[Message]:
        db = self._database(message.db)
        try:
            self._access(db, message)
        except AccessPendingError as pending:
            assert pending.request_id is not None
            yield BootstrapPending(message.db, pending.request_id, "access request waits for an admin of this database")
            return
        received = 0
        if message.entries:
            result = await self._put(db, message.entries, _charged(message, context))
            received = len(result.verified)
        bootstrap = not message.tips and not message.entries
        tips = tuple(db.tip_cids())
        budget = AnswerBudget(message.budget)
        if not budget.limited:
            self._exchanged(db, message, tips)
        if bootstrap:
            fixed = budget.fixed(Bootstrap(message.db, tips, (), more=True))
            frames = self._bootstrap_frames(db, budget, fixed)
        else:
            fixed = budget.fixed(Incremental(message.db, tips, (), received=received, more=True))
            frames = self._incremental_frames(db, message, budget, fixed)
        async for frame, last in frames:
            if last and budget.limited:
                self._exchanged(db, message, tips)  # only an answer that did not stop early
            self.stats.entries_sent += len(frame)
            if bootstrap:
                yield Bootstrap(message.db, tips if last else (), tuple(frame), more=not last)
            else:
                yield Incremental(message.db, tips if last else (), tuple(frame), received=received, more=not last)

    def _exchanged(self, db: Database, message: SyncTree, tips: tuple[bytes, ...]) -> None:
        """Record that the asker will hold our tips (and we those of its tips we know)."""
        if message.auth is not None and self._on_exchange is not None:
            common = sorted({*tips, *(t for t in message.tips if db.status_of(t) is Status.VERIFIED)})
            self._on_exchange(db, message.auth.key, common)

    async def _incremental_frames(
        self, db: Database, message: SyncTree, budget: AnswerBudget, fixed: int
    ) -> AsyncIterator[tuple[list[bytes], bool]]:
        """What the asker lacks, parents first, each frame read from storage as it goes
        (memory stays bounded by a frame); stops early when the budget is used up."""
        boundary = (*message.tips, *message.common, *message.have)
        cids = await self._offload(lambda: entries_for(db, boundary))
        start = 0
        limit = FIRST_FRAME_ENTRIES
        while True:
            chunk = cids[start : start + limit]
            limit = min(2 * limit, ANSWER_BATCH_ENTRIES)
            read = functools.partial(_frame_raws, db, chunk, budget.room(fixed), budget.first_room(fixed), budget.cost)
            taken, frame = await self._offload(read) if chunk else (0, [])
            if chunk and not taken:
                budget.ran_out(db, chunk[0])
                return
            start += taken
            last = start >= len(cids)
            budget.spend(fixed, frame)
            yield frame, last
            if last:
                return

    async def _bootstrap_frames(
        self, db: Database, budget: AnswerBudget, fixed: int
    ) -> AsyncIterator[tuple[list[bytes], bool]]:
        """Every verified entry, parents first, a page of storage per frame; stops early when
        the budget is used up (the asker then holds a prefix: everything below some height).

        Paged by position (height, ID), so the first frame goes out after one small read
        instead of after listing the whole history, and neither side holds the list.
        """
        after: tuple[int, bytes] | None = None
        limit = FIRST_FRAME_ENTRIES
        while True:
            page = await self._offload(functools.partial(db.entries_page, after, limit + 1))
            room, first_room = budget.room(fixed), budget.first_room(fixed)
            frame: list[bytes] = []
            size = 0
            for cid, height, raw in page[:limit]:
                cost = budget.cost(raw)
                if size + cost > (room if frame else first_room):
                    break
                frame.append(raw)
                size += cost
                after = (height, cid)
            if page and not frame:
                budget.ran_out(db, page[0][0])
                return
            last = len(frame) == len(page)  # the one extra row read says whether more follow
            budget.spend(fixed, frame)
            yield frame, last
            if last:
                return
            limit = min(2 * limit, ANSWER_BATCH_ENTRIES)

    async def _send_entries(self, message: SendEntries, context: RequestContext) -> Message:
        db = self._database(message.db)
        self._read_gate(db, message, ())  # SendEntries proofs sign an empty tip list
        if not message.entries:
            return Ack()
        result = await self._put(db, message.entries, _charged(message, context))
        return Count(len(message.entries), len(result.verified), len(result.failed))


def _frame_raws(
    db: Database, cids: list[bytes], room: int, first_room: int, cost: Callable[[bytes], int]
) -> tuple[int, list[bytes]]:
    """How many of ``cids`` one frame takes and their bytes: what fits in ``room``, or the
    first one alone in ``first_room`` (see ``AnswerBudget``)."""
    found = db.raw_map(cids)
    raws: list[bytes] = []
    size = 0
    for index, cid in enumerate(cids):
        raw = found.get(cid)
        if raw is None:
            continue
        entry_cost = cost(raw)
        if size + entry_cost > (room if raws else first_room):
            return index, raws
        raws.append(raw)
        size += entry_cost
    return len(cids), raws


class AnswerBudget:
    """What an answer may still take on the wire (a ``SyncTree``'s ``budget``), frame by frame.

    Unlimited (``0``) changes nothing: frames are as large as ``ANSWER_BATCH_BYTES`` allows and
    carry at least one entry. Limited, a frame takes only entries that fit, counted with
    their overhead, in at most a quarter of the budget (a larger entry travels alone); the
    answer stops (its last frame marked ``more``) when the next entry does not fit what is
    left, and an entry that does not fit a whole answer raises ``LimitError``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit
        self.frames = 0

    @property
    def limited(self) -> bool:
        return self.limit > 0

    def fixed(self, empty: Message) -> int:
        """What a frame like ``empty`` costs without its entries (prefix and array header too)."""
        return FRAME_PREFIX_BYTES + ARRAY_HEADER_BYTES + len(encode_message(empty)) if self.limited else 0

    def cost(self, raw: bytes) -> int:
        return len(raw) + ENTRY_OVERHEAD_BYTES if self.limited else len(raw)

    def room(self, fixed: int) -> int:
        """Bytes of entries (with their overhead) the next frame may carry."""
        if not self.limited:
            return ANSWER_BATCH_BYTES
        share = max(self.limit // BUDGET_FRAME_SHARE, MIN_BUDGET_FRAME_BYTES)
        return max(0, min(ANSWER_BATCH_BYTES, share, self.left - fixed))

    def first_room(self, fixed: int) -> int:
        """Bytes the first entry of a frame may take: all that is left (a large entry travels
        alone), and any size without a budget (a frame carries at least one entry)."""
        return max(0, self.left - fixed) if self.limited else MAX_ENTRY_BYTES_UNLIMITED

    def spend(self, fixed: int, frame: list[bytes]) -> None:
        self.frames += 1
        if self.limited:
            self.left -= fixed + sum(len(raw) + ENTRY_OVERHEAD_BYTES for raw in frame)

    def ran_out(self, db: Database, cid: bytes) -> None:
        """The next entry does not fit: the answer ends here, or, if it is the first, it never can."""
        if self.frames:
            return
        size = len(db.raws([cid])[0])
        raise LimitError(
            f"entry {cid_to_text(cid)} is {size} bytes, more than the {self.limit} bytes this connection"
            " may carry in one answer (a relay circuit's data limit): it needs a direct connection to the peer"
        )


def _source(context: RequestContext) -> str:
    """Who a request came from, as far as the transport knows (peer ID, else the remote end)."""
    return context.peer or context.remote or context.transport


def _charged(message: SyncTree | SendEntries, context: RequestContext) -> str:
    """Whose budget a request's entries count against: the proven key, else its source."""
    return message.auth.key if message.auth is not None else _source(context)


def _refusal(key: str | None) -> UnauthorizedError:
    if key is None:
        return UnauthorizedError("this database needs a request signed by a key with read or better")
    return UnauthorizedError(f"key {key} may not read this database")


def _global_covers(db: Database, wanted: Permission) -> bool:
    grant = db.settings().auth().global_grant
    return grant is not None and grant.active and grant.permission.covers(wanted)
