"""The node's commands, as the control API serves them: one method per CLI command.

Commands are called on the daemon's trio thread, next to the sync engine, and return
the plain dicts typed in ``node/api.py`` (the read side that describes databases and
peers is ``node/views.py``); the control server (``node/control.py``) only routes and encodes.

Reads and writes of storage never run on that thread: a first read of a big store folds
its whole history (15-20 s at 300K entries), and a commit waits for an fsync, and the
event loop that answers ``health`` and serves every peer must not wait for either. The
storage part of a command runs on a worker thread (:meth:`NodeService.off_loop`, at
most ``STORAGE_THREADS`` at once, so a burst of commands cannot start unbounded threads),
through the ``dag`` API, which is thread-safe; what it needs of the sync layer, whose
objects change on the event loop, is read on the loop first and handed over as values.
A user's mistake raises :class:`CommandError` or a ``dag``/``sync`` error with a message
fit to be shown as it is; ``control.py`` maps each to an error code.

Databases are named by ID or, when the name is unique, by name. The node's own ``_sync``
database (its peers, cursors and history) is left out of listings and is never shared.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from dag import Database, Instance, NotFoundError, Permission, cid_from_text, cid_to_text
from dag.errors import BadCidError
from sync import AccessPendingError, Sync, Ticket, UnauthorizedError
from sync.state import Cursor, Relationship
from transports.http_codec import JsonInputError, parse_json

from . import views
from .api import (
    AccessList,
    CreatedDatabase,
    DatabaseDetail,
    DatabaseList,
    DatabaseShow,
    DatabaseSummary,
    Decision,
    HealthResult,
    InfoResult,
    JoinResult,
    PeerList,
    RowCreated,
    RowList,
    ShareResult,
    StatusResult,
    StopResult,
    SyncOutcome,
    SyncResult,
    ValueResult,
    WriteResult,
)
from .config import NodeConfig
from .metrics import CountingTransport, Metrics, render

log = logging.getLogger(__name__)

DEFAULT_STORE = "data"
HISTORY_ROWS = 50
JOIN_TIMEOUT_S = 120.0  # a handshake and a bootstrap per ticket address, each bounded by sync's own timeouts
SYNC_TIMEOUT_S = 120.0
# Worker threads reading or writing storage for control commands, at most: one more than
# the two cores measured on, so a long first read leaves room for quick ones beside it.
STORAGE_THREADS = 3

R = TypeVar("R")


class CommandError(Exception):
    """A command's arguments cannot be used; ``code`` is the control API error code."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        self.code = code
        super().__init__(message)


@dataclass
class NodeService:
    """The commands of one running node."""

    instance: Instance
    sync: Sync
    config: NodeConfig
    metrics: Metrics
    transports: dict[str, CountingTransport] = field(default_factory=dict)
    metrics_address: str | None = None  # host:port of the TCP health and metrics listener, if any
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    now_ms: Callable[[], int] = field(default=lambda: int(time.time() * 1000))
    stopping: trio.Event = field(default_factory=trio.Event)  # set: the daemon flushes and exits
    storage_threads: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(STORAGE_THREADS))

    def request_stop(self) -> None:
        self.stopping.set()

    # ---- lookups ----------------------------------------------------------------------

    async def off_loop(self, work: Callable[[], R]) -> R:
        """``work()`` on a worker thread (it may only use the ``dag`` API: thread-safe)."""
        return await trio.to_thread.run_sync(work, limiter=self.storage_threads)

    async def database(self, ref: str) -> Database:
        """The database ``ref`` names: its ID, or a name only one database has."""
        sync_id = self.sync.state.database_id
        return await self.off_loop(lambda: find_database(self.instance, ref, sync_id))

    async def _on_database(self, ref: str, work: Callable[[Database], R]) -> R:
        """``work(database)`` with the database ``ref`` names, both off the event loop."""
        sync_id = self.sync.state.database_id
        return await self.off_loop(lambda: work(find_database(self.instance, ref, sync_id)))

    # ---- node -------------------------------------------------------------------------

    def addresses(self) -> list[str]:
        return [str(a) for a in self.sync.listen_addresses()]

    def _connections(self) -> dict[str, str]:
        return views.connections(self.transports, self.sync)

    async def health(self) -> HealthResult:
        return {
            "status": "ok",
            "device_id": self.instance.device_id,
            "uptime_s": round((self.now_ms() - self.started_ms) / 1000, 1),
            "transports": {name: bool(t.listen_addresses()) for name, t in self.transports.items()},
        }

    async def info(self) -> InfoResult:
        sync_id = self.sync.state.database_id
        databases = await self.off_loop(lambda: [views.summary(db) for db in user_databases(self.instance, sync_id)])
        return self._info(databases)

    def _info(self, databases: list[DatabaseSummary]) -> InfoResult:
        return {
            "running": True,
            "pid": os.getpid(),
            "data_dir": str(self.config.data_dir),
            "control_socket": str(self.config.control_socket),
            "metrics_address": self.metrics_address,
            "device_id": self.instance.device_id,
            "display_name": self.sync.display_name,
            "addresses": self.addresses(),
            "transports": views.transports(self.transports),
            "databases": databases,
            "peers": len(self.sync.peers()),
            "started_ms": self.started_ms,
            "metrics": self.metrics.totals(),
        }

    async def status(self) -> StatusResult:
        """Everything the TUI shows, in one answer (it polls this)."""
        cursors, sync_id = views.cursors(self.sync), self.sync.state.database_id

        def read() -> tuple[list[DatabaseSummary], list[DatabaseDetail]]:
            databases = user_databases(self.instance, sync_id)
            return [views.summary(db) for db in databases], [
                views.detail(db, cursors.get(db.id, [])) for db in databases
            ]

        summaries, details = await self.off_loop(read)
        connections = self._connections()
        return {
            "node": self._info(summaries),
            "peers": [views.peer(self.sync, p, connections) for p in self.sync.peers()],
            "databases": details,
            "history": views.history(self.sync, HISTORY_ROWS),
            "access_pending": len(self.sync.access_requests("pending")),
            "now_ms": self.now_ms(),
        }

    async def prometheus(self) -> bytes:
        """/metrics: the entry counts are read off the loop, the rest on it."""
        sync_id = self.sync.state.database_id

        def count() -> tuple[int, dict[str, int]]:
            databases = user_databases(self.instance, sync_id)
            return len(databases), views.entry_counts(databases)

        databases, entries = await self.off_loop(count)
        gauges = views.gauges(self.sync, databases, entries, len(self._connections()))
        return render(self.metrics, lambda: gauges)

    # ---- databases --------------------------------------------------------------------

    async def db_create(self, name: str, public: str | None = None) -> CreatedDatabase:
        if not isinstance(name, str) or not name.strip():
            raise CommandError("a database needs a name")
        permission = Permission.parse(public) if public else None
        return await self.off_loop(lambda: create_database(self.instance, name, permission))

    async def db_list(self, all: bool = False) -> DatabaseList:
        sync_id = self.sync.state.database_id

        def summaries() -> DatabaseList:
            databases = self.instance.databases() if all else user_databases(self.instance, sync_id)
            return {"databases": [views.summary(db) for db in databases]}

        return await self.off_loop(summaries)

    async def db_show(self, db: str) -> DatabaseShow:
        cursors = views.cursors(self.sync)
        return await self._on_database(db, lambda database: show_database(database, cursors.get(database.id, [])))

    async def db_get(self, db: str, key: str | None = None, store: str = DEFAULT_STORE) -> ValueResult:
        return await self._on_database(db, lambda database: read_value(database, db, key, store))

    async def db_set(self, db: str, key: str, value: object, store: str = DEFAULT_STORE) -> WriteResult:
        if not key:
            raise CommandError("a key is required")

        def write(database: Database) -> WriteResult:
            with database.transaction() as txn:
                txn.doc(store).set(key, value)
            return {"db": database.id, "tips": database.tips()}

        return await self._on_database(db, write)

    async def db_delete(self, db: str, key: str, store: str = DEFAULT_STORE) -> WriteResult:
        def delete(database: Database) -> WriteResult:
            if key not in database.doc(store):
                raise NotFoundError(f"no key {key!r} in store {store!r} of {db}")
            with database.transaction() as txn:
                txn.doc(store).delete(key)
            return {"db": database.id, "tips": database.tips()}

        return await self._on_database(db, delete)

    async def table_insert(self, db: str, table: str, row: object) -> RowCreated:
        if isinstance(row, str):
            try:
                row = parse_json(row)
            except JsonInputError as exc:
                raise CommandError(f"a row is a JSON object: {exc}") from None
        if not isinstance(row, dict):
            raise CommandError('a row is a JSON object, like {"title": "milk"}')
        fields = row

        def insert(database: Database) -> RowCreated:
            with database.transaction() as txn:
                return {"id": txn.table(table).insert(fields)}

        return await self._on_database(db, insert)

    async def table_list(self, db: str, table: str) -> RowList:
        return await self._on_database(db, lambda database: {"rows": database.table(table).rows()})

    # ---- sharing and syncing -----------------------------------------------------------

    async def share(self, db: str) -> ShareResult:
        database = await self.database(db)
        if not self.addresses():
            raise CommandError("this node listens on no address, so no peer could use a ticket (enable p2p or http)")
        return {"db": database.id, "ticket": str(self.sync.create_ticket(database.id))}

    async def join(self, ticket: str, access: str | None = None) -> JoinResult:
        if access is not None:
            Permission.parse(access)
        parsed = Ticket.parse(ticket)
        try:
            with trio.fail_after(JOIN_TIMEOUT_S):
                database = await self.sync.join(parsed, access=access)
        except UnauthorizedError as exc:
            if access is not None:
                raise
            raise CommandError(
                f"access refused: {exc}; ask its admins for access with: eidetica-node join TICKET --access read "
                "(or write:N)",
                code="access",
            ) from None
        except AccessPendingError as exc:
            # Keep asking in the background (the engine's retries, then its period): the
            # database arrives by itself once an admin approves.
            for relation in self.sync.state.relationships(parsed.db):
                self.sync.schedule(relation.peer, parsed.db, delay_s=2.0)
            raise CommandError(
                f"{exc}; the node keeps asking, and {parsed.db} arrives once an admin of it runs: "
                f"eidetica-node access approve {exc.request_id or '<request id>'}",
                code="pending",
            ) from None
        except trio.TooSlowError:
            raise CommandError(f"no address in the ticket answered in {JOIN_TIMEOUT_S:g} s", "unreachable") from None
        name, entries = await self.off_loop(lambda: (database.name, len(database)))
        return {"db": database.id, "name": name, "entries": entries}

    async def peers(self) -> PeerList:
        connections = self._connections()
        return {"peers": [views.peer(self.sync, p, connections) for p in self.sync.peers()]}

    async def sync_now(self, db: str | None = None, peer: str | None = None) -> SyncResult:
        """Sync now with every peer a database (or every database) syncs with."""
        if db is not None:
            db_id = await self._db_for_sync(db)
            relations = self.sync.state.relationships(db_id)
            if not relations:
                raise CommandError(f"{db} syncs with no peer yet (share it, or join a ticket for it)")
        else:
            relations = self.sync.state.relationships()
        if peer is not None:
            relations = [r for r in relations if r.peer == peer or r.peer.startswith(peer)]
            if not relations:
                raise CommandError(f"no database syncs with peer {peer}")
        return {"results": await _sync_pairs(self.sync, relations)}

    async def _db_for_sync(self, ref: str) -> str:
        """A database to sync may not be here yet (a join waiting for approval): IDs pass as they are."""
        if ref.startswith("bafy") and not await self.off_loop(lambda: self.instance.has_database(ref)):
            try:
                cid_from_text(ref)
            except BadCidError:
                raise CommandError(f"{ref!r} is not a valid database ID") from None
            if self.sync.state.relationships(ref):
                return ref
        return (await self.database(ref)).id

    # ---- access requests ---------------------------------------------------------------

    async def access_list(self, all: bool = False) -> AccessList:
        requests = self.sync.access_requests(None if all else "pending")
        return {"requests": [views.access_request(r) for r in requests]}

    def _request_id(self, request: str) -> str:
        ids = [r.request_id for r in self.sync.access_requests() if r.request_id.startswith(request)]
        if not request or not ids:
            raise NotFoundError(f"no access request {request} (eidetica-node access list shows them)")
        if len(ids) > 1:
            raise CommandError(f"{request!r} names {len(ids)} access requests; give more of the ID")
        return ids[0]

    async def access_approve(self, request: str) -> Decision:
        decided = self.sync.approve_request(self._request_id(request))
        return {"id": decided.request_id, "db": decided.db, "key": decided.key, "status": decided.status}

    async def access_reject(self, request: str) -> Decision:
        decided = self.sync.reject_request(self._request_id(request))
        return {"id": decided.request_id, "db": decided.db, "key": decided.key, "status": decided.status}

    async def stop(self) -> StopResult:
        """Stop the node as SIGTERM does: flush sync, close transports and storage."""
        log.info("stop requested over the control socket: flushing sync and stopping")
        self.request_stop()
        return {"stopping": True, "pid": os.getpid()}

    # ---- dispatch -----------------------------------------------------------------------

    def commands(self) -> dict[str, Callable[..., Awaitable[object]]]:
        """Control API command name -> method (names mirror the CLI: ``db.create`` ...)."""
        return {
            "health": self.health,
            "info": self.info,
            "status": self.status,
            "db.create": self.db_create,
            "db.list": self.db_list,
            "db.show": self.db_show,
            "db.get": self.db_get,
            "db.set": self.db_set,
            "db.delete": self.db_delete,
            "table.insert": self.table_insert,
            "table.list": self.table_list,
            "share": self.share,
            "join": self.join,
            "peers": self.peers,
            "sync": self.sync_now,
            "access.list": self.access_list,
            "access.approve": self.access_approve,
            "access.reject": self.access_reject,
            "stop": self.stop,
        }


def user_databases(instance: Instance, sync_id: str) -> list[Database]:
    """The databases commands see: all but the node's own ``_sync`` (ID ``sync_id``)."""
    return [db for db in instance.databases() if db.id != sync_id]


def find_database(instance: Instance, ref: str, sync_id: str) -> Database:
    """The database ``ref`` names: its ID, or a name only one database has (reads storage)."""
    if not isinstance(ref, str) or not ref:
        raise CommandError("a database ID or name is required")
    if ref.startswith("bafy"):
        try:
            cid_from_text(ref)
        except BadCidError:
            raise CommandError(f"{ref!r} is not a valid database ID") from None
        if ref == sync_id:
            raise CommandError("the _sync database is the node's own state; it is not for commands")
        return instance.open_database(ref)
    named = [db for db in user_databases(instance, sync_id) if db.name == ref]
    if not named:
        raise NotFoundError(f"no database named {ref!r} here (eidetica-node db list shows them)")
    if len(named) > 1:
        raise CommandError(f"{len(named)} databases are named {ref!r}; use an ID: " + ", ".join(d.id for d in named))
    return named[0]


def create_database(instance: Instance, name: str, permission: Permission | None) -> CreatedDatabase:
    db = instance.create_database(name=name)
    if permission is not None:
        with db.transaction() as txn:
            txn.settings().set_global(permission)
    return {"id": db.id, "name": name, "public": str(permission) if permission else None}


def show_database(database: Database, peers: list[tuple[str, Cursor]]) -> DatabaseShow:
    """``db show``: the detail, stores, auth settings and missing IDs (reads storage)."""
    return {
        **views.detail(database, peers),
        "stores": database.store_types(),
        "auth": database.settings().to_dict().get("auth", {}),
        "missing": [cid_to_text(c) for c in database.missing_entries()],
    }


def read_value(database: Database, ref: str, key: str | None, store: str) -> ValueResult:
    """A Doc store's value (``key`` None: all of it): the fold a first read pays."""
    doc = database.doc(store)
    if key is None:
        return {"value": doc.to_dict()}
    if key not in doc:
        raise NotFoundError(f"no key {key!r} in store {store!r} of {ref}")
    return {"value": doc.get(key)}


async def _sync_pairs(sync: Sync, relations: list[Relationship]) -> list[SyncOutcome]:
    """One outcome per (database, peer), in order; what the deadline cut off is "timed out"."""
    results: list[SyncOutcome] = []
    with trio.move_on_after(SYNC_TIMEOUT_S):
        for relation in relations:
            try:
                await sync.sync_now(relation.peer, relation.db)
                results.append({"db": relation.db, "peer": relation.peer, "ok": True, "error": None})
            except Exception as exc:  # one peer's failure is reported, the others still sync
                log.debug("sync of %s with %s failed: %s", relation.db, relation.peer, exc)
                results.append({"db": relation.db, "peer": relation.peer, "ok": False, "error": str(exc)})
    done = {(r["db"], r["peer"]) for r in results}
    for relation in relations:
        if (relation.db, relation.peer) not in done:
            results.append({"db": relation.db, "peer": relation.peer, "ok": False, "error": "timed out"})
    return results


__all__ = ["DEFAULT_STORE", "STORAGE_THREADS", "CommandError", "NodeService", "find_database", "user_databases"]
