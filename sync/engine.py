"""The sync frontend and its background engine.

``enable_sync(instance)`` opens a :class:`Sync`: it wires a handler (serving), the
transports (registered by name, started only by ``accept_connections``) and one engine
task that owns a command channel. Commands come from the frontend and from write
callbacks (which may fire on any thread: they go through the trio token).

Engine invariants:
1. One worker task per peer at most; a peer's databases are synced one at a time, and a
   database scheduled again while it syncs is synced again afterwards (coalescing).
2. A failed sync is retried after 2^n s (at most 64 s), at most ``retry_attempts`` times;
   then it waits for the next commit or period.
3. A failure concerns one peer: it never stops the others or the engine.
4. Every outcome moves the peer's cursor (on success) and adds one bounded history row.
5. The engine dials only peers the local side chose: ones it connected to, joined from,
   that were registered (``register_sync_peer``, ``state.relate``), or whose key an admin
   named in the database's settings. A peer that only read from us is a *served*
   relationship: recorded, never dialled, pushed to or scheduled, whatever address it
   announced (announced addresses are hints, at most ``MAX_PEER_ADDRESSES`` per peer).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from dag import Database, Instance, NotFoundError, cid_to_text

from .client import ExchangeResult, PeerHello
from .errors import (
    AccessError,
    SyncError,
    TicketError,
    TransportError,
    UnreachableError,
)
from .handler import CHALLENGE_TTL_MS, Offload, SyncHandler, UnverifiedBudget
from .messages import Message
from .peer import handshake, sync_database
from .state import DEFAULT_INTERVAL_S, AccessRequest, PeerRecord, Relationship, SyncState
from .ticket import Ticket
from .transport import Address, BackgroundTransport, LiveConnections, RequestContext, TaskStatus, Transport

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 64
COMMAND_BUFFER = 10_000
HOUSEKEEPING_S = CHALLENGE_TTL_MS / 2000  # expired pending handshakes go within half their lifetime


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """Engine settings; keyword-only, with the defaults the design names."""

    display_name: str | None = None
    retry_attempts: int = 8
    request_timeout_s: float = 60.0
    default_interval_s: int = DEFAULT_INTERVAL_S
    flush_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class SyncPeerInfo:
    """Declares the intent to sync ``db_id`` with the peer ``pubkey`` (see ``register_sync_peer``)."""

    pubkey: str
    db_id: str
    addresses: tuple[Address, ...] = ()
    access: str | None = None
    display_name: str | None = None
    on_commit: bool = True
    interval_s: int = DEFAULT_INTERVAL_S


@dataclass(frozen=True, slots=True)
class SyncStatus:
    has_local_data: bool
    last_sync_ms: int | None
    last_error: str | None


class SyncHandle:
    """Tracks one (database, peer) relationship."""

    def __init__(self, sync: Sync, db_id: str, pubkey: str) -> None:
        self._sync = sync
        self.db_id = db_id
        self.pubkey = pubkey

    def status(self) -> SyncStatus:
        return self._sync.sync_status(self.db_id, self.pubkey)

    def add_address(self, address: Address) -> None:
        self._sync.state.upsert_peer(self.pubkey, addresses=[address])
        self._sync.schedule(self.pubkey, self.db_id)

    async def wait_for_initial_sync(self, *, poll_s: float = 0.05) -> None:
        """Return once the database has local data (wrap in ``trio.fail_after`` to bound it)."""
        while not self.status().has_local_data:
            await trio.sleep(poll_s)


@dataclass
class _PeerWork:
    due: dict[str, float] = field(default_factory=dict)  # db id -> trio time
    pull: set[str] = field(default_factory=set)  # due databases that must exchange even with nothing to push
    attempts: dict[str, int] = field(default_factory=dict)
    running: bool = False
    busy: bool = False
    wake: trio.Event = field(default_factory=trio.Event)


class Sync:
    """The public sync API of a node (mirrors upstream's, in Python and trio)."""

    def __init__(
        self,
        instance: Instance,
        *,
        config: SyncConfig,
        now_ms: Callable[[], int],
        offload: Offload[Any],
    ) -> None:
        self.instance = instance
        self.config = config
        self.state = SyncState.open(instance)
        self._now_ms = now_ms
        self._offload = offload
        self._transports: dict[str, Transport] = {}
        self._serving: set[str] = set()
        self._peers_by_address: dict[Address, str] = {}
        self._work: dict[str, _PeerWork] = {}
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._commands_in, self._commands_out = trio.open_memory_channel[tuple[str, Any]](COMMAND_BUFFER)
        self._changed = trio.Event()
        self._writes_queued: set[str] = set()
        self._peer_locks: dict[str, trio.Lock] = {}
        self._closed = False
        name = config.display_name or self.state.get_setting("display_name") or instance.device_id[8:20]
        self.display_name = str(name)
        self.budget = UnverifiedBudget(instance)  # one per node: a peer's pushes and answers share it
        self.handler = SyncHandler(
            instance,
            self.state,
            display_name=self.display_name,
            now_ms=now_ms,
            addresses=self.listen_addresses,
            offload=offload,
            on_exchange=self._on_exchange,
            budget=self.budget,
        )
        self._callback = instance.on_write(self._on_write)

    # ---- settings, identity -------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self.instance.device_id

    def get_setting(self, key: str) -> Any:
        return self.state.get_setting(key)

    def set_setting(self, key: str, value: Any) -> None:
        self.state.set_setting(key, value)

    # ---- transports ------------------------------------------------------------------

    def register_transport(self, name: str, transport: Transport) -> None:
        """Make ``transport`` reachable under ``name`` (addresses ``name:...`` route to it)."""
        if name in self._transports:
            raise SyncError(f"a transport named {name!r} is already registered")
        self._transports[name] = transport
        if isinstance(transport, BackgroundTransport):
            self._require_nursery().start_soon(transport.run)
        if self._nursery is not None and not self._closed:
            # Resume: every relationship kept in _sync whose peer this transport reaches.
            for relation in self.state.relationships():
                peer = self.state.peer(relation.peer)
                if self._dialled(relation) and peer is not None and any(a.transport == name for a in peer.addresses):
                    self.schedule(relation.peer, relation.db)

    async def accept_connections(self) -> None:
        """Start serving on every registered transport. Nothing listens before this."""
        nursery = self._require_nursery()
        for name, transport in self._transports.items():
            if name not in self._serving:
                await nursery.start(self._serve, name, transport)
                self._serving.add(name)

    async def _serve(self, name: str, transport: Transport, *, task_status: TaskStatus[None]) -> None:
        async def handle(message: Message, context: RequestContext) -> AsyncIterator[Message]:
            async for answer in self.handler.handle(message, context):
                yield answer

        await transport.serve(handle, task_status=task_status)

    def listen_addresses(self) -> list[Address]:
        return [
            Address(name, address)
            for name, transport in self._transports.items()
            if name in self._serving
            for address in transport.listen_addresses()
        ]

    def _transport_for(self, address: Address) -> Transport:
        transport = self._transports.get(address.transport)
        if transport is None:
            raise UnreachableError(f"no transport registered for {address.transport!r} addresses")
        return transport

    # ---- tickets ---------------------------------------------------------------------

    def create_ticket(self, db_id: str) -> Ticket:
        self.instance.open_database(db_id)  # raises NotFoundError for an unknown database
        return Ticket(db_id, tuple(self.listen_addresses()))

    async def join(self, ticket: str | Ticket, *, access: str | None = None) -> Database:
        """Bootstrap the ticket's database from whichever of its addresses answers first."""
        parsed = Ticket.parse(ticket) if isinstance(ticket, str) else ticket
        if not parsed.addresses:
            raise TicketError("ticket has no usable address")
        errors: list[str] = []
        refusal: AccessError | None = None
        for address in parsed.addresses:
            try:
                await self.sync_with_peer(address, parsed.db, access=access)
                return self.instance.open_database(parsed.db)
            except AccessError as exc:  # an answer, not a failure to reach: say what it was
                refusal = refusal or exc
            except (SyncError, NotFoundError) as exc:
                errors.append(f"{address}: {exc}")
        if refusal is not None:
            raise refusal
        raise UnreachableError("no address in the ticket answered: " + "; ".join(errors))

    # ---- outbound --------------------------------------------------------------------

    async def connect(self, address: Address) -> PeerHello:
        """Handshake with the peer at ``address`` and remember it."""
        transport = self._transport_for(address)
        with trio.fail_after(self.config.request_timeout_s):
            hello = await handshake(
                transport, address.address, self.instance.device_key, self.display_name, self.listen_addresses()
            )
        self._peers_by_address[address] = hello.pubkey
        self.state.upsert_peer(
            hello.pubkey, display_name=hello.display_name, addresses=[address, *hello.addresses], seen_ms=self._now_ms()
        )
        return hello

    async def sync_with_peer(self, address: Address, db_id: str | None = None, *, access: str | None = None) -> str:
        """Sync now with the peer at ``address``: one database, or every one both hold.

        Registers the relationship, so the peer is kept in sync from now on (on commit and
        periodically). Returns the peer's public key.
        """
        hello = await self.connect(address)
        if db_id is not None:
            targets = [db_id]
        else:
            ours = {db.root_cid for db in self.instance.databases()}
            targets = [cid_to_text(db) for db in hello.databases if db in ours]
        for target in targets:
            self.state.ensure_related(target, hello.pubkey, interval_s=self.config.default_interval_s, access=access)
            await self._sync_now(hello.pubkey, target, raise_errors=True)
        return hello.pubkey

    async def sync_now(self, peer: str, db_id: str) -> None:
        """One exchange for ``db_id`` with a known peer, now; raises what went wrong."""
        await self._sync_now(peer, db_id, raise_errors=True)

    def register_sync_peer(self, info: SyncPeerInfo) -> SyncHandle:
        """Declare that ``info.db_id`` syncs with ``info.pubkey``; syncing starts in the background."""
        self.state.upsert_peer(info.pubkey, display_name=info.display_name, addresses=info.addresses)
        self.state.relate(
            info.db_id, info.pubkey, on_commit=info.on_commit, interval_s=info.interval_s, access=info.access
        )
        self.schedule(info.pubkey, info.db_id)
        return SyncHandle(self, info.db_id, info.pubkey)

    def sync_status(self, db_id: str, pubkey: str) -> SyncStatus:
        cursor = self.state.cursor(db_id, pubkey)
        return SyncStatus(self.instance.has_database(db_id), cursor.last_sync_ms, cursor.last_error)

    def peers(self) -> list[PeerRecord]:
        return self.state.peers()

    # ---- access requests (serving side) ------------------------------------------------

    def access_requests(self, status: str | None = None) -> list[AccessRequest]:
        return self.state.access_requests(status)

    def approve_request(self, request_id: str) -> AccessRequest:
        """Grant the request with this node's key (it must be an admin of that database)."""
        from dag import Permission

        request = next((r for r in self.state.access_requests() if r.request_id == request_id), None)
        if request is None:
            raise NotFoundError(f"no access request {request_id}")
        db = self.instance.open_database(request.db)
        with db.transaction() as txn:
            txn.settings().add_key(request.key, Permission.parse(request.permission))
        return self.state.decide_request(request_id, "approved", self._now_ms())

    def reject_request(self, request_id: str) -> AccessRequest:
        return self.state.decide_request(request_id, "rejected", self._now_ms())

    # ---- the engine ------------------------------------------------------------------

    def _require_nursery(self) -> trio.Nursery:
        if self._nursery is None or self._closed:
            raise SyncError("sync is not running (use it inside `async with enable_sync(...)`)")
        return self._nursery

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The engine: serves commands until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            nursery.start_soon(self._periodic)
            nursery.start_soon(self._housekeeping)
            task_status.started()
            async for command, argument in self._commands_out:
                if self._closed:
                    continue  # shutting down: the flush already ran
                if command == "write":
                    self._writes_queued.discard(argument)
                    for relation in self.state.relationships(argument):
                        reachable = self._dialled(relation) or bool(self._live_addresses(relation.peer))
                        if relation.on_commit and reachable:
                            self.schedule(relation.peer, argument, pull=False)

    def _on_write(self, db: Database, _before: list[str], _after: list[str], _local: bool) -> None:
        """Write callback (any thread): queue a push to the peers of that database."""
        if self._token is None or self._closed or db.id == self.state.database_id:
            return
        try:
            in_trio = trio.lowlevel.current_trio_token() is self._token
        except RuntimeError:
            in_trio = False
        if in_trio:
            self._queue_write(db.id)
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._queue_write, db.id)

    def _queue_write(self, db_id: str) -> None:
        if db_id in self._writes_queued:
            return  # a burst of commits is one push: the command is already waiting
        try:
            self._commands_in.send_nowait(("write", db_id))
        except (trio.WouldBlock, trio.ClosedResourceError):
            log.warning("sync command queue full; %s will sync at its next period", db_id)
            return
        self._writes_queued.add(db_id)

    def _on_exchange(self, db: Database, peer: str, common: list[bytes]) -> None:
        """The handler served ``peer`` a read it may make: it now holds ``common``.

        This is the first point a peer that came to us is written to ``_sync``: as a served
        relationship (never dialled), with what its handshake said, and only while fewer
        than ``MAX_SERVED_PEERS`` readers are recorded (past that it is served unrecorded).
        """
        if not self.state.may_record_served(peer):
            return
        if self.state.peer(peer) is None:
            hello = self.handler.hello_of(peer)
            self.state.upsert_peer(
                peer,
                display_name=hello.display_name if hello else None,
                addresses=hello.addresses if hello else (),
                seen_ms=self._now_ms(),
            )
        self.state.ensure_related(db.id, peer, interval_s=self.config.default_interval_s, served=True)
        self.state.record_sync(db.id, peer, now_ms=self._now_ms(), common=common, sent=0, received=0, error=None)

    def _live_addresses(self, peer: str) -> list[Address]:
        """Addresses that reach ``peer`` over a connection it holds open to us (no dial)."""
        found = []
        for name, transport in self._transports.items():
            if isinstance(transport, LiveConnections):
                address = transport.live_address(peer)
                if address is not None:
                    found.append(Address(name, address))
        return found

    def _dialled(self, relation: Relationship) -> bool:
        """Whether the engine initiates exchanges for this relationship.

        Yes for one the local side made (connect, join, register, relate). A served one (the
        peer read from us) only once an admin named the peer's key in that database's
        settings (say, by approving its access request): that is the local side's choice too.
        """
        if not relation.served:
            return True
        try:
            grant = self.instance.open_database(relation.db).settings().auth().keys.get(relation.peer)
            return grant is not None and grant.active  # named by an admin; a global grant names no one
        except Exception:  # unreadable settings: no reason to dial, so do not
            return False

    def schedule(self, peer: str, db_id: str, delay_s: float = 0.0, *, pull: bool = True) -> None:
        """Sync ``db_id`` with ``peer`` after ``delay_s`` (sooner if already due).

        ``pull=False`` (sync on commit) skips the exchange when the peer lacks nothing.
        """
        nursery = self._require_nursery()
        work = self._work.setdefault(peer, _PeerWork())
        due = trio.current_time() + delay_s
        work.due[db_id] = min(work.due.get(db_id, math.inf), due)
        if pull:
            work.pull.add(db_id)
        if not work.running:
            work.running = True
            nursery.start_soon(self._peer_worker, peer, work)
        else:
            work.wake.set()

    async def _peer_worker(self, peer: str, work: _PeerWork) -> None:
        try:
            while work.due:
                now = trio.current_time()
                ready = sorted(db for db, due in work.due.items() if due <= now)
                if not ready:
                    with trio.move_on_at(min(work.due.values())):
                        await work.wake.wait()
                    work.wake = trio.Event()
                    continue
                for db_id in ready:
                    del work.due[db_id]
                    pull = db_id in work.pull
                    work.pull.discard(db_id)
                    work.busy = True
                    try:
                        ok = await self._sync_now(peer, db_id, raise_errors=False, push_only=not pull)
                    finally:
                        work.busy = False
                    if ok:
                        work.attempts.pop(db_id, None)
                        continue
                    attempt = work.attempts.get(db_id, 0) + 1
                    if attempt > self.config.retry_attempts:
                        work.attempts.pop(db_id, None)
                        log.warning("giving up on %s with %s until its next trigger", db_id, peer)
                        continue
                    work.attempts[db_id] = attempt
                    work.pull.add(db_id)
                    retry_at = trio.current_time() + min(2**attempt, MAX_BACKOFF_S)
                    work.due[db_id] = min(work.due.get(db_id, math.inf), retry_at)
        finally:
            work.running = False
            self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _sync_now(self, peer: str, db_id: str, *, raise_errors: bool, push_only: bool = False) -> bool:
        """One exchange with ``peer`` for ``db_id`` over any of its addresses.

        Exchanges with one peer never overlap (a push queued by a bootstrap's own writes
        waits for the bootstrap's cursor, and then finds nothing to send).
        """
        async with self._peer_locks.setdefault(peer, trio.Lock()):
            return await self._exchange(peer, db_id, raise_errors=raise_errors, push_only=push_only)

    async def _exchange(self, peer: str, db_id: str, *, raise_errors: bool, push_only: bool) -> bool:
        relation = next((r for r in self.state.relationships(db_id) if r.peer == peer), None)
        if relation is not None and not self._dialled(relation):
            # A peer that only read from us: its addresses are its own claims, so they are
            # never dialled (that would let anyone aim this node at any host). Only a
            # connection it holds open to us carries the exchange; else it syncs itself.
            addresses = self._live_addresses(peer)
            if not addresses:
                refused = SyncError(
                    f"peer {peer} only reads {db_id} from this node and holds no connection to it;"
                    " it is not dialled (it syncs itself)"
                )
                if raise_errors:
                    raise refused
                log.info("%s", refused)
                return True
        else:
            record = self.state.peer(peer)
            addresses = list(record.addresses) if record else []
            addresses += [a for a, key in self._peers_by_address.items() if key == peer and a not in addresses]
        access = relation.access if relation else None
        cursor = self.state.cursor(db_id, peer)
        error: Exception | None = None
        for address in addresses:
            if address.transport not in self._transports:
                continue
            try:
                with trio.fail_after(self.config.request_timeout_s):
                    result = await sync_database(
                        instance=self.instance,
                        transport=self._transport_for(address),
                        address=address.address,
                        peer_key=peer,
                        db_id=db_id,
                        common=cursor.common,
                        access=access,
                        now_ms=self._now_ms,
                        offload=self._offload,
                        push_only=push_only,
                        budget=self.budget,
                    )
            except trio.TooSlowError as exc:
                error = TransportError(f"{address}: no answer in {self.config.request_timeout_s:g} s")
                error.__cause__ = exc
                continue
            except (SyncError, NotFoundError) as exc:
                error = exc
                if isinstance(exc, TransportError):
                    continue
                break
            if not result.skipped:
                self._record(db_id, peer, result, None)
            return True
        if error is None:
            error = UnreachableError(f"no known address reaches peer {peer}")
        self._record(db_id, peer, None, str(error))
        if raise_errors:
            raise error
        log.info("sync of %s with %s failed: %s", db_id, peer, error)
        return False

    def _record(self, db_id: str, peer: str, result: ExchangeResult | None, error: str | None) -> None:
        self.state.record_sync(
            db_id,
            peer,
            now_ms=self._now_ms(),
            common=result.common if result else None,
            sent=result.sent if result else 0,
            received=result.received if result else 0,
            error=error,
        )
        if result is not None:
            self.state.upsert_peer(peer, seen_ms=self._now_ms())

    async def _periodic(self) -> None:
        """Sync every related (database, peer) pair at its interval."""
        last: dict[tuple[str, str], float] = {}
        while True:
            now = trio.current_time()
            next_due = now + self.config.default_interval_s
            for relation in self.state.relationships():
                if not self._dialled(relation):
                    continue
                key = (relation.db, relation.peer)
                due = last.setdefault(key, now) + relation.interval_s
                if due <= now:
                    last[key] = now
                    self.schedule(relation.peer, relation.db)
                    due = now + relation.interval_s
                next_due = min(next_due, due)
            await trio.sleep(max(0.0, next_due - now))

    async def _housekeeping(self) -> None:
        """Let go of what strangers left behind (expired pending handshakes), on a timer."""
        while True:
            await trio.sleep(HOUSEKEEPING_S)
            self.handler.expire()

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait until nothing is due now and no sync is running (retries later are not waited for)."""
        with trio.move_on_after(timeout_s if timeout_s is not None else self.config.flush_timeout_s):
            if self._token is not None:
                # Write callbacks from other threads are queued on the token: let them land.
                landed = trio.Event()
                self._token.run_sync_soon(landed.set)
                await landed.wait()
            await trio.sleep(0)
            while True:
                now = trio.current_time()
                pending = any(
                    w.busy or any(due <= now for due in w.due.values()) for w in self._work.values() if w.running
                )
                if not pending and not self._commands_out.statistics().current_buffer_used:
                    return
                changed = self._changed
                with trio.move_on_after(0.05):
                    await changed.wait()

    async def aclose(self) -> None:
        """Flush, then stop: no new work is accepted."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        self._callback.remove()
        self._commands_in.close()
        for transport in self._transports.values():
            close = getattr(transport, "aclose", None)
            if close is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await close()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


async def _to_thread(function: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(function)


@asynccontextmanager
async def enable_sync(
    instance: Instance,
    *,
    config: SyncConfig | None = None,
    now_ms: Callable[[], int] = wall_clock_ms,
    offload: Offload[Any] = _to_thread,
) -> AsyncIterator[Sync]:
    """Run sync for ``instance`` for the duration of the block; flushes on the way out."""
    sync = Sync(instance, config=config or SyncConfig(), now_ms=now_ms, offload=offload)
    async with trio.open_nursery() as nursery:
        await nursery.start(sync.run)
        try:
            yield sync
        finally:
            with trio.CancelScope(shield=True):
                await sync.aclose()
            nursery.cancel_scope.cancel()
