"""Sync state kept in the node's own ``_sync`` database, so it survives restarts.

Stores (all in one database, which is never offered to peers):

    peers      Doc    <pubkey> = {display_name, addresses: [[transport, address], ...],
                                  status, last_seen_ms}
    dbs        Doc    <db id>.<pubkey> = {on_commit: bool, interval_s: int, access: str?}
    cursors    Doc    <db id>.<pubkey> = {common: [entry id, ...], last_sync_ms, last_error}
    history    Table  one row per sync, {at_ms, peer, db, sent, received, error}; bounded
    settings   Doc    free-form settings (get_setting / set_setting)
    transports Doc    <name> = transport configuration
    requests   Table  access requests {db, key, permission, status, requested_ms, decided_ms}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dag import Database, Instance, NotFoundError, cid_from_text, cid_to_text

from .transport import Address

SYNC_DB_KEY = "sync.database"
SYNC_DB_NAME = "_sync"
DEFAULT_INTERVAL_S = 300
HISTORY_LIMIT = 200
PENDING = "pending"
APPROVED = "approved"
REJECTED = "rejected"


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


@dataclass(frozen=True, slots=True)
class Cursor:
    common: tuple[bytes, ...]
    last_sync_ms: int | None
    last_error: str | None


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
    """Typed access to the ``_sync`` database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    def open(cls, instance: Instance) -> SyncState:
        """Load the node's ``_sync`` database, creating it on first use."""
        stored = instance.get_value(SYNC_DB_KEY)
        if stored is not None:
            try:
                return cls(instance.open_database(stored))
            except NotFoundError:
                pass
        db = instance.create_database(name=SYNC_DB_NAME, settings={"type": "sync_settings"})
        instance.set_value(SYNC_DB_KEY, db.root_cid)
        return cls(db)

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
        return [_peer(key, value) for key, value in self.db.doc("peers").to_dict().items() if isinstance(value, dict)]

    def peer(self, pubkey: str) -> PeerRecord | None:
        value = self.db.doc("peers").to_dict().get(pubkey)
        return _peer(pubkey, value) if isinstance(value, dict) else None

    def upsert_peer(
        self,
        pubkey: str,
        *,
        display_name: str | None = None,
        addresses: list[Address] | tuple[Address, ...] = (),
        seen_ms: int | None = None,
    ) -> PeerRecord:
        """Record a peer, merging addresses with what is known; writes only on change."""
        old = self.peer(pubkey)
        merged = list(old.addresses) if old else []
        for address in addresses:
            if address not in merged:
                merged.append(address)
        record = {
            "display_name": display_name if display_name is not None else (old.display_name if old else None),
            "addresses": [[a.transport, a.address] for a in merged],
            "status": "active",
            "last_seen_ms": seen_ms if seen_ms is not None else (old.last_seen_ms if old else None),
        }
        current = self.db.doc("peers").to_dict().get(pubkey)
        if current != record:
            with self.db.transaction() as txn:
                txn.doc("peers").set(pubkey, record)
        return _peer(pubkey, record)

    # ---- which databases sync with which peers ----------------------------------------

    def ensure_related(
        self, db: str, peer: str, *, interval_s: int = DEFAULT_INTERVAL_S, access: str | None = None
    ) -> None:
        """Create the relationship with defaults unless it exists (then keep its settings,
        updating only ``access`` when one is given)."""
        current = self.db.doc("dbs").to_dict().get(db, {}).get(peer)
        if not isinstance(current, dict):
            self.relate(db, peer, interval_s=interval_s, access=access)
        elif access is not None and current.get("access") != access:
            self.relate(
                db,
                peer,
                on_commit=bool(current.get("on_commit", True)),
                interval_s=int(current.get("interval_s", interval_s)),
                access=access,
            )

    def relate(
        self,
        db: str,
        peer: str,
        *,
        on_commit: bool = True,
        interval_s: int = DEFAULT_INTERVAL_S,
        access: str | None = None,
    ) -> None:
        value = {"on_commit": on_commit, "interval_s": interval_s, "access": access}
        if self.db.doc("dbs").to_dict().get(db, {}).get(peer) != value:
            with self.db.transaction() as txn:
                txn.doc("dbs").set(f"{db}.{peer}", value)

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
                        )
                    )
        return out

    # ---- cursors and history --------------------------------------------------------

    def cursor(self, db: str, peer: str) -> Cursor:
        value = self.db.doc("cursors").to_dict().get(db, {}).get(peer)
        if not isinstance(value, dict):
            return Cursor((), None, None)
        common = tuple(cid_from_text(c) for c in value.get("common", []))
        return Cursor(common, value.get("last_sync_ms"), value.get("last_error"))

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
        """Move the cursor (on success) and append one bounded history row."""
        old = self.cursor(db, peer)
        value = {
            "common": [cid_to_text(c) for c in (common if common is not None else old.common)],
            "last_sync_ms": now_ms if error is None else old.last_sync_ms,
            "last_error": error,
        }
        with self.db.transaction() as txn:
            txn.doc("cursors").set(f"{db}.{peer}", value)
            history = txn.table("history")
            history.insert(
                {"at_ms": now_ms, "peer": peer, "db": db, "sent": sent, "received": received, "error": error}
            )
            rows = history.rows()
            if len(rows) > HISTORY_LIMIT:
                oldest = sorted(rows.items(), key=lambda item: item[1].get("at_ms", 0))
                for row_id, _row in oldest[: len(rows) - HISTORY_LIMIT]:
                    history.delete(row_id)

    def history(self) -> list[dict[str, Any]]:
        rows = list(self.db.table("history").rows().values())
        return sorted(rows, key=lambda row: row.get("at_ms", 0))

    # ---- access requests ------------------------------------------------------------

    def access_requests(self, status: str | None = None) -> list[AccessRequest]:
        out = []
        for request_id, row in self.db.table("requests").rows().items():
            request = AccessRequest(
                request_id,
                row["db"],
                row["key"],
                row["permission"],
                row["status"],
                row["requested_ms"],
                row.get("decided_ms"),
            )
            if status is None or request.status == status:
                out.append(request)
        return sorted(out, key=lambda r: (r.requested_ms, r.request_id))

    def find_request(self, db: str, key: str, permission: str) -> AccessRequest | None:
        for request in self.access_requests():
            if request.db == db and request.key == key and request.permission == permission:
                return request
        return None

    def add_request(self, db: str, key: str, permission: str, now_ms: int) -> AccessRequest:
        with self.db.transaction() as txn:
            request_id = txn.table("requests").insert(
                {"db": db, "key": key, "permission": permission, "status": PENDING, "requested_ms": now_ms}
            )
        return AccessRequest(request_id, db, key, permission, PENDING, now_ms, None)

    def decide_request(self, request_id: str, status: str, now_ms: int) -> AccessRequest:
        row = self.db.table("requests").get(request_id)
        if row is None:
            raise NotFoundError(f"no access request {request_id}")
        row.update(status=status, decided_ms=now_ms)
        with self.db.transaction() as txn:
            txn.table("requests").set(request_id, row)
        return AccessRequest(request_id, row["db"], row["key"], row["permission"], status, row["requested_ms"], now_ms)


def _peer(pubkey: str, value: dict[str, Any]) -> PeerRecord:
    addresses = tuple(
        Address(str(pair[0]), str(pair[1]))
        for pair in value.get("addresses", [])
        if isinstance(pair, list) and len(pair) == 2
    )
    last_seen = value.get("last_seen_ms")
    return PeerRecord(
        pubkey,
        value.get("display_name"),
        addresses,
        str(value.get("status", "active")),
        last_seen if isinstance(last_seen, int) else None,
    )
