"""SQLite storage: the embedded default.

WAL journal, ``synchronous=FULL`` by default so that a commit that returned survives a
power cut, not only a killed process (measured here: ~7,500 single-row commits/s with
FULL against ~31,000 with NORMAL; FULL still leaves room for the commit target).
One SQLite transaction per :class:`WriteBatch`: a node killed at any instant reopens
into the last applied batch.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from ..errors import StorageError
from .base import EntryMeta, Status, WriteBatch

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY, cid BLOB NOT NULL UNIQUE, tree BLOB NOT NULL, height INTEGER NOT NULL,
    status INTEGER NOT NULL, parents BLOB NOT NULL, view BLOB NOT NULL, raw BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_tree ON entries (tree, height);
CREATE TABLE IF NOT EXISTS tips (
    tree BLOB NOT NULL, store TEXT NOT NULL, cid BLOB NOT NULL, PRIMARY KEY (tree, store, cid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS waits (
    blocker BLOB NOT NULL, child BLOB NOT NULL, tree BLOB NOT NULL, PRIMARY KEY (blocker, child)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS waits_by_child ON waits (child);
CREATE INDEX IF NOT EXISTS waits_by_tree ON waits (tree);
CREATE TABLE IF NOT EXISTS trees (seq INTEGER PRIMARY KEY, cid BLOB NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
"""

_SYNCHRONOUS = ("off", "normal", "full", "extra")
SCHEMA_VERSION = 1
# Entries are appended in arrival order (a rowid table) with a separate index on their
# random CIDs: clustering the table itself by CID spread every insert over the whole
# B-tree, and batch writes slowed from ~30 to ~60 us an entry as a database grew to 100K.
# 4 MiB of page cache: 8 MiB was no faster in a 100K-entry bootstrap and held 3-4 MiB more.
_CACHE_KIB = 4 * 1024
_CHUNK = 500  # stay under SQLite's bound-parameter limit
# Entries are inserted many rows per statement: executemany releases and retakes the GIL
# around every row, and with the verifying threads waiting for it each retake can stall.
_INSERT_ROWS = 256
_ENTRY_COLUMNS = "(cid, tree, height, status, parents, view, raw)"


class SqliteStorage:
    def __init__(self, path: Path | str, *, synchronous: str = "full") -> None:
        if synchronous not in _SYNCHRONOUS:
            raise StorageError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}")
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA foreign_keys=OFF")
            self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            fresh = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
            if not fresh and version != SCHEMA_VERSION:
                raise StorageError(f"{path} has storage format {version}; this node reads format {SCHEMA_VERSION}")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open SQLite database {path}: {exc}") from exc

    def get_raw(self, cid: bytes) -> bytes | None:
        row = self._db.execute("SELECT raw FROM entries WHERE cid = ?", (cid,)).fetchone()
        return None if row is None else bytes(row[0])

    def _rows_for(self, columns: str, cids: Collection[bytes]) -> Iterator[tuple[Any, ...]]:
        """Rows of ``entries`` for ``cids``, in chunks under SQLite's bound-parameter limit."""
        wanted = list(cids)
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            yield from self._db.execute(f"SELECT {columns} FROM entries WHERE cid IN ({marks})", chunk)

    def get_meta(self, cids: Collection[bytes]) -> dict[bytes, EntryMeta]:
        return {
            cid: EntryMeta(tree, height, Status(status), parents, view)
            for cid, tree, height, status, parents, view in self._rows_for(
                "cid, tree, height, status, parents, view", cids
            )
        }

    def get_raws(self, cids: Collection[bytes]) -> dict[bytes, bytes]:
        return {cid: bytes(raw) for cid, raw in self._rows_for("cid, raw", cids)}

    def _by_height(self, columns: str, tree: bytes, status: Status | None) -> sqlite3.Cursor:
        if status is None:
            return self._db.execute(f"SELECT {columns} FROM entries WHERE tree = ? ORDER BY height, cid", (tree,))
        return self._db.execute(
            f"SELECT {columns} FROM entries WHERE tree = ? AND status = ? ORDER BY height, cid", (tree, int(status))
        )

    def iter_cids(self, tree: bytes, status: Status | None) -> Iterator[bytes]:
        for (cid,) in self._by_height("cid", tree, status):
            yield cid

    def page_entries(
        self, tree: bytes, status: Status, after: tuple[int, bytes] | None, limit: int
    ) -> list[tuple[bytes, int, bytes]]:
        # Keyset paging on the (tree, height) index: each page is a fresh query, so no
        # cursor stays open across writes, and a page costs the same at any depth.
        if after is None:
            rows = self._db.execute(
                "SELECT cid, height, raw FROM entries WHERE tree = ? AND status = ? ORDER BY height, cid LIMIT ?",
                (tree, int(status), limit),
            )
        else:
            rows = self._db.execute(
                "SELECT cid, height, raw FROM entries WHERE tree = ? AND status = ? AND height >= ?"
                " AND (height, cid) > (?, ?) ORDER BY height, cid LIMIT ?",
                (tree, int(status), after[0], after[0], after[1], limit),
            )
        return [(cid, height, bytes(raw)) for cid, height, raw in rows]

    def tips(self, tree: bytes, store: str) -> list[bytes]:
        rows = self._db.execute("SELECT cid FROM tips WHERE tree = ? AND store = ? ORDER BY cid", (tree, store))
        return [row[0] for row in rows]

    def trees(self) -> list[bytes]:
        return [row[0] for row in self._db.execute("SELECT cid FROM trees ORDER BY seq")]

    def iter_entries(self, tree: bytes, status: Status | None) -> Iterator[tuple[bytes, int, bytes]]:
        yield from self._by_height("cid, height, raw", tree, status)

    def status_counts(self, tree: bytes) -> dict[Status, int]:
        counts = dict.fromkeys(Status, 0)
        for status, count in self._db.execute(
            "SELECT status, count(*) FROM entries WHERE tree = ? GROUP BY status", (tree,)
        ):
            counts[Status(status)] = count
        return counts

    def has_waits(self) -> bool:
        return self._db.execute("SELECT 1 FROM waits LIMIT 1").fetchone() is not None

    def waiting_children(self, blockers: Collection[bytes]) -> list[bytes]:
        children: set[bytes] = set()
        wanted = list(blockers)
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT child FROM waits WHERE blocker IN ({marks})", chunk)
            children.update(row[0] for row in rows)
        return sorted(children)

    def waits_in_tree(self, tree: bytes) -> list[tuple[bytes, bytes]]:
        rows = self._db.execute("SELECT blocker, child FROM waits WHERE tree = ? ORDER BY blocker, child", (tree,))
        return [(row[0], row[1]) for row in rows]

    def write(self, batch: WriteBatch) -> None:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if batch.entries:
                    self._insert_entries(batch)
                if batch.statuses:
                    db.executemany(
                        "UPDATE entries SET status = ?, view = ? WHERE cid = ?",
                        [(int(status), view, cid) for cid, (status, view) in batch.statuses.items()],
                    )
                if batch.tips_removed:
                    db.executemany("DELETE FROM tips WHERE tree = ? AND store = ? AND cid = ?", batch.tips_removed)
                if batch.tips_added:
                    db.executemany("INSERT OR IGNORE INTO tips VALUES (?, ?, ?)", batch.tips_added)
                if batch.waits_cleared:
                    db.executemany("DELETE FROM waits WHERE child = ?", [(c,) for c in batch.waits_cleared])
                if batch.waits_added:
                    db.executemany("INSERT OR IGNORE INTO waits VALUES (?, ?, ?)", batch.waits_added)
                if batch.trees_added:
                    db.executemany("INSERT OR IGNORE INTO trees (cid) VALUES (?)", [(t,) for t in batch.trees_added])
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StorageError(f"write failed, nothing was stored: {exc}") from exc

    def _insert_entries(self, batch: WriteBatch) -> None:
        records = batch.entries
        for start in range(0, len(records), _INSERT_ROWS):
            chunk = records[start : start + _INSERT_ROWS]
            values: list[Any] = []
            for r in chunk:
                meta = r.meta
                values += (r.cid, meta.tree, meta.height, int(meta.status), meta.parents, meta.settings_view, r.raw)
            rows = ",".join(["(?,?,?,?,?,?,?)"] * len(chunk))
            self._db.execute(f"INSERT OR IGNORE INTO entries {_ENTRY_COLUMNS} VALUES {rows}", values)

    def get_value(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_value(self, key: str, value: bytes) -> None:
        try:
            self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, value))
        except sqlite3.Error as exc:
            raise StorageError(f"write failed: {exc}") from exc

    def close(self) -> None:
        self._db.close()
