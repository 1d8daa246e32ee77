"""Sync state kept in the node's own ``_sync`` database, so it survives restarts.

Stores (all in one database, which is never offered to peers):

    peers      Doc    <pubkey> = {display_name, addresses: [[transport, address], ...], status}
    dbs        Doc    <db id>.<pubkey> = {on_commit: bool, interval_s: int, access: str?, served: bool?}
    settings   Doc    free-form settings (get_setting / set_setting)
    transports Doc    <name> = transport configuration
    requests   Table  access requests {db, key, permission, status, requested_ms, decided_ms}

What changes on every exchange is not here but in ``sync.ledger`` (the storage's local
table, updated in place and batched): cursors, last-seen times, the history of the last
``HISTORY_LIMIT`` exchanges, counters. Data directories written before the ledger also
hold ``cursors`` (Doc), ``history`` (Table) and ``peers.*.last_seen_ms`` here: the ledger
copies them once, at its first open, and nothing new is written to them.

What strangers can make this node write here is bounded: nothing is written for a peer
that only handshook or was refused; a peer that read a database is recorded once, with
at most ``MAX_PEER_ADDRESSES`` addresses, as a *served* relationship (shown, never dialled;
at most ``MAX_SERVED_PEERS`` of them); pending access requests are bounded per key and in
total and expire, and they are indexed in memory (``_sync`` is written only by this
process), so finding one is a dict lookup, not a scan.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from dag import Database, Instance, NotFoundError

from .errors import BusyError, OverBudgetError
from .ledger import Cursor as Cursor
from .ledger import Ledger
from .transport import Address

SYNC_DB_KEY = "sync.database"
SYNC_DB_NAME = "_sync"
DEFAULT_INTERVAL_S = 300
PENDING = "pending"
APPROVED = "approved"
REJECTED = "rejected"

# Addresses kept per peer. A node announces its listen addresses (a few per interface and
# transport, plus relay circuits); 8 covers a multi-homed node, and a peer announcing 64
# junk addresses can no longer make each record (and each dial round) 64 long.
MAX_PEER_ADDRESSES = 8
MAX_ADDRESS_CHARS = 1024  # longer than any real multiaddr (a relayed one is ~150 characters)
MAX_DISPLAY_NAME = 128  # characters of a peer's display name kept: it is shown, not parsed
# Peers recorded only because they read from us (served relationships). Keys cost nothing,
# so without a bound a reader with fresh keys could grow `_sync` by a record per key; past
# this many, further readers are still served, just not recorded (no cursor kept for them).
MAX_SERVED_PEERS = 1_024
# Pending access requests: an admin reads them by hand, so a few hundred waiting is already
# more than anyone reviews; past that new requests are refused as busy until some expire or
# are decided. Per key: one key asks for a few databases at most.
MAX_PENDING_REQUESTS = 256
MAX_PENDING_REQUESTS_PER_KEY = 4
# A request nobody decided in a week is dropped; the requester's node keeps asking on its
# period, so a live request is simply made anew.
PENDING_REQUEST_TTL_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class PeerRecord:
    pubkey: str
    display_name: str | None
    addresses: tuple[Address, ...]
    status: str
    last_seen_ms: int | None


@dataclass(frozen=True, slots=True)
class Relationship:
    db: str
    peer: str
    on_commit: bool
    interval_s: int
    access: str | None
    served: bool = False  # recorded because the peer read from us: shown, never dialled or pushed to


@dataclass(frozen=True, slots=True)
class AccessRequest:
    request_id: str
    db: str
    key: str
    permission: str
    status: str
    requested_ms: int
    decided_ms: int | None


class SyncState:
    """Typed access to the ``_sync`` database, and to the bookkeeping ``ledger`` beside it."""

    def __init__(self, db: Database, ledger: Ledger) -> None:
        self.db = db
        self.ledger = ledger
        self._requests: _RequestIndex | None = None  # built on first use
        self._served: set[str] | None = None  # peers with a served relationship, built on first use

    @classmethod
    def open(cls, instance: Instance) -> SyncState:
        """Load the node's ``_sync`` database, creating it on first use."""
        stored = instance.get_value(SYNC_DB_KEY)
        if stored is not None:
            try:
                db = instance.open_database(stored)
                return cls(db, Ledger.open(instance, db))
            except NotFoundError:
                pass
        db = instance.create_database(name=SYNC_DB_NAME, settings={"type": "sync_settings"})
        instance.set_value(SYNC_DB_KEY, db.root_cid)
        return cls(db, Ledger.open(instance, None))

    @property
    def database_id(self) -> str:
        return self.db.id

    # ---- settings and transports ----------------------------------------------------

    def get_setting(self, key: str) -> Any:
        return self.db.doc("settings").get(key)

    def set_setting(self, key: str, value: Any) -> None:
        with self.db.transaction() as txn:
            txn.doc("settings").set(key, value)

    def transport_config(self, name: str) -> dict[str, Any] | None:
        value = self.db.doc("transports").get(name)
        return value if isinstance(value, dict) else None

    def save_transport_config(self, name: str, config: dict[str, Any]) -> None:
        with self.db.transaction() as txn:
            txn.doc("transports").set(name, config)

    # ---- peers ----------------------------------------------------------------------

    def peers(self) -> list[PeerRecord]:
        return [
            _peer(key, value, self.ledger.last_seen(key))
            for key, value in self.db.doc("peers").to_dict().items()
            if isinstance(value, dict)
        ]

    def peer(self, pubkey: str) -> PeerRecord | None:
        value = self.db.doc("peers").to_dict().get(pubkey)
        return _peer(pubkey, value, self.ledger.last_seen(pubkey)) if isinstance(value, dict) else None

    def upsert_peer(
        self,
        pubkey: str,
        *,
        display_name: str | None = None,
        addresses: list[Address] | tuple[Address, ...] = (),
        seen_ms: int | None = None,
        replace_addresses: bool = False,
    ) -> PeerRecord:
        """Record a peer, merging addresses with what is known; writes only on change.

        The addresses given come first (the newest knowledge), then the known ones, at most
        ``MAX_PEER_ADDRESSES`` in all; over-long addresses and names are dropped or cut.
        ``replace_addresses``: the addresses given are the whole list (``sync.reach`` decided
        which known ones stay: see ``Reach.refreshed``). ``seen_ms`` goes to the ledger:
        ``_sync`` is written only when the name or the addresses change.
        """
        if seen_ms is not None:
            self.ledger.saw(pubkey, seen_ms)
        current = self.db.doc("peers").to_dict().get(pubkey)
        old = _peer(pubkey, current, None) if isinstance(current, dict) else None
        merged: list[Address] = []
        known = () if replace_addresses or old is None else old.addresses
        for address in (*addresses, *known):
            if address not in merged and len(address.address) <= MAX_ADDRESS_CHARS and len(merged) < MAX_PEER_ADDRESSES:
                merged.append(address)
        name = display_name if display_name is not None else (old.display_name if old else None)
        record = {
            "display_name": name[:MAX_DISPLAY_NAME] if name is not None else None,
            "addresses": [[a.transport, a.address] for a in merged],
            "status": "active",
        }
        if isinstance(current, dict) and "last_seen_ms" in current:  # written before the ledger: left as it was
            record["last_seen_ms"] = current["last_seen_ms"]
        if current != record:
            with self.db.transaction() as txn:
                txn.doc("peers").set(pubkey, record)
        return _peer(pubkey, record, self.ledger.last_seen(pubkey))

    # ---- which databases sync with which peers ----------------------------------------

    def ensure_related(
        self,
        db: str,
        peer: str,
        *,
        interval_s: int = DEFAULT_INTERVAL_S,
        access: str | None = None,
        served: bool = False,
    ) -> None:
        """Create the relationship with defaults unless it exists (then keep its settings,
        updating only ``access`` when one is given).

        ``served=True`` (the peer read from us) never turns a relationship the local side
        made into a served one; ``served=False`` (we sync with the peer) upgrades a served one.
        """
        current = self.db.doc("dbs").to_dict().get(db, {}).get(peer)
        if not isinstance(current, dict):
            self.relate(db, peer, interval_s=interval_s, access=access, served=served)
            return
        was_served = bool(current.get("served", False))
        if (access is not None and current.get("access") != access) or (was_served and not served):
            self.relate(
                db,
                peer,
                on_commit=bool(current.get("on_commit", True)),
                interval_s=int(current.get("interval_s", interval_s)),
                access=access if access is not None else current.get("access"),
                served=was_served and served,
            )

    def relate(
        self,
        db: str,
        peer: str,
        *,
        on_commit: bool = True,
        interval_s: int = DEFAULT_INTERVAL_S,
        access: str | None = None,
        served: bool = False,
    ) -> None:
        value: dict[str, Any] = {"on_commit": on_commit, "interval_s": interval_s, "access": access}
        if served:
            value["served"] = True
        if self.db.doc("dbs").to_dict().get(db, {}).get(peer) != value:
            with self.db.transaction() as txn:
                txn.doc("dbs").set(f"{db}.{peer}", value)
        if served and self._served is not None:
            self._served.add(peer)  # (a peer later related by us stays counted: the bound errs low)

    def may_record_served(self, peer: str) -> bool:
        """Whether a reader ``peer`` may be recorded (known already, or room under ``MAX_SERVED_PEERS``)."""
        if self._served is None:
            self._served = {r.peer for r in self.relationships() if r.served}
        known = self.db.doc("peers").to_dict().get(peer) is not None
        return known or peer in self._served or len(self._served) < MAX_SERVED_PEERS

    def relationships(self, db: str | None = None) -> list[Relationship]:
        out = []
        for db_id, peers in self.db.doc("dbs").to_dict().items():
            if (db is not None and db_id != db) or not isinstance(peers, dict):
                continue
            for peer, value in peers.items():
                if isinstance(value, dict):
                    out.append(
                        Relationship(
                            db_id,
                            peer,
                            bool(value.get("on_commit", True)),
                            int(value.get("interval_s", DEFAULT_INTERVAL_S)),
                            value.get("access"),
                            bool(value.get("served", False)),
                        )
                    )
        return out

    # ---- cursors and history (kept by the ledger) -----------------------------------

    def cursor(self, db: str, peer: str) -> Cursor:
        return self.ledger.cursor(db, peer)

    def record_sync(
        self,
        db: str,
        peer: str,
        *,
        now_ms: int,
        common: list[bytes] | None,
        sent: int,
        received: int,
        error: str | None,
    ) -> None:
        """Move the cursor (on success) and append one bounded history row (in the ledger:
        in memory now, written back with the next batch)."""
        self.ledger.record(db, peer, now_ms=now_ms, common=common, sent=sent, received=received, error=error)

    def history(self) -> list[dict[str, Any]]:
        return self.ledger.history()

    # ---- access requests ------------------------------------------------------------

    def access_requests(self, status: str | None = None) -> list[AccessRequest]:
        out = []
        for request_id, row in self.db.table("requests").rows().items():
            request = _request(request_id, row)
            if status is None or request.status == status:
                out.append(request)
        return sorted(out, key=lambda r: (r.requested_ms, r.request_id))

    def _index(self) -> _RequestIndex:
        if self._requests is None:
            self._requests = _RequestIndex(self.access_requests())
        return self._requests

    def find_request(self, db: str, key: str, permission: str) -> AccessRequest | None:
        """The request for exactly this (database, key, permission); a dict lookup."""
        request_id = self._index().by_ask.get((db, key, permission))
        if request_id is None:
            return None
        row = self.db.table("requests").get(request_id)
        return _request(request_id, row) if row is not None else None

    def add_request(self, db: str, key: str, permission: str, now_ms: int) -> AccessRequest:
        """Store a pending request; raises when the key or the node is at its bound."""
        index = self._index()
        self._expire_requests(now_ms)
        if index.pending_of(key) >= MAX_PENDING_REQUESTS_PER_KEY:
            raise OverBudgetError(
                f"key {key} already has {MAX_PENDING_REQUESTS_PER_KEY} access requests waiting here (the limit)"
            )
        if len(index.pending) >= MAX_PENDING_REQUESTS:
            raise BusyError(f"{MAX_PENDING_REQUESTS} access requests wait for an admin here (the limit); ask later")
        with self.db.transaction() as txn:
            request_id = txn.table("requests").insert(
                {"db": db, "key": key, "permission": permission, "status": PENDING, "requested_ms": now_ms}
            )
        request = AccessRequest(request_id, db, key, permission, PENDING, now_ms, None)
        index.add(request)
        return request

    def _expire_requests(self, now_ms: int) -> None:
        """Delete pending requests older than ``PENDING_REQUEST_TTL_MS`` (oldest first, up to the first young one)."""
        index = self._index()
        expired = index.expired(now_ms - PENDING_REQUEST_TTL_MS)
        if not expired:
            return
        with self.db.transaction() as txn:
            for request_id in expired:
                txn.table("requests").delete(request_id)
        for request_id in expired:
            index.remove(request_id)

    def decide_request(self, request_id: str, status: str, now_ms: int) -> AccessRequest:
        row = self.db.table("requests").get(request_id)
        if row is None:
            raise NotFoundError(f"no access request {request_id}")
        row.update(status=status, decided_ms=now_ms)
        with self.db.transaction() as txn:
            txn.table("requests").set(request_id, row)
        self._index().decided(request_id)
        return AccessRequest(request_id, row["db"], row["key"], row["permission"], status, row["requested_ms"], now_ms)


class _RequestIndex:
    """Access requests by (db, key, permission), and the pending ones by age and by key.

    Built once from the table; kept exact by ``SyncState``, the only writer of ``_sync``.
    """

    def __init__(self, requests: list[AccessRequest]) -> None:
        self.by_ask: dict[tuple[str, str, str], str] = {}
        self.pending: OrderedDict[str, tuple[int, str]] = OrderedDict()  # id -> (requested_ms, key), oldest first
        self._per_key: dict[str, int] = {}
        self._asks: dict[str, tuple[str, str, str]] = {}
        for request in requests:  # already sorted by time
            self.add(request)

    def add(self, request: AccessRequest) -> None:
        ask = (request.db, request.key, request.permission)
        self.by_ask[ask] = request.request_id
        self._asks[request.request_id] = ask
        if request.status == PENDING:
            self.pending[request.request_id] = (request.requested_ms, request.key)
            self._per_key[request.key] = self._per_key.get(request.key, 0) + 1

    def pending_of(self, key: str) -> int:
        return self._per_key.get(key, 0)

    def decided(self, request_id: str) -> None:
        entry = self.pending.pop(request_id, None)
        if entry is not None:
            self._drop_key(entry[1])

    def remove(self, request_id: str) -> None:
        self.decided(request_id)
        ask = self._asks.pop(request_id, None)
        if ask is not None and self.by_ask.get(ask) == request_id:
            del self.by_ask[ask]

    def expired(self, before_ms: int) -> list[str]:
        out = []
        for request_id, (requested_ms, _key) in self.pending.items():
            if requested_ms >= before_ms:
                break
            out.append(request_id)
        return out

    def _drop_key(self, key: str) -> None:
        left = self._per_key.get(key, 0) - 1
        if left > 0:
            self._per_key[key] = left
        else:
            self._per_key.pop(key, None)


def _request(request_id: str, row: dict[str, Any]) -> AccessRequest:
    return AccessRequest(
        request_id,
        row["db"],
        row["key"],
        row["permission"],
        row["status"],
        row["requested_ms"],
        row.get("decided_ms"),
    )


def _peer(pubkey: str, value: dict[str, Any], seen_ms: int | None) -> PeerRecord:
    """The record ``value`` (a ``peers`` row); last seen is the ledger's ``seen_ms``, else the
    row's own (rows written before the ledger carry one)."""
    addresses = tuple(
        Address(str(pair[0]), str(pair[1]))
        for pair in value.get("addresses", [])
        if isinstance(pair, list) and len(pair) == 2
    )
    last_seen = seen_ms if seen_ms is not None else value.get("last_seen_ms")
    return PeerRecord(
        pubkey,
        value.get("display_name"),
        addresses,
        str(value.get("status", "active")),
        last_seen if isinstance(last_seen, int) else None,
    )
