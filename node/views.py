"""The read side of the control API: the node's state turned into ``node/api.py`` results.

These are functions of the engine, the storage and the transports, with no command
logic and no side effects, so ``status`` (polled every second by the TUI), ``info``,
``db.show`` and ``peers`` all describe a database or a peer with the same code.

Two kinds, kept apart because they run on different threads (``node/service.py``):
what reads the sync layer (its objects change on the event loop, so they are read
there: :func:`cursors`, :func:`peer`, :func:`history`, ...) and what reads storage
through the thread-safe ``dag`` API (:func:`summary`, :func:`detail`, :func:`entry_counts`:
run on a worker thread, given what the first kind collected as plain values). None of
them does work that grows with history: counts are kept by storage, and how far a peer
is behind is counted up to a bound (``node/behind.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from dag import Database, Status
from sync import Sync
from sync.state import AccessRequest, Cursor, PeerRecord

from .api import (
    AccessRequestInfo,
    DatabaseDetail,
    DatabaseSummary,
    HistoryRow,
    PeerInfo,
    PeerState,
    TransportInfo,
    TransportStatusJSON,
)
from .behind import count_behind
from .metrics import CountingTransport
from .netstatus import connections as transport_connections
from .netstatus import transport_status


def _status_json(transport: CountingTransport) -> TransportStatusJSON | None:
    """The transport's report in its JSON form (``netstatus`` makes it plain data)."""
    return cast(TransportStatusJSON | None, transport_status(transport.inner))


def transports(named: Mapping[str, CountingTransport]) -> list[TransportInfo]:
    out: list[TransportInfo] = []
    for name, transport in named.items():
        item: TransportInfo = {"name": name, "addresses": transport.listen_addresses()}
        status = _status_json(transport)
        if status is not None:
            item["status"] = status
        out.append(item)
    return out


def connections(named: Mapping[str, CountingTransport], sync: Sync) -> dict[str, str]:
    """device key -> "direct" / "relayed" for sync peers with a live connection (a
    transport also sees relays and probes, which are left out)."""
    kinds = transport_connections(t.inner for t in named.values())
    return {peer.pubkey: kinds[peer.pubkey] for peer in sync.peers() if peer.pubkey in kinds}


def summary(db: Database) -> DatabaseSummary:
    counts = db.status_counts()
    return {
        "id": db.id,
        "name": db.name,
        "entries": sum(counts.values()),
        "verified": counts.get("verified", 0),
        "unverified": counts.get("unverified", 0),
        "failed": counts.get("failed", 0),
        "tips": db.tips(),
    }


Cursors = Mapping[str, list[tuple[str, Cursor]]]  # database ID -> (peer, cursor) of each relationship


def cursors(sync: Sync) -> dict[str, list[tuple[str, Cursor]]]:
    """Every relationship's cursor, by database: read on the event loop, used on a thread."""
    out: dict[str, list[tuple[str, Cursor]]] = {}
    for relation in sync.state.relationships():
        out.setdefault(relation.db, []).append((relation.peer, sync.state.cursor(relation.db, relation.peer)))
    return out


def peer_state(db: Database, peer: str, cursor: Cursor, tips: list[bytes]) -> PeerState:
    """Where ``peer`` stands for ``db``, from its cursor (what both held at the last exchange).

    behind: we hold entries outside the cursor's closure (ours since, not yet sent), counted
    up to ``node.behind.BEHIND_LIMIT``; ahead: the cursor names entries we do not hold
    verified (theirs, not yet here).
    """
    if cursor.last_sync_ms is None and not cursor.common:
        state, behind_by, ahead = "never", 0, False
    else:
        common = set(cursor.common)
        behind_by = 0 if set(tips) <= common else count_behind(db, tips, common)
        ahead = any(db.status_of(c) is not Status.VERIFIED for c in common)
        state = "diverged" if behind_by and ahead else "behind" if behind_by else "ahead" if ahead else "up to date"
    return {
        "peer": peer,
        "last_sync_ms": cursor.last_sync_ms,
        "last_error": cursor.last_error,
        "state": state,
        "behind_by": behind_by,
        "ahead": ahead,
    }


def detail(db: Database, peers: list[tuple[str, Cursor]]) -> DatabaseDetail:
    """``db``'s summary and where each of ``peers`` (its relationships' cursors) stands."""
    tips = db.tip_cids()
    return {**summary(db), "peers": [peer_state(db, peer, cursor, tips) for peer, cursor in peers]}


def peer(sync: Sync, known: PeerRecord, connected: Mapping[str, str]) -> PeerInfo:
    return {
        "pubkey": known.pubkey,
        "display_name": known.display_name,
        "addresses": [str(a) for a in known.addresses],
        "last_seen_ms": known.last_seen_ms,
        "connection": connected.get(known.pubkey),
        "databases": sorted(r.db for r in sync.state.relationships() if r.peer == known.pubkey),
    }


def entry_counts(databases: list[Database]) -> dict[str, int]:
    """Entries by status over ``databases`` (storage keeps the counts: a few rows each)."""
    entries: dict[str, int] = {s.name.lower(): 0 for s in Status}
    for db in databases:
        for status, count in db.status_counts().items():
            entries[status] = entries.get(status, 0) + count
    return entries


def gauges(sync: Sync, databases: int, entries: dict[str, int], connected: int) -> dict[str, int | dict[str, int]]:
    """Scrape-time values for /metrics: counts of peers, databases, entries by status, requests."""
    return {
        "peers": len(sync.peers()),
        "connected": connected,
        "databases": databases,
        "entries": entries,
        "relationships": len(sync.state.relationships()),
        "pending": len(sync.access_requests("pending")),
    }


def history(sync: Sync, rows: int) -> list[HistoryRow]:
    """The last ``rows`` syncs; ``sync.state`` writes each row with exactly these keys."""
    return cast(list[HistoryRow], sync.state.history()[-rows:])


def access_request(request: AccessRequest) -> AccessRequestInfo:
    return {
        "id": request.request_id,
        "db": request.db,
        "key": request.key,
        "permission": request.permission,
        "status": request.status,
        "requested_ms": request.requested_ms,
        "decided_ms": request.decided_ms,
    }


__all__ = [
    "access_request",
    "connections",
    "cursors",
    "detail",
    "entry_counts",
    "gauges",
    "history",
    "peer",
    "peer_state",
    "summary",
    "transports",
]
