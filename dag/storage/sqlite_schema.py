"""Opening the SQLite file: connection settings, the damage check, the schema and its migration.

Everything here runs once, before the storage serves a read; a file that is damaged or of
an unknown format is refused (and let go) rather than half-used.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..errors import StorageError

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

# Format 3: per-(tree, status) entry counts and bytes, kept exact by triggers in the same
# transaction as the rows they count, so ``status`` reads a handful of rows instead of
# scanning every entry (1.26 s at 1M entries). Ban-list IDs count as status 2 (Failed).
# ``n``/``bytes`` reach 0 rather than vanish: a tree has at most 3 rows.
_COUNTS = """
CREATE TABLE IF NOT EXISTS counts (
    tree BLOB NOT NULL, status INTEGER NOT NULL, n INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (tree, status)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS counts_insert AFTER INSERT ON entries BEGIN
    INSERT INTO counts VALUES (new.tree, new.status, 1, length(new.raw))
    ON CONFLICT (tree, status) DO UPDATE SET n = n + 1, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER IF NOT EXISTS counts_delete AFTER DELETE ON entries BEGIN
    UPDATE counts SET n = n - 1, bytes = bytes - length(old.raw) WHERE tree = old.tree AND status = old.status;
END;
CREATE TRIGGER IF NOT EXISTS counts_status AFTER UPDATE OF status, tree, raw ON entries
WHEN old.status IS NOT new.status OR old.tree IS NOT new.tree OR length(old.raw) IS NOT length(new.raw) BEGIN
    UPDATE counts SET n = n - 1, bytes = bytes - length(old.raw) WHERE tree = old.tree AND status = old.status;
    INSERT INTO counts VALUES (new.tree, new.status, 1, length(new.raw))
    ON CONFLICT (tree, status) DO UPDATE SET n = n + 1, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER IF NOT EXISTS counts_ban AFTER INSERT ON banned BEGIN
    INSERT INTO counts VALUES (new.tree, 2, 1, 0)
    ON CONFLICT (tree, status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS counts_unban AFTER DELETE ON banned BEGIN
    UPDATE counts SET n = n - 1 WHERE tree = old.tree AND status = 2;
END;
"""
# Built once, in the migration's transaction (a node killed half-way migrates again).
_BUILD_COUNTS = """
DELETE FROM counts;
INSERT INTO counts SELECT tree, status, count(*), coalesce(sum(length(raw)), 0) FROM entries GROUP BY tree, status;
INSERT INTO counts SELECT tree, 2, count(*), 0 FROM banned WHERE true GROUP BY tree
    ON CONFLICT (tree, status) DO UPDATE SET n = n + excluded.n;
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
SCHEMA_VERSION = 3
# Entries are appended in arrival order (a rowid table) with a separate index on their
# random CIDs: clustering the table itself by CID spread every insert over the whole
# B-tree, and batch writes slowed from ~30 to ~60 us an entry as a database grew to 100K.
# 4 MiB of page cache: 8 MiB was no faster in a 100K-entry bootstrap and held 3-4 MiB more.
_CACHE_KIB = 4 * 1024
_QUICK_CHECK_ERRORS = 10  # quick_check stops after this many problems: enough to say what is wrong
# quick_check reads every page: measured ~0.2-0.3 s for a 108 MiB file (100K entries) here,
# so a whole-file check is kept to files up to 256 MiB (~0.8 s); past that only the tables
# other than ``entries`` are checked (tips, waits, kv, ...: small), and entries are covered
# by the ID check on every read and the bounded one at open.
_QUICK_CHECK_FULL_BYTES = 256 * 1024 * 1024


def open_connection(path: Path | str, synchronous: str) -> sqlite3.Connection:
    """A connection to ``path`` with the current schema; raises ``StorageError`` otherwise."""
    if synchronous not in _SYNCHRONOUS:
        raise StorageError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}")
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        db.execute("PRAGMA foreign_keys=OFF")
        db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        fresh = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        if not fresh:
            _quick_check(db, path)
        if not fresh and version in (1, 2):
            _migrate(db, version)
        elif not fresh and version != SCHEMA_VERSION:
            raise StorageError(f"{path} has storage format {version}; this node reads format {SCHEMA_VERSION}")
        db.executescript(_SCHEMA + _COUNTS)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        db.close()  # a refused file is let go at once (it may be moved away)
        raise
    return db


def _quick_check(db: sqlite3.Connection, path: Path | str) -> None:
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
            problems = [row[0] for row in db.execute(f"PRAGMA quick_check({_QUICK_CHECK_ERRORS})")]
        else:
            tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            problems = []
            for table in tables:
                if table != "entries":
                    problems += [row[0] for row in db.execute(f'PRAGMA quick_check("{table}")')]
            problems = [p for p in problems if p != "ok"] or ["ok"]
    except sqlite3.DatabaseError as exc:  # damage bad enough that the check itself stops
        problems = [str(exc)]
    if problems != ["ok"]:
        raise StorageError(
            f"{path} is damaged ({'; '.join(problems[:3])}); move it away and the node starts empty"
            " and fetches its databases from peers again"
        )


def _migrate(db: sqlite3.Connection, version: int) -> None:
    """One transaction: a node killed half-way reopens a format 1 or 2 file and migrates again.

    1 -> 2 moves Failed rows to the ban list; 2 -> 3 adds the counts and their triggers.
    """
    steps = (_MIGRATE_FROM_1 if version == 1 else "") + _COUNTS + _BUILD_COUNTS
    try:
        db.executescript(f"BEGIN IMMEDIATE;{steps}PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
