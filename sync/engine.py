"""The sync frontend and its background engine.

``enable_sync(instance)`` opens a :class:`Sync`: it wires a handler (serving), the
transports (registered by name, started only by ``accept_connections``) and one engine
task that owns a command channel. Commands come from the frontend and from write
callbacks (which may fire on any thread: they go through the trio token).

When exchanges run (one worker per peer, backoff, periodic runs, flush) is
``sync.scheduler``'s; what one exchange does is ``sync.peer``'s driver over
``sync.client``'s machine; access administration is ``sync.access``; joining from a
ticket is ``sync.ticket``. This class wires them and keeps the public API.

Engine invariants (the scheduling ones are listed in ``sync.scheduler``):
1. Every outcome moves the peer's cursor (on success) and adds one bounded history row, in
   ``sync.ledger`` (local, batched off the loop), not as an entry of ``_sync``.
2. The engine dials only peers the local side chose: ones it connected to, joined from,
   that were registered (``register_sync_peer``, ``state.relate``), or whose key an admin
   named in the database's settings. A peer that only read from us is a *served*
   relationship: recorded, never dialled, pushed to or scheduled, whatever address it
   announced (announced addresses are hints, at most ``MAX_PEER_ADDRESSES`` per peer).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from dag import Database, Instance, cid_to_text

from .access import AccessAdmin
from .client import PeerHello
from .errors import (
    SyncError,
    UnreachableError,
)
from .exchanges import ExchangeRunner
from .handler import CHALLENGE_TTL_MS, Offload, SyncHandler, UnverifiedBudget
from .messages import Message
from .peer import handshake
from .reach import Reach
from .rejoin import ReturnWatcher
from .scheduler import Scheduler
from .state import DEFAULT_INTERVAL_S, AccessRequest, PeerRecord, SyncState
from .ticket import Ticket, join_any
from .transport import (
    Address,
    BackgroundTransport,
    ClosingTransport,
    RequestContext,
    TaskStatus,
    Transport,
)

log = logging.getLogger(__name__)

HOUSEKEEPING_S = CHALLENGE_TTL_MS / 2000  # expired pending handshakes go within half their lifetime


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncConfig:
    """Engine settings, with the defaults the design names (keyword-only: ``SyncConfig(retry_attempts=3)``)."""

    display_name: str | None = None
    retry_attempts: int = 8
    request_timeout_s: float = 60.0  # a handshake, a first answer frame, a push
    progress_timeout_s: float = 30.0  # each further answer frame (docs/security.md)
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
        self._token: trio.lowlevel.TrioToken | None = None
        self._writes_queued: set[str] = set()
        self._closed = False
        name = config.display_name or self.state.get_setting("display_name") or instance.device_id[8:20]
        self.display_name = str(name)
        self.budget = UnverifiedBudget(instance)  # one per node: a peer's pushes and answers share it
        self.access = AccessAdmin(instance, self.state, now_ms)
        self.reach = Reach(instance, self.state, self._transports, now_ms=now_ms)
        self.exchanges = ExchangeRunner(
            instance,
            self.state,
            self.reach,
            self._transports,
            budget=self.budget,
            now_ms=now_ms,
            offload=offload,
            request_timeout_s=config.request_timeout_s,
            progress_timeout_s=config.progress_timeout_s,
        )
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
        self.scheduler = Scheduler(
            self._scheduled_exchange,
            relationships=self.state.relationships,
            dialled=self.reach.dialled,
            retry_attempts=config.retry_attempts,
            default_interval_s=config.default_interval_s,
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
        if isinstance(transport, BackgroundTransport):
            self.scheduler.start_soon(transport.run)
        self._transports[name] = transport
        if self.scheduler.running and not self._closed:
            # Resume: every relationship kept in _sync whose peer this transport reaches.
            for relation in self.state.relationships():
                peer = self.state.peer(relation.peer)
                if (
                    self.reach.dialled(relation)
                    and peer is not None
                    and any(a.transport == name for a in peer.addresses)
                ):
                    self.schedule(relation.peer, relation.db)

    async def accept_connections(self) -> None:
        """Start serving on every registered transport. Nothing listens before this."""
        if not self.scheduler.running or self._closed:
            raise SyncError("sync is not running (use it inside `async with enable_sync(...)`)")
        for name, transport in self._transports.items():
            if name not in self._serving:
                await self.scheduler.start(functools.partial(transport.serve, self._handle))
                self._serving.add(name)

    async def _handle(self, message: Message, context: RequestContext) -> AsyncIterator[Message]:
        async for answer in self.handler.handle(message, context):
            yield answer

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

    # ---- tickets and access requests (the work is in sync.ticket and sync.access) -------

    def create_ticket(self, db_id: str) -> Ticket:
        self.instance.open_database(db_id)  # raises NotFoundError for an unknown database
        return Ticket(db_id, tuple(self.listen_addresses()))

    async def join(self, ticket: str | Ticket, *, access: str | None = None) -> Database:
        """Bootstrap the ticket's database from whichever of its addresses answers first."""
        parsed = Ticket.parse(ticket) if isinstance(ticket, str) else ticket
        await join_any(parsed, lambda address: self.sync_with_peer(address, parsed.db, access=access))
        return self.instance.open_database(parsed.db)

    def access_requests(self, status: str | None = None) -> list[AccessRequest]:
        return self.access.requests(status)

    def approve_request(self, request_id: str) -> AccessRequest:
        return self.access.approve(request_id)

    def reject_request(self, request_id: str) -> AccessRequest:
        return self.access.reject(request_id)

    # ---- outbound --------------------------------------------------------------------

    async def connect(self, address: Address) -> PeerHello:
        """Handshake with the peer at ``address`` and remember it."""
        transport = self._transport_for(address)
        with trio.fail_after(self.config.request_timeout_s):
            hello = await handshake(
                transport, address.address, self.instance.device_key, self.display_name, self.listen_addresses()
            )
        self.reach.peers_by_address[address] = hello.pubkey
        self.state.upsert_peer(
            hello.pubkey,
            display_name=hello.display_name,
            addresses=self.reach.refreshed(hello.pubkey, address, hello.addresses),
            seen_ms=self._now_ms(),
            replace_addresses=True,
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
            await self.exchanges.run(hello.pubkey, target, raise_errors=True)
        return hello.pubkey

    async def sync_now(self, peer: str, db_id: str) -> None:
        """One exchange for ``db_id`` with a known peer, now; raises what went wrong."""
        await self.exchanges.run(peer, db_id, raise_errors=True)

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

    def schedule(self, peer: str, db_id: str, delay_s: float = 0.0, *, pull: bool = True) -> None:
        """Sync ``db_id`` with ``peer`` after ``delay_s`` (sooner if already due; see ``sync.scheduler``).

        ``pull=False`` (sync on commit) skips the exchange when the peer lacks nothing.
        """
        self.scheduler.schedule(peer, db_id, delay_s, pull=pull)

    # ---- the engine ------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The engine: the scheduler and the housekeeping timer, until cancelled or closed."""
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.scheduler.run)
            nursery.start_soon(self._housekeeping)
            nursery.start_soon(ReturnWatcher(self.reach, self.state, self.schedule).run)
            nursery.start_soon(self.state.ledger.run, self._offload)  # bookkeeping, batched off the loop
            task_status.started()

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
        if db_id in self._writes_queued or self._closed or not self.scheduler.running:
            return  # a burst of commits is one push: the command is already waiting
        self.scheduler.submit(lambda _nursery: self._written(db_id))
        self._writes_queued.add(db_id)

    def _written(self, db_id: str) -> None:
        """Schedule a push of ``db_id`` to every peer it syncs with on commit that we may reach."""
        self._writes_queued.discard(db_id)
        for relation in self.state.relationships(db_id):
            if relation.on_commit and self.reach.reachable(relation):
                self.schedule(relation.peer, db_id, pull=False)

    def _on_exchange(self, db: Database, peer: str, common: list[bytes]) -> None:
        """The handler served ``peer`` a read it may make: it now holds ``common``.

        This is the first point a peer that came to us is written to ``_sync``: as a served
        relationship (never dialled), with what its handshake said, and only while fewer
        than ``MAX_SERVED_PEERS`` readers are recorded (past that it is served unrecorded).
        """
        if not self.state.may_record_served(peer):
            return
        hello = self.handler.hello_of(peer)
        if self.state.peer(peer) is None:
            self.state.upsert_peer(
                peer,
                display_name=hello.display_name if hello else None,
                addresses=hello.addresses if hello else (),
                seen_ms=self._now_ms(),
            )
        elif hello is not None:  # its latest handshake with us refreshes where it is (written on change only)
            addresses = self.reach.refreshed(peer, None, hello.addresses)
            self.state.upsert_peer(peer, addresses=addresses, replace_addresses=True, seen_ms=self._now_ms())
        self.state.ensure_related(db.id, peer, interval_s=self.config.default_interval_s, served=True)
        self.state.record_sync(db.id, peer, now_ms=self._now_ms(), common=common, sent=0, received=0, error=None)

    async def _scheduled_exchange(self, peer: str, db_id: str, push_only: bool) -> bool:
        return await self.exchanges.run(peer, db_id, raise_errors=False, push_only=push_only)

    async def _housekeeping(self) -> None:
        """Let go of what strangers left behind (expired pending handshakes), on a timer."""
        while True:
            await trio.sleep(HOUSEKEEPING_S)
            self.handler.expire()

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait until nothing is due now and no sync is running (retries later are not waited for)."""
        timeout = timeout_s if timeout_s is not None else self.config.flush_timeout_s
        with trio.move_on_after(timeout):
            if self._token is not None:
                # Write callbacks from other threads are queued on the token: let them land.
                landed = trio.Event()
                self._token.run_sync_soon(landed.set)
                await landed.wait()
            await self.scheduler.flush(timeout)
        await self.state.ledger.flush(self._offload)  # what the exchanges recorded is on disk on return

    async def aclose(self) -> None:
        """Flush, then stop: no new work is accepted, and the transports are closed."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        self._callback.remove()
        for transport in self._transports.values():
            if isinstance(transport, ClosingTransport):
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await transport.aclose()
        self.scheduler.close()
        await self.state.ledger.flush(self._offload)


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
