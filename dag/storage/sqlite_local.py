"""The ``local`` table of SQLite storage: small records this node keeps for itself, in place.

Not a DAG: nothing here is signed, hashed or synced. It holds bookkeeping that changes on
every exchange (``sync.ledger``: cursors, last-seen times, the bounded sync history), where
a signed entry per change made ``_sync`` grow with traffic. Rows are grouped by ``space``
(one per user of the table) and replaced in place, so the table's size is what its users
bound, not how often they write.

A write is one transaction, committed with ``synchronous=NORMAL`` (in WAL mode: no fsync
at commit, the WAL is synced at the next checkpoint): a power cut may lose the last writes,
never half of one, and the file is never corrupted. The connection's setting is put back
afterwards, so entry writes stay fully synced.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Mapping

from ..errors import StorageError

_SCHEMA = "CREATE TABLE IF NOT EXISTS local (space TEXT, key TEXT, value BLOB, PRIMARY KEY (space, key)) WITHOUT ROWID"


def create_local_table(db: sqlite3.Connection) -> None:
    """Create the table unless it exists (a file of any earlier format gains it on open)."""
    db.execute(_SCHEMA)


def local_items(db: sqlite3.Connection, space: str) -> dict[str, bytes]:
    """Every ``key -> value`` of ``space``."""
    rows = db.execute("SELECT key, value FROM local WHERE space = ?", (space,))
    return {key: bytes(value) for key, value in rows}


def local_write(db: sqlite3.Connection, space: str, upserts: Mapping[str, bytes], deletes: Collection[str]) -> None:
    """Apply ``upserts`` and ``deletes`` to ``space`` in one transaction, without an fsync."""
    if not upserts and not deletes:
        return
    try:
        synchronous = int(db.execute("PRAGMA synchronous").fetchone()[0])
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            _apply(db, space, upserts, deletes)
        finally:
            db.execute(f"PRAGMA synchronous={synchronous}")
    except sqlite3.Error as exc:
        raise StorageError(f"local write failed, nothing was stored: {exc}") from exc


def _apply(db: sqlite3.Connection, space: str, upserts: Mapping[str, bytes], deletes: Collection[str]) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany("DELETE FROM local WHERE space = ? AND key = ?", [(space, key) for key in deletes])
        db.executemany(
            "INSERT OR REPLACE INTO local (space, key, value) VALUES (?, ?, ?)",
            [(space, key, value) for key, value in upserts.items()],
        )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
