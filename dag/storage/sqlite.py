"""SQLite storage: the embedded default.

WAL journal, ``synchronous=FULL`` by default so that a commit that returned survives a
power cut, not only a killed process (measured here: ~7,500 single-row commits/s with
FULL against ~31,000 with NORMAL; FULL still leaves room for the commit target).
One SQLite transaction per :class:`WriteBatch`: a node killed at any instant reopens
into the last applied batch.

Integrity: an entry's ID is the BLAKE3 hash of its bytes, so every read of bytes checks
them against the ID (one hash, ~1 us a KiB) and a row that does not match is treated as
missing, never returned: its ID is remembered (``sqlite_integrity``, so that the next open
repairs it, see ``dag.repair.repair_corrupt``). Opening (``sqlite_schema``) runs SQLite's
``quick_check`` (the B-tree structure; a damaged file is refused), and the open hashes the
entries stored since the previous open, plus a slice of older ones.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import blake3

from ..errors import StorageError
from . import sqlite_local
from .base import MAX_BANNED, EntryMeta, StateHead, StateRow, Status, WriteBatch
from .sqlite_integrity import DIGEST_AT, IdCheck
from .sqlite_schema import open_connection
from .sqlite_states import SqliteStates

_CHUNK = 500  # stay under SQLite's bound-parameter limit
# Entries are inserted many rows per statement: executemany releases and retakes the GIL
# around every row, and with the verifying threads waiting for it each retake can stall.
_INSERT_ROWS = 256
_ENTRY_COLUMNS = "(cid, tree, height, status, parents, view, raw)"


class SqliteStorage:
    def __init__(self, path: Path | str, *, synchronous: str = "full", max_banned: int = MAX_BANNED) -> None:
        self._max_banned = max_banned
        try:
            self._db = open_connection(path, synchronous)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open SQLite database {path}: {exc}") from exc
        try:
            self._banned = self._db.execute("SELECT count(*) FROM banned").fetchone()[0]
            self._ids = IdCheck(self._db, self.set_value)
            self._states = SqliteStates(self._db, path, synchronous)  # store checkpoints
            sqlite_local.create_local_table(self._db)
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"cannot open SQLite database {path}: {exc}") from exc
            raise

    # ---- integrity (dag/storage/sqlite_integrity.py) ------------------------------------

    def corrupt(self) -> list[bytes]:
        return sorted(self._ids.corrupt)

    def check_ids(self) -> int:
        """Hash the entries stored since the last open, and a slice of older ones."""
        return self._ids.check_at_open()

    # ---- reading ----------------------------------------------------------------------

    def get_raw(self, cid: bytes) -> bytes | None:
        row = self._db.execute("SELECT raw FROM entries WHERE cid = ?", (cid,)).fetchone()
        if row is None:
            return None
        raw = bytes(row[0])
        return raw if self._ids.intact(cid, raw) else None

    def _rows_for(self, columns: str, cids: Collection[bytes]) -> Iterator[tuple[Any, ...]]:
        """Rows of ``entries`` for ``cids``, in chunks under SQLite's bound-parameter limit."""
        wanted = list(cids)
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            yield from self._db.execute(f"SELECT {columns} FROM entries WHERE cid IN ({marks})", chunk)

    def get_meta(self, cids: Collection[bytes]) -> dict[bytes, EntryMeta]:
        found = {
            cid: EntryMeta(tree, height, Status(status), parents, view)
            for cid, tree, height, status, parents, view in self._rows_for(
                "cid, tree, height, status, parents, view", cids
            )
        }
        if self._banned and len(found) < len(cids):
            found.update(self._banned_meta([cid for cid in cids if cid not in found]))
        return found

    def _banned_meta(self, cids: list[bytes]) -> dict[bytes, EntryMeta]:
        found = {}
        for start in range(0, len(cids), _CHUNK):
            chunk = cids[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for cid, tree, height in self._db.execute(
                f"SELECT cid, tree, height FROM banned WHERE cid IN ({marks})", chunk
            ):
                found[cid] = EntryMeta(tree, height, Status.FAILED, b"", b"")
        return found

    def get_raws(self, cids: Collection[bytes]) -> dict[bytes, bytes]:
        found = {}
        digest = blake3.blake3
        for cid, raw in self._rows_for("cid, raw", cids):
            if digest(raw).digest() == cid[DIGEST_AT:] or self._ids.intact(cid, raw):
                found[cid] = raw
        return found

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
        # cursor stays open across writes, and a page costs the same at any depth. A
        # corrupt row is left out and the page filled up from the rows after it, so that a
        # short page still means the end.
        page: list[tuple[bytes, int, bytes]] = []
        while len(page) < limit:
            wanted = limit - len(page)
            rows = self._page_rows(tree, status, after, wanted)
            for cid, height, raw in rows:
                after = (height, cid)
                if blake3.blake3(raw).digest() == cid[DIGEST_AT:] or self._ids.intact(cid, raw):
                    page.append((cid, height, raw))
            if len(rows) < wanted:
                break
        return page

    def _page_rows(
        self, tree: bytes, status: Status, after: tuple[int, bytes] | None, limit: int
    ) -> list[tuple[bytes, int, bytes]]:
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
        return rows.fetchall()

    def tips(self, tree: bytes, store: str) -> list[bytes]:
        rows = self._db.execute("SELECT cid FROM tips WHERE tree = ? AND store = ? ORDER BY cid", (tree, store))
        return [row[0] for row in rows]

    def all_tips(self, tree: bytes) -> list[tuple[str, bytes]]:
        """Every ``(store, cid)`` tip row of a tree (store ``""``: the main DAG)."""
        rows = self._db.execute("SELECT store, cid FROM tips WHERE tree = ? ORDER BY store, cid", (tree,))
        return [(row[0], row[1]) for row in rows]

    def trees(self) -> list[bytes]:
        return [row[0] for row in self._db.execute("SELECT cid FROM trees ORDER BY seq")]

    def iter_entries(self, tree: bytes, status: Status | None) -> Iterator[tuple[bytes, int, bytes]]:
        digest = blake3.blake3  # inlined: this loop serves whole histories
        for cid, height, raw in self._by_height("cid, height, raw", tree, status):
            if digest(raw).digest() == cid[DIGEST_AT:] or self._ids.intact(cid, raw):
                yield cid, height, raw

    def status_counts(self, tree: bytes) -> dict[Status, int]:
        # The ``counts`` table, kept by triggers (``sqlite_schema``): a few rows, at any size.
        counts = dict.fromkeys(Status, 0)
        for status, count in self._db.execute("SELECT status, n FROM counts WHERE tree = ?", (tree,)):
            counts[Status(status)] += count
        return counts

    def unverified_usage(self, tree: bytes) -> tuple[int, int]:
        row = self._db.execute("SELECT n, bytes FROM counts WHERE tree = ? AND status = 0", (tree,)).fetchone()
        return (0, 0) if row is None else (row[0], row[1])

    def stale_unverified(self, tree: bytes | None, waited_since: float) -> list[bytes]:
        where, args = ("", ()) if tree is None else (" AND tree = ?", (tree,))
        stale = {
            row[0]
            for row in self._db.execute(
                f"SELECT child FROM waits WHERE 1{where} GROUP BY child HAVING max(at) < ?", (*args, waited_since)
            )
        }
        # An Unverified entry always waits for something; one that does not is stuck.
        stale.update(
            row[0]
            for row in self._db.execute(
                f"SELECT cid FROM entries WHERE status = 0{where}"
                " AND NOT EXISTS (SELECT 1 FROM waits WHERE child = entries.cid)",
                args,
            )
        )
        return sorted(stale)

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

    # ---- writing ----------------------------------------------------------------------

    def write(self, batch: WriteBatch) -> None:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                self._apply(batch)
            except BaseException:
                db.execute("ROLLBACK")
                self._banned = db.execute("SELECT count(*) FROM banned").fetchone()[0]
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StorageError(f"write failed, nothing was stored: {exc}") from exc
        if batch.removed:
            self._ids.forget(batch.removed)

    def _apply(self, batch: WriteBatch) -> None:
        db = self._db
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
            db.executemany(
                "INSERT OR IGNORE INTO waits VALUES (?, ?, ?, ?)",
                [(blocker, child, tree, batch.now) for blocker, child, tree in batch.waits_added],
            )
        if batch.trees_added:
            db.executemany("INSERT OR IGNORE INTO trees (cid) VALUES (?)", [(t,) for t in batch.trees_added])
        gone = [cid for cid, _tree, _height in batch.banned] + batch.removed
        if gone:
            db.executemany("DELETE FROM entries WHERE cid = ?", [(c,) for c in gone])
            db.executemany("DELETE FROM waits WHERE child = ?", [(c,) for c in gone])
        if batch.banned:
            cursor = db.executemany("INSERT OR IGNORE INTO banned (cid, tree, height) VALUES (?, ?, ?)", batch.banned)
            self._banned += max(cursor.rowcount, 0)
            excess = self._banned - self._max_banned
            if excess > 0:  # the oldest IDs leave the list first
                db.execute("DELETE FROM banned WHERE seq IN (SELECT seq FROM banned ORDER BY seq LIMIT ?)", (excess,))
                self._banned -= excess

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

    def delete_value(self, key: str) -> None:
        try:
            self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
        except sqlite3.Error as exc:
            raise StorageError(f"write failed: {exc}") from exc

    # ---- store checkpoints (dag/storage/sqlite_states.py) ---------------------------------

    def state_head(self, tree: bytes, store: str, kind: str) -> StateHead | None:
        return self._states.head(tree, store, kind)

    def state_rows_for(
        self, tree: bytes, store: str, kind: str, keys: Collection[str]
    ) -> tuple[StateHead | None, dict[str, StateRow]]:
        return self._states.rows_for(tree, store, kind, keys)

    def state_snapshot(self, tree: bytes, store: str, kind: str) -> tuple[StateHead | None, dict[str, StateRow]]:
        return self._states.snapshot(tree, store, kind)

    def write_state(
        self,
        tree: bytes,
        store: str,
        kind: str,
        expected: StateHead | None,
        head: StateHead,
        rows: dict[str, StateRow],
        replace: bool,
    ) -> bool:
        try:
            return self._states.write(tree, store, kind, expected, head, rows, replace)
        except sqlite3.Error as exc:
            raise StorageError(f"checkpoint write failed, nothing was stored: {exc}") from exc

    def close(self) -> None:
        self._states.close()
        self._db.close()

    # ---- the node's own bookkeeping (dag/storage/sqlite_local.py) -------------------------

    def local_items(self, space: str) -> dict[str, bytes]:
        return sqlite_local.local_items(self._db, space)

    def local_write(self, space: str, upserts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        sqlite_local.local_write(self._db, space, upserts, deletes)
