"""Store checkpoints in SQLite: one row per top-level key of a store's state, plus a head.

A checkpoint is a cache of a fold (``dag/checkpoints.py``): rows and head are written in
one transaction, so a checkpoint is either the old one or the new one, never a mix. It is
written without an fsync of its own (``synchronous=OFF`` for that transaction only): in
WAL mode the next fully synced commit syncs its frames too, and a power cut can only lose
whole transactions (the WAL's frame checksums end it at the first torn one), leaving an
older but true checkpoint.

Reads go through a second, read-only connection: WAL gives it a consistent snapshot of
head and rows without the replica's lock, so loading a large state never makes a writer
(or the event loop waiting on the writer's lock) wait, and a write never tears a read.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Collection
from pathlib import Path

from .base import StateHead, StateRow

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state_rows (
    tree BLOB NOT NULL, store TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL,
    seq BLOB NOT NULL, ord BLOB NOT NULL, value BLOB,
    PRIMARY KEY (tree, store, kind, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS state_rows_seq ON state_rows (tree, store, kind, seq);
CREATE TABLE IF NOT EXISTS state_heads (
    tree BLOB NOT NULL, store TEXT NOT NULL, kind TEXT NOT NULL, tips BLOB NOT NULL, format INTEGER NOT NULL,
    PRIMARY KEY (tree, store, kind)
) WITHOUT ROWID;
"""
_CHUNK = 500  # stay under SQLite's bound-parameter limit


class SqliteStates:
    """The checkpoint tables of one SQLite file: written on ``db``, read on a reader of its own."""

    def __init__(self, db: sqlite3.Connection, path: Path | str, synchronous: str) -> None:
        db.executescript(_SCHEMA)
        self._db = db
        self._synchronous = synchronous.upper()
        self._reader = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._reader.execute("PRAGMA query_only=ON")
        self._read_lock = threading.Lock()  # one reader connection: one statement at a time

    def head(self, tree: bytes, store: str, kind: str) -> StateHead | None:
        with self._read_lock:
            return self._head(tree, store, kind)

    def rows_for(
        self, tree: bytes, store: str, kind: str, keys: Collection[str]
    ) -> tuple[StateHead | None, dict[str, StateRow]]:
        """The head and the rows of ``keys`` (tombstones included), from one read transaction."""
        wanted = list(keys)
        found: dict[str, StateRow] = {}
        with self._read_lock:
            reader = self._reader
            reader.execute("BEGIN")
            try:
                head = self._head(tree, store, kind)
                for start in range(0, len(wanted), _CHUNK):
                    chunk = wanted[start : start + _CHUNK]
                    marks = ",".join("?" * len(chunk))
                    for key, seq, order, value in reader.execute(
                        "SELECT key, seq, ord, value FROM state_rows WHERE tree = ? AND store = ? AND kind = ?"
                        f" AND key IN ({marks})",
                        (tree, store, kind, *chunk),
                    ):
                        found[key] = StateRow(bytes(seq), bytes(order), None if value is None else bytes(value))
            finally:
                reader.execute("COMMIT")
        return head, found

    def snapshot(self, tree: bytes, store: str, kind: str) -> tuple[StateHead | None, dict[str, StateRow]]:
        """The head and every row (tombstones included) in seq order, from one read transaction."""
        with self._read_lock:
            reader = self._reader
            reader.execute("BEGIN")
            try:
                head = self._head(tree, store, kind)
                rows = reader.execute(
                    "SELECT key, seq, ord, value FROM state_rows WHERE tree = ? AND store = ? AND kind = ?"
                    " ORDER BY seq",
                    (tree, store, kind),
                ).fetchall()
            finally:
                reader.execute("COMMIT")
        return head, {
            key: StateRow(bytes(seq), bytes(order), None if value is None else bytes(value))
            for key, seq, order, value in rows
        }

    def _head(self, tree: bytes, store: str, kind: str) -> StateHead | None:
        row = self._reader.execute(
            "SELECT tips, format FROM state_heads WHERE tree = ? AND store = ? AND kind = ?", (tree, store, kind)
        ).fetchone()
        return None if row is None else StateHead(bytes(row[0]), row[1])

    def write(
        self,
        tree: bytes,
        store: str,
        kind: str,
        expected: StateHead | None,
        head: StateHead,
        rows: dict[str, StateRow],
        replace: bool,
    ) -> bool:
        """Move the head from ``expected`` to ``head`` with ``rows`` changed (all rows
        replaced if ``replace``); False, with nothing written, if the head was not ``expected``."""
        db = self._db
        db.execute("PRAGMA synchronous=OFF")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                written = self._apply(tree, store, kind, expected, head, rows, replace)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT" if written else "ROLLBACK")
        finally:
            db.execute(f"PRAGMA synchronous={self._synchronous}")
        return written

    def _apply(
        self,
        tree: bytes,
        store: str,
        kind: str,
        expected: StateHead | None,
        head: StateHead,
        rows: dict[str, StateRow],
        replace: bool,
    ) -> bool:
        db = self._db
        where = (tree, store, kind)
        found = db.execute(
            "SELECT tips, format FROM state_heads WHERE tree = ? AND store = ? AND kind = ?", where
        ).fetchone()
        current = None if found is None else StateHead(bytes(found[0]), found[1])
        if current != expected:
            return False
        if replace:
            db.execute("DELETE FROM state_rows WHERE tree = ? AND store = ? AND kind = ?", where)
        db.executemany(
            "INSERT OR REPLACE INTO state_rows VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(*where, key, row.seq, row.order, row.value) for key, row in rows.items()],
        )
        db.execute("INSERT OR REPLACE INTO state_heads VALUES (?, ?, ?, ?, ?)", (*where, head.tips, head.format))
        return True

    def close(self) -> None:
        self._reader.close()
