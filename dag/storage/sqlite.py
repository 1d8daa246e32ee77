"""SQLite storage: the embedded default.

WAL journal, ``synchronous=FULL`` by default so that a commit that returned survives a
power cut, not only a killed process (measured here: ~7,500 single-row commits/s with
FULL against ~31,000 with NORMAL; FULL still leaves room for the commit target).
One SQLite transaction per :class:`WriteBatch`: a node killed at any instant reopens
into the last applied batch.

Integrity: an entry's ID is the BLAKE3 hash of its bytes, so every read of bytes checks
them against the ID (one hash, ~1 us a KiB) and a row that does not match is treated as
missing, never returned: its ID is remembered (here and in ``kv``, so that the next open
repairs it, see ``dag.ingest.repair_corrupt``). Opening runs SQLite's ``quick_check``
(the B-tree structure; a damaged file is refused) and hashes the entries stored since the
previous open, plus a slice of older ones.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import blake3

from ..errors import StorageError
from ..ids import CID_LENGTH
from .base import MAX_BANNED, EntryMeta, Status, WriteBatch

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY, cid BLOB NOT NULL UNIQUE, tree BLOB NOT NULL, height INTEGER NOT NULL,
    status INTEGER NOT NULL, parents BLOB NOT NULL, view BLOB NOT NULL, raw BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_tree ON entries (tree, height);
CREATE INDEX IF NOT EXISTS entries_unverified ON entries (tree) WHERE status = 0;
CREATE TABLE IF NOT EXISTS tips (
    tree BLOB NOT NULL, store TEXT NOT NULL, cid BLOB NOT NULL, PRIMARY KEY (tree, store, cid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS waits (
    blocker BLOB NOT NULL, child BLOB NOT NULL, tree BLOB NOT NULL, at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (blocker, child)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS waits_by_child ON waits (child);
CREATE INDEX IF NOT EXISTS waits_by_tree ON waits (tree);
CREATE TABLE IF NOT EXISTS trees (seq INTEGER PRIMARY KEY, cid BLOB NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS banned (
    seq INTEGER PRIMARY KEY, cid BLOB NOT NULL UNIQUE, tree BLOB NOT NULL, height INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS banned_by_tree ON banned (tree);
"""

# Format 1 stored Failed entries and did not date waits: on opening, its Failed rows become
# ban-list IDs and its waits are dated 0 (so they count as old).
_MIGRATE_FROM_1 = """
ALTER TABLE waits ADD COLUMN at REAL NOT NULL DEFAULT 0;
CREATE TABLE banned (
    seq INTEGER PRIMARY KEY, cid BLOB NOT NULL UNIQUE, tree BLOB NOT NULL, height INTEGER NOT NULL
);
INSERT INTO banned (cid, tree, height) SELECT cid, tree, height FROM entries WHERE status = 2 ORDER BY seq;
DELETE FROM waits WHERE child IN (SELECT cid FROM banned);
DELETE FROM entries WHERE status = 2;
"""

_SYNCHRONOUS = ("off", "normal", "full", "extra")
SCHEMA_VERSION = 2
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
_DIGEST_AT = 4  # where the BLAKE3 digest starts in a binary ID (after the CID prefix)
_CORRUPT_KEY = "integrity/corrupt/"  # kv rows naming entries whose bytes did not match their ID
_CHECKED_KEY = "integrity/checked"  # kv row: how far the check at open has hashed
# The check at open hashes at most this many entries: the ones stored since the last open
# first, then older ones round robin. Measured on this machine (2 busy cores): reading and
# hashing all of a 100K-entry database (75 MB of entry bytes) took 0.6 s, 20,000 entries
# 0.12-0.16 s; every entry is checked again anyway whenever it is read.
_CHECK_AT_OPEN = 20_000
_CHECK_OLD_AT_OPEN = 5_000  # older entries checked at each open even after a busy run
_QUICK_CHECK_ERRORS = 10  # quick_check stops after this many problems: enough to say what is wrong
# quick_check reads every page: measured ~0.2-0.3 s for a 108 MiB file (100K entries) here,
# so a whole-file check is kept to files up to 256 MiB (~0.8 s); past that only the tables
# other than ``entries`` are checked (tips, waits, kv, ...: small), and entries are covered
# by the ID check on every read and the bounded one at open.
_QUICK_CHECK_FULL_BYTES = 256 * 1024 * 1024


class SqliteStorage:
    def __init__(self, path: Path | str, *, synchronous: str = "full", max_banned: int = MAX_BANNED) -> None:
        if synchronous not in _SYNCHRONOUS:
            raise StorageError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}")
        self._max_banned = max_banned
        self._corrupt: set[bytes] = set()
        self._usage: dict[bytes, tuple[int, int]] = {}  # tree -> Unverified (count, bytes), when known
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA foreign_keys=OFF")
            self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            fresh = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
            if not fresh:
                self._quick_check(path)
            if not fresh and version == 1:
                self._migrate_from_1()
            elif not fresh and version != SCHEMA_VERSION:
                raise StorageError(f"{path} has storage format {version}; this node reads format {SCHEMA_VERSION}")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._banned = self._db.execute("SELECT count(*) FROM banned").fetchone()[0]
            self._corrupt.update(self._marked_corrupt())
        except BaseException as exc:
            if hasattr(self, "_db"):
                self._db.close()  # a refused file is let go at once (it may be moved away)
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"cannot open SQLite database {path}: {exc}") from exc
            raise

    # ---- integrity --------------------------------------------------------------------

    def _quick_check(self, path: Path | str) -> None:
        """Refuse a file whose B-trees are damaged (its rows cannot be trusted to read back).

        Up to ``_QUICK_CHECK_FULL_BYTES`` the whole file is checked; past that, every table
        but ``entries`` (whose rows are hashed against their IDs on read instead).
        """
        try:
            size = Path(path).stat().st_size
        except OSError:
            size = 0
        try:
            if size <= _QUICK_CHECK_FULL_BYTES:
                problems = [row[0] for row in self._db.execute(f"PRAGMA quick_check({_QUICK_CHECK_ERRORS})")]
            else:
                tables = [row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
                problems = []
                for table in tables:
                    if table != "entries":
                        problems += [row[0] for row in self._db.execute(f'PRAGMA quick_check("{table}")')]
                problems = [p for p in problems if p != "ok"] or ["ok"]
        except sqlite3.DatabaseError as exc:  # damage bad enough that the check itself stops
            problems = [str(exc)]
        if problems != ["ok"]:
            raise StorageError(
                f"{path} is damaged ({'; '.join(problems[:3])}); move it away and the node starts empty"
                " and fetches its databases from peers again"
            )

    def _migrate_from_1(self) -> None:
        """One transaction: a node killed half-way reopens a format 1 file and migrates again."""
        try:
            self._db.executescript(f"BEGIN IMMEDIATE;{_MIGRATE_FROM_1}PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _intact(self, cid: bytes, raw: bytes) -> bool:
        """Whether ``raw`` hashes to ``cid``; a mismatch is remembered as corrupt.

        (The loops over many rows compare the hash inline and call this only on a mismatch.)
        """
        if blake3.blake3(raw).digest() == cid[_DIGEST_AT:]:
            return True
        if cid not in self._corrupt:
            self._corrupt.add(cid)
            log.error("stored entry %s does not match its ID: treated as missing", cid.hex())
            try:
                self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (_CORRUPT_KEY + cid.hex(), b""))
            except sqlite3.Error as exc:  # remembered for this run anyway
                log.warning("could not record the corrupt entry: %s", exc)
        return False

    def _marked_corrupt(self) -> list[bytes]:
        rows = self._db.execute(
            "SELECT key FROM kv WHERE key >= ? AND key < ?", (_CORRUPT_KEY, _CORRUPT_KEY[:-1] + chr(ord("/") + 1))
        )
        found = []
        for (key,) in rows:
            try:
                cid = bytes.fromhex(key[len(_CORRUPT_KEY) :])
            except ValueError:
                continue
            if len(cid) == CID_LENGTH:
                found.append(cid)
        return found

    def corrupt(self) -> list[bytes]:
        return sorted(self._corrupt)

    def check_ids(self) -> int:
        """Hash the bytes of the entries stored since the last check, and a slice of older ones.

        Reads check every entry they return, so this only finds damage in entries nobody
        reads; it is bounded so that opening a large database stays quick (see
        ``_CHECK_AT_OPEN``), and walks the older entries a slice per open, round robin.
        """
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (_CHECKED_KEY,)).fetchone()
        new_from, old_from = _decode_cursor(bytes(row[0]) if row is not None else b"")
        checked = 0
        last_new = new_from
        for seq, cid, raw in self._db.execute(
            "SELECT seq, cid, raw FROM entries WHERE seq > ? ORDER BY seq LIMIT ?", (new_from, _CHECK_AT_OPEN)
        ):
            self._intact(cid, bytes(raw))
            last_new = seq
            checked += 1
        last_old = old_from
        budget = max(_CHECK_AT_OPEN - checked, _CHECK_OLD_AT_OPEN)
        rows = list(
            self._db.execute(
                "SELECT seq, cid, raw FROM entries WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (old_from, new_from, budget),
            )
        )
        for seq, cid, raw in rows:
            self._intact(cid, bytes(raw))
            last_old = seq
            checked += 1
        if len(rows) < budget:
            last_old = 0  # the older entries were all checked: start over next time
        self.set_value(_CHECKED_KEY, _encode_cursor(last_new, last_old))
        return checked

    # ---- reading ----------------------------------------------------------------------

    def get_raw(self, cid: bytes) -> bytes | None:
        row = self._db.execute("SELECT raw FROM entries WHERE cid = ?", (cid,)).fetchone()
        if row is None:
            return None
        raw = bytes(row[0])
        return raw if self._intact(cid, raw) else None

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
            if digest(raw).digest() == cid[_DIGEST_AT:] or self._intact(cid, raw):
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
                if blake3.blake3(raw).digest() == cid[_DIGEST_AT:] or self._intact(cid, raw):
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
            if digest(raw).digest() == cid[_DIGEST_AT:] or self._intact(cid, raw):
                yield cid, height, raw

    def status_counts(self, tree: bytes) -> dict[Status, int]:
        counts = dict.fromkeys(Status, 0)
        for status, count in self._db.execute(
            "SELECT status, count(*) FROM entries WHERE tree = ? GROUP BY status", (tree,)
        ):
            counts[Status(status)] = count
        if self._banned:
            row = self._db.execute("SELECT count(*) FROM banned WHERE tree = ?", (tree,)).fetchone()
            counts[Status.FAILED] += row[0]
        return counts

    def unverified_usage(self, tree: bytes) -> tuple[int, int]:
        usage = self._usage.get(tree)
        if usage is None:
            count, size = self._db.execute(
                "SELECT count(*), coalesce(sum(length(raw)), 0) FROM entries WHERE tree = ? AND status = 0", (tree,)
            ).fetchone()
            usage = self._usage[tree] = (count, size)
        return usage

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
                self._usage.clear()
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StorageError(f"write failed, nothing was stored: {exc}") from exc
        if batch.removed:
            self._forget_corrupt(batch.removed)

    def _apply(self, batch: WriteBatch) -> None:
        db = self._db
        if batch.entries:
            self._insert_entries(batch)
        if batch.statuses:
            self._usage.clear()
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
            self._usage.clear()
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
        usage = self._usage
        for start in range(0, len(records), _INSERT_ROWS):
            chunk = records[start : start + _INSERT_ROWS]
            values: list[Any] = []
            for r in chunk:
                meta = r.meta
                values += (r.cid, meta.tree, meta.height, int(meta.status), meta.parents, meta.settings_view, r.raw)
                if meta.status is Status.UNVERIFIED and meta.tree in usage:
                    count, size = usage[meta.tree]
                    usage[meta.tree] = (count + 1, size + len(r.raw))
            rows = ",".join(["(?,?,?,?,?,?,?)"] * len(chunk))
            cursor = self._db.execute(f"INSERT OR IGNORE INTO entries {_ENTRY_COLUMNS} VALUES {rows}", values)
            if cursor.rowcount != len(chunk):
                usage.clear()  # some rows were there already: count again when asked

    def _forget_corrupt(self, cids: list[bytes]) -> None:
        """Entries removed from storage are no longer corrupt here (they may arrive again intact)."""
        done = self._corrupt.intersection(cids)
        if done:
            self._corrupt.difference_update(done)
            self._db.executemany("DELETE FROM kv WHERE key = ?", [(_CORRUPT_KEY + c.hex(),) for c in done])

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


def _encode_cursor(new: int, old: int) -> bytes:
    return f"{new} {old}".encode("ascii")


def _decode_cursor(value: bytes) -> tuple[int, int]:
    """The integrity check's position: last seq checked among new entries, and among old ones."""
    try:
        new, old = (int(part) for part in value.decode("ascii").split())
    except ValueError:
        return 0, 0
    return max(new, 0), max(old, 0)
